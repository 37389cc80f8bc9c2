"""qmgr-sendmail refuses an envelope record that pickup would refuse (EX_DATAERR, 65).

pickup reads maildrop files with line_length_limit as the largest record payload and
sets a file with a longer record aside in corrupt/. qmgr-sendmail used to write such a
file anyway (an over-long -f sender, recipient or -F full name) and exit 0: the mail was
lost although the command said it was queued. Now it checks every envelope record
against the same parameter before creating the file, as Postfix's postdrop refuses a
record over line_length_limit: ``qmgr-sendmail: fatal: sender address too long (5012
bytes; line_length_limit is 2048)``, exit 65, nothing in maildrop/. A record exactly at
the limit is still accepted, and pickup queues it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from master.config import Config
from qmgrd.sendmail import run
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.maildrop import RecordTooLong, envelope_records
from qmgrd.spool.queue import Spool
from qmgrd.spool.records import RecordReader
from tests.harness import wait_for
from transports.pickup import pickup_scan

EX_DATAERR = 65
REPO = Path(__file__).resolve().parent.parent
FATAL = "qmgr-sendmail: fatal: "
MSG = b"Subject: x\n\nx\n"


def sendmail(confdir: Path, args: list[str], data: bytes = MSG) -> tuple[int, str]:
    err = io.StringIO()
    code = run(["-c", str(confdir), *args], io.BytesIO(data), err)
    return code, err.getvalue()


def maildrop(confdir: Path) -> list[str]:
    return os.listdir(confdir / "q" / "maildrop")


def pickup(confdir: Path) -> tuple[int, dict[str, list[str]]]:
    """Run pickup over maildrop/ with confdir's main.cf; (files taken, queue listings)."""
    cfg = Config.load(str(confdir))
    spool = Spool.from_config(cfg)
    taken = pickup_scan(cfg, spool, Cleanup(cfg, spool))
    return taken, {q: os.listdir(spool.queue_path(q)) for q in ("maildrop", "incoming",
                                                                 "corrupt")}


def queued_records(confdir: Path, rtype: bytes) -> list[bytes]:
    (name,) = os.listdir(confdir / "q" / "incoming")
    with open(confdir / "q" / "incoming" / name, "rb") as f:
        return [r.data for r in RecordReader(f) if r.rtype == rtype]


LONG = "a" * 5000 + "@example.org"  # 5012 bytes, the tester's case


@pytest.mark.parametrize("args, text", [
    (["-f", LONG, "r@example.net"], "sender address too long (5012 bytes"),
    ([f"-f{LONG}", "r@example.net"], "sender address too long (5012 bytes"),
    (["-f", f"Name <{LONG}>", "r@example.net"], "sender address too long (5012 bytes"),
    (["r@example.net", "b" * 3000 + "@example.net"], "recipient address too long (3012 bytes"),
    (["r@example.net, <" + "c" * 2037 + "@example.net>"],  # parsed: 2049 bytes stored
     "recipient address too long (2049 bytes"),
    (["-F", "F" * 3000, "r@example.net"], "full name too long (3000 bytes"),
    (["-f", "\u00e9" * 1024 + "@x", "r@example.net"],  # 1026 characters, 2050 bytes
     "sender address too long (2050 bytes"),
])
def test_over_long_envelope_record_refused(confdir: Path, args: list[str], text: str) -> None:
    code, err = sendmail(confdir, args)
    assert (code, err) == (EX_DATAERR, f"{FATAL}{text}; line_length_limit is 2048)\n")
    assert maildrop(confdir) == []


def test_tester_case_exact_message_console_script(confdir: Path) -> None:
    """The command as the tester ran it (a process, the fast main.cf path)."""
    p = subprocess.run([sys.executable, "-m", "qmgrd.sendmail", "-c", str(confdir), "-f",
                        LONG, "r@example.net"], input=MSG, capture_output=True, cwd=REPO,
                       timeout=60, check=False)
    text = "sender address too long (5012 bytes; line_length_limit is 2048)"
    assert (p.returncode, p.stderr, p.stdout) == (EX_DATAERR, f"{FATAL}{text}\n".encode(), b"")
    assert maildrop(confdir) == []


def test_sender_at_the_limit_is_queued_by_pickup(confdir: Path) -> None:
    """2048 bytes is accepted by both sides; 2049 is refused by sendmail."""
    at_limit = "s" * (2048 - 12) + "@example.org"
    assert sendmail(confdir, ["-f", at_limit, "r" * 2036 + "@example.net"])[0] == 0
    code, err = sendmail(confdir, ["-f", "s" + at_limit, "r@example.net"])
    text = "sender address too long (2049 bytes; line_length_limit is 2048)"
    assert (code, err) == (EX_DATAERR, f"{FATAL}{text}\n")
    taken, queues = pickup(confdir)
    assert taken == 1 and queues["maildrop"] == [] and queues["corrupt"] == []
    assert len(queues["incoming"]) == 1
    assert queued_records(confdir, b"S") == [at_limit.encode()]


@pytest.mark.parametrize("main_cf", ["line_length_limit = 600\n",
                                     "my_limit = 600\nline_length_limit = $my_limit\n"])
def test_limit_is_pickups_line_length_limit(confdir: Path, main_cf: str) -> None:
    """The limit is main.cf's line_length_limit, read by the fast path or (with an
    expansion) by master.config - the value pickup uses."""
    with open(confdir / "main.cf", "a") as f:
        f.write(main_cf)
    at_limit = "s" * 588 + "@example.org"  # 600 bytes
    assert sendmail(confdir, ["-f", at_limit, "r@example.net"])[0] == 0
    code, err = sendmail(confdir, ["-f", at_limit, "r" * 589 + "@example.net"])
    text = "recipient address too long (601 bytes; line_length_limit is 600)"
    assert (code, err) == (EX_DATAERR, f"{FATAL}{text}\n")
    taken, queues = pickup(confdir)
    assert (taken, queues["corrupt"], len(queues["incoming"])) == (1, [], 1)
    assert queued_records(confdir, b"S") == [at_limit.encode()]


@pytest.mark.parametrize("main_cf", ["line_length_limit = 100\n",
                                     "my_limit = 511\nline_length_limit = $my_limit\n"])
def test_limit_under_postfix_minimum_is_a_config_error(confdir: Path, main_cf: str) -> None:
    """line_length_limit under 512 (Postfix's minimum) is a configuration error naming
    main.cf and the line (exit 78), read by the fast path or by master.config, and
    nothing is queued - not a refusal of every submission as a record "too long"."""
    lines = (confdir / "main.cf").read_text().count("\n") + main_cf.count("\n")
    with open(confdir / "main.cf", "a") as f:
        f.write(main_cf)
    code, err = sendmail(confdir, ["r@example.net"])
    value = "100" if "100" in main_cf else "511"
    want = (f'{FATAL}{confdir}/main.cf, line {lines}: invalid line_length_limit '
            f'parameter value "{value}": minimum is 512\n')
    assert (code, err) == (78, want)
    assert maildrop(confdir) == []


def test_extracted_header_recipient_is_content_not_a_record(confdir: Path) -> None:
    """-t: header recipients are content lines of the maildrop file (split like any
    long line) and cleanup extracts them at pickup: a long one is not refused and not
    lost - pickup queues it."""
    long_rcpt = b"t" * 5000 + b"@example.net"
    assert sendmail(confdir, ["-t"], b"To: " + long_rcpt + b"\nSubject: x\n\nx\n")[0] == 0
    taken, queues = pickup(confdir)
    assert (taken, queues["corrupt"], len(queues["incoming"])) == (1, [], 1)
    assert queued_records(confdir, b"R") == [long_rcpt]


def test_envelope_records_api() -> None:
    with pytest.raises(RecordTooLong) as info:
        envelope_records("s@x", ["ok@y", "r" * 20 + "@y"], max_record=21)
    assert (info.value.what, info.value.length, info.value.limit) == (
        "recipient address", 22, 21)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == "recipient address too long (22 bytes; line_length_limit is 21)"
    # the attribute records too (out of reach of qmgr-sendmail since line_length_limit is
    # at least 512: its longest attribute, a 100-character envelope id, takes 112 bytes)
    with pytest.raises(RecordTooLong, match=r"^envelope_id attribute too long \(72 bytes"):
        envelope_records("s@x", ["r@y"], envid="v" * 60, max_record=50)


@pytest.mark.timeout(120)
def test_sender_at_the_limit_is_delivered(mailsys) -> None:
    """End to end: a 2048-byte sender reaches the mailbox; a 2049-byte one is refused
    by qmgr-sendmail and nothing is queued."""
    ms = mailsys()
    ms.start()
    at_limit = "s" * (2048 - 12) + "@example.org"
    r = ms.sendmail("-f", "s" + at_limit, "user@localhost", data=MSG)
    text = "sender address too long (2049 bytes; line_length_limit is 2048)"
    assert (r.returncode, r.stderr) == (EX_DATAERR, f"{FATAL}{text}\n".encode())
    r = ms.sendmail("-f", at_limit, "user@localhost", data=MSG)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: ms.maildir("user"), 30, "a Maildir delivery")
    wait_for(ms.queue_empty, 20, "an empty queue")
    assert len(ms.maildir("user")) == 1
    assert f"Return-Path: <{at_limit}>\n".encode() in ms.maildir("user")[0].read_bytes()
    assert "set aside" not in ms.log() and not ms.queue_files("corrupt")
