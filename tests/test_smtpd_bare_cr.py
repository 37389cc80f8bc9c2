"""Bare CR and bare LF in message content, over SMTP (smtpd) and through qmgr-sendmail +
pickup, compared with Postfix:

* smtpd (Postfix smtp_get(), smtpd_forbid_bare_newline = no as in 3.7): a line ends at
  LF, CRLF or bare LF alike; every CR right before that LF is removed ("We remove bare
  CR if received before CRLF, and leave it alone otherwise"); any other CR is data.
* sendmail (sendmail_fix_line_endings = always, the default): the same per line.

The queued content is read back from the queue file."""

from __future__ import annotations

import io
from pathlib import Path

from test_issue6_session import Client, Host, greet, run, send

from master import log
from master.config import Config
from qmgrd.sendmail import run as sendmail_run
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.maildrop import read_maildrop
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from transports.pickup import pickup_scan

# (as sent, as queued): header and body lines
CASES = [
    (b"Subject: a\rb\r\n", b"Subject: a\rb"),              # bare CR inside a header
    (b"X-Trail: end\r\r\n", b"X-Trail: end"),              # CRs before CRLF: removed
    (b"\r\n", b""),
    (b"mid\rdle\r\n", b"mid\rdle"),                        # bare CR inside a line: kept
    (b"\rleading CR\r\n", b"\rleading CR"),
    (b"a\r\rb\r\n", b"a\r\rb"),
    (b"bare LF\n", b"bare LF"),                            # a bare LF ends a line
    (b"CR then bare LF\r\r\r\n", b"CR then bare LF"),
    (b"last\r\n", b"last"),
]
SENT = b"".join(sent for sent, _ in CASES)
QUEUED = [queued for _, queued in CASES]


def body_lines(lines: list[bytes]) -> list[bytes]:
    """The lines from our Subject: on (what the client sent; cleanup adds Message-ID:
    and Date: at the end of the headers, left out here)."""
    start = next(i for i, line in enumerate(lines) if line.startswith(b"Subject: "))
    return [line for line in lines[start:]
            if not line.startswith((b"Message-ID: ", b"Date: ", b"From: "))]


def test_smtpd_keeps_bare_cr_and_drops_cr_before_lf(tmp_path: Path) -> None:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    host = Host(tmp_path)

    async def script(c: Client) -> None:
        await greet(c)
        reply = await send(c, "alice@far.example", ["bob@localhost"], SENT + b".\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        # a line that starts with a CR takes read_data's line-at-a-time path
        reply = await send(c, "alice@far.example", ["bob@localhost"],
                           b"\r" + SENT + b".\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        await c.cmd("QUIT")

    run(host, script)
    first, second = host.queued
    with host.queue_file(first) as qf:
        assert body_lines(list(qf.iter_lines())) == QUEUED
    with host.queue_file(second) as qf:
        lines = list(qf.iter_lines())
    # not a header: the body starts there, after the empty line cleanup inserts
    assert lines[-len(QUEUED) - 1:] == [b"", b"\rSubject: a\rb", *QUEUED[1:]]


def test_sendmail_keeps_bare_cr_and_drops_cr_before_lf(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n"
                                      "myhostname = mx.example.org\n")
    cfg = Config.load(str(tmp_path))
    spool = Spool.from_config(cfg)
    spool.make_dirs()
    err = io.StringIO()
    assert sendmail_run(["-c", str(tmp_path), "-f", "alice", "bob@example.net"],
                        io.BytesIO(SENT), err) == 0, err.getvalue()
    (maildrop,) = Path(spool.queue_path("maildrop")).iterdir()
    with maildrop.open("rb") as f:  # the lines as Postfix's sendmail writes them
        assert read_maildrop(f).content.split(b"\n")[:-1] == QUEUED
    assert pickup_scan(cfg, spool, Cleanup(cfg, spool)) == 1
    (qid,) = (p.name for p in Path(spool.queue_path("incoming")).iterdir())
    with QueueFile.open(spool, "incoming", qid, lock=None, readonly=True) as qf:
        assert body_lines(list(qf.iter_lines())) == QUEUED
