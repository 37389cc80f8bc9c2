"""Tests for transports.pickup: maildrop/ -> cleanup -> incoming/."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from master import log
from master.config import Config
from qmgrd.sendmail import run as sendmail_run
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import Cleanup, CleanupError
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from qmgrd.spool.records import encode
from transports import pickup
from transports.pickup import pickup_file, pickup_scan

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "corpus"


class Env:
    def __init__(self, tmp_path: Path, extra: str = "") -> None:
        self.dir = tmp_path
        (tmp_path / "main.cf").write_text(
            f"queue_directory = {tmp_path}/q\nmyhostname = mx.example.org\n{extra}")
        self.cfg = Config.load(str(tmp_path))
        self.spool = Spool.from_config(self.cfg)
        self.spool.make_dirs()
        self.cleanup = Cleanup(self.cfg, self.spool)

    def sendmail(self, args: list[str], data: bytes) -> None:
        err = io.StringIO()
        assert sendmail_run(["-c", str(self.dir), *args], io.BytesIO(data), err) == 0, err

    def scan(self) -> int:
        return pickup_scan(self.cfg, self.spool, self.cleanup)

    def ls(self, queue: str) -> list[str]:
        return sorted(os.listdir(self.spool.queue_path(queue)))

    def raw_maildrop(self, records: list[tuple[bytes, bytes]], mode: int = 0o744) -> str:
        f, qid, path = self.spool.create("maildrop")
        with f:
            f.write(b"".join(encode(t, d) for t, d in records))
        os.chmod(path, mode)
        return qid


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture
def maillog(tmp_path: Path) -> Iterator[Path]:
    """Send master.log lines to a file for this test (whatever other tests set up)."""
    path = tmp_path / "maillog"
    log.setup("test", str(path))
    try:
        yield path
    finally:
        log.close()


def test_submission_round_trip(env: Env, maillog: Path) -> None:
    data = (CORPUS / "05-mixed-line-endings.eml").read_bytes()
    env.sendmail(["-f", "alice", "-F", "Alice Q", "-N", "delay", "-V", "E1", "-R", "full",
                  "-i", "bob@example.net"], data)
    assert env.scan() == 1
    assert env.ls("maildrop") == []
    [qid] = env.ls("incoming")
    with QueueFile.open(env.spool, "incoming", qid) as qf:
        assert qf.sender == "alice@mx.example.org" and qf.fullname == "Alice Q"
        assert [(r.address, r.notify) for r in qf.recipients] == [("bob@example.net", 8)]
        assert (qf.envid, qf.ret) == ("E1", 1)
        lines = list(qf.iter_lines())
    assert lines[0] == f"Received: by mx.example.org (qmgrd, from userid {os.getuid()})".encode()
    assert lines[2:] == data.replace(b"\r\n", b"\n").rstrip(b"\n").split(b"\n")
    err = maillog.read_text()
    assert f"{qid}: uid={os.getuid()} from=<alice>" in err
    assert f"{qid}: message-id=<mixed-1@example.org>" in err


def test_pickup_from_line_quotes_the_sender_local_part(env: Env, maillog: Path) -> None:
    """Postfix >= 3.5's external log form (info_log_address_format = external):
    ``uid=N from=<"a b"@example.org>``, not ``from=<a b@example.org>``."""
    env.sendmail(["-f", '"a b"@example.org', "bob@example.net"], b"Subject: q\n\nx\n")
    assert env.scan() == 1
    [qid] = env.ls("incoming")
    assert f'{qid}: uid={os.getuid()} from=<"a b"@example.org>' in maillog.read_text()


def test_extract_recipients(env: Env) -> None:
    env.sendmail(["-t"], b"To: a@example.net\nBcc: b@example.net\nSubject: s\n\nx\n")
    assert env.scan() == 1
    [qid] = env.ls("incoming")
    with QueueFile.open(env.spool, "incoming", qid) as qf:
        assert [r.address for r in qf.recipients] == ["a@example.net", "b@example.net"]
        assert not any(x.startswith(b"Bcc") for x in qf.iter_lines())


def test_bad_names_and_non_regular_files_warned_once_and_left(env: Env,
                                                              maillog: Path) -> None:
    """Postfix's mail_open_ok(): a bad name, a symbolic link, a FIFO, a directory are
    warned about and left; a file with two links is warned about and picked up; a
    temporary name of a file being created is passed over in silence. Each once while
    it stays, not at every scan (maildrop/ is world-writable: a fresh-eyes finding was
    a log flood); an entry removed and made again is warned about again."""
    warned: dict[str, int] = {}
    drop = Path(env.spool.queue_path("maildrop"))
    env.raw_maildrop([(b"S", b"a"), (b"R", b"b"), (b"M", b""), (b"X", b""), (b"E", b"")])
    (env.dir / "elsewhere").write_text("x")
    link = env.raw_maildrop([(b"S", b"a"), (b"R", b"b"), (b"M", b""), (b"X", b""),
                             (b"E", b"")])
    os.unlink(drop / link)
    os.symlink(env.dir / "elsewhere", drop / link)
    fifo = env.raw_maildrop([(b"S", b"a")])
    os.unlink(drop / fifo)
    os.mkfifo(drop / fifo)
    os.mkdir(drop / "A")
    (drop / "junk").write_text("x")
    (drop / "123456.789").write_text("x")  # Spool.create's temporary name
    two = env.raw_maildrop([(b"S", b"a"), (b"R", b"c"), (b"M", b""), (b"X", b""),
                            (b"E", b"")])
    os.link(drop / two, env.dir / "second-link")
    def scan() -> int:
        return pickup_scan(env.cfg, env.spool, env.cleanup, warned=warned)

    assert scan() == 2  # the first file and two; a second pass warns no more
    left = sorted([link, fifo, "A", "junk", "123456.789"])
    assert env.ls("maildrop") == left
    lines = [x.split(": ", 1)[1] for x in maillog.read_text().splitlines()
             if "warning:" in x]
    assert sorted(lines) == sorted([
        "warning: bad file name: maildrop/A",
        "warning: bad file name: maildrop/junk",
        f"warning: {drop}/{link}: uid {os.getuid()}: not a regular file",
        f"warning: {drop}/{fifo}: uid {os.getuid()}: not a regular file",
        f"warning: {drop}/{two}: uid {os.getuid()}: file has 2 links"])
    assert (env.dir / "elsewhere").read_text() == "x"
    before = maillog.read_text()
    for _ in range(3):  # later scans (each sendmail, each wakeup) say nothing more
        assert scan() == 0 and env.ls("maildrop") == left
    assert maillog.read_text() == before
    (drop / "junk").unlink()
    (drop / "junk\x1b[2J").write_text("x")  # the name's control bytes escaped
    scan()
    (drop / "junk").write_text("y")
    scan()
    new = [x.split(": ", 1)[1] for x in maillog.read_text()[len(before):].splitlines()]
    assert new == ["warning: bad file name: maildrop/'junk\\x1b[2J'",
                   "warning: bad file name: maildrop/junk"]


def test_not_ready_and_junk_skipped(env: Env) -> None:
    qid = env.raw_maildrop([(b"S", b"a"), (b"R", b"b"), (b"M", b""), (b"X", b""), (b"E", b"")],
                           mode=0o600)
    Path(env.spool.queue_path("maildrop"), "junk").write_text("x")
    assert env.scan() == 0
    assert env.ls("maildrop") == sorted([qid, "junk"])
    os.chmod(env.spool.path("maildrop", qid), 0o744)
    assert env.scan() == 1 and env.ls("maildrop") == ["junk"]


@pytest.mark.parametrize("records,reason", [
    ([(b"S", b"a"), (b"R", b"b"), (b"M", b""), (b"X", b"")], "no E record"),
    ([(b"S", b"a"), (b"C", b"1 2"), (b"M", b""), (b"X", b""), (b"E", b"")],
     ": unexpected record type C in envelope segment: set aside"),
    ([(b"S", b"a"), (b"M", b""), (b"R", b"b"), (b"X", b""), (b"E", b"")],
     ": unexpected record type R in content segment: set aside"),
    ([(b"S", b"a"), (b"A", b"content_filter=x:y"), (b"M", b""), (b"X", b""), (b"E", b"")],
     ": unexpected attribute: content_filter: set aside"),
    ([(b"R", b"b"), (b"M", b""), (b"X", b""), (b"E", b"")], "no envelope sender"),
    ([(b"S", b"a"), (b"R", b"b"), (b"M", b""), (b"N", b"x" * 3000), (b"X", b""), (b"E", b"")],
     ": record type N length 3000 exceeds 2048: set aside"),
    ([(b"S", b"a"), (b"\x01", b"x" * 3000)], ": record type 1 length 3000 exceeds 2048"),
    ([(b"S", b"a"), (b"A", b"envelope_id=env id with space"), (b"R", b"b"), (b"M", b""),
      (b"X", b""), (b"E", b"")], "malformed envelope id"),
    ([(b"S", b"a"), (b"R", b"b\nc"), (b"M", b""), (b"X", b""), (b"E", b"")], "line break"),
    ([(b"S", b"a"), (b"R", b"b"), (b"M", b""), (b"X", b""), (b"E", b""), (b"N", b"")],
     "after the E"),
])
def test_bad_files_set_aside(env: Env, maillog: Path,
                             records: list[tuple[bytes, bytes]], reason: str) -> None:
    qid = env.raw_maildrop(records)
    assert env.scan() == 1
    assert env.ls("maildrop") == [] and env.ls("incoming") == []
    assert env.ls("corrupt") == [qid]
    err = maillog.read_text()
    assert f"warning: {qid}: uid={os.getuid()}: " in err and reason in err
    assert ": set aside" in err
    assert "b'" not in err and "[Errno" not in err


def test_truncated_length_and_garbage(env: Env) -> None:
    qid = env.raw_maildrop([])
    Path(env.spool.path("maildrop", qid)).write_bytes(b"S\xff\xff\xff\xff\xff\x01")
    qid2 = env.raw_maildrop([])
    Path(env.spool.path("maildrop", qid2)).write_bytes(os.urandom(64))
    assert env.scan() == 2
    assert env.ls("corrupt") == sorted([qid, qid2])


def test_oversize_bounced_with_headers_only(tmp_path: Path) -> None:
    e = Env(tmp_path, "message_size_limit = 100\n")
    e.raw_maildrop([(b"S", b"a@example.org"), (b"R", b"b@example.net"), (b"M", b""),
                    (b"N", b"Subject: big"), (b"N", b"")]
                   + [(b"N", b"y" * 50)] * 3 + [(b"X", b""), (b"E", b"")])
    assert e.scan() == 1 and e.ls("corrupt") == [] and e.ls("maildrop") == []
    [qid] = e.ls("incoming")
    with QueueFile.open(e.spool, "incoming", qid) as qf:
        assert qf.recipients == [] and qf.done_count == 1 and qf.ret == 2
        lines = list(qf.iter_lines())
    assert b"Subject: big" in lines and not any(b"yyy" in x for x in lines)
    [(rcpt, dsn)] = statuslog.read(e.spool, "bounce", qid)
    assert (rcpt.address, dsn.status, dsn.reason) == (
        "b@example.net", "5.3.4", "message file too big")


def test_no_recipients_returned_to_sender_not_lost(env: Env, maillog: Path) -> None:
    """A well-formed maildrop file that cleanup refuses (5.1.0: -t, no recipient in
    the headers) is queued with the recipient 'unknown' bounced, so the qmgr sends the
    non-delivery notice to the sender (Postfix cleanup_bounce)."""
    name = env.raw_maildrop([(b"S", b"alice"), (b"A", b"rewrite_context=local"),
                             (b"A", b"extract_recipients=1"), (b"M", b""),
                             (b"N", b"To: <>"), (b"N", b"Subject: lost?"), (b"N", b""),
                             (b"N", b"body"), (b"X", b""), (b"E", b"")])
    assert env.scan() == 1
    assert env.ls("maildrop") == [] and env.ls("corrupt") == []
    [qid] = env.ls("incoming")
    with QueueFile.open(env.spool, "incoming", qid) as qf:
        assert qf.sender == "alice@mx.example.org"
        assert qf.recipients == [] and qf.done_count == 1
        assert list(qf.iter_lines())[-2:] == [b"", b"body"]
    [(rcpt, dsn)] = statuslog.read(env.spool, "bounce", qid)
    assert (rcpt.address, dsn.status, dsn.action, dsn.reason) == (
        "unknown", "5.1.0", "failed", "no recipients specified")
    text = maillog.read_text()
    assert f"{qid}: to=<unknown>, relay=none, delay=" in text
    assert "dsn=5.1.0, status=bounced (no recipients specified)" in text
    assert f"{qid}: uid={os.getuid()} from=<alice>" in text
    assert "set aside" not in text and name not in text


def test_bounce_refused_too_sets_aside(env: Env, maillog: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> str:
        raise CleanupError("5.6.0", "line break or NUL byte in envelope data")

    monkeypatch.setattr(env.cleanup, "submit", refuse)
    monkeypatch.setattr(env.cleanup, "bounce", refuse)
    env.sendmail(["r@example.net"], b"x\n")
    [name] = env.ls("maildrop")
    assert env.scan() == 1 and env.ls("corrupt") == [name]
    assert (f"warning: {name}: uid={os.getuid()}: 5.6.0 line break or NUL byte in "
            "envelope data: set aside") in maillog.read_text()


def test_bounce_write_error_keeps_file(env: Env, maillog: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> str:
        raise CleanupError("5.1.0", "no recipients specified")

    def tempfail(*args: object, **kw: object) -> str:
        raise CleanupError("4.3.0", "queue file write error: No space left on device")

    monkeypatch.setattr(env.cleanup, "submit", refuse)
    monkeypatch.setattr(env.cleanup, "bounce", tempfail)
    env.sendmail(["r@example.net"], b"x\n")
    [name] = env.ls("maildrop")
    assert env.scan() == 0 and env.ls("maildrop") == [name] and env.ls("corrupt") == []
    assert (f"warning: {name}: error writing queue file: 4.3.0 queue file write error: "
            "No space left on device") in maillog.read_text()


def test_read_error_logged_with_strerror(env: Env, maillog: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kw: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    env.sendmail(["r@example.net"], b"x\n")
    [name] = env.ls("maildrop")
    monkeypatch.setattr(pickup, "read_maildrop", broken)
    assert env.scan() == 0 and env.ls("maildrop") == [name]
    text = maillog.read_text()
    assert f"warning: {env.spool.path('maildrop', name)}: read error: Input/output error" in text
    assert "[Errno" not in text


def test_cleanup_4xx_kept(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.sendmail(["r@example.net"], b"x\n")
    [name] = env.ls("maildrop")

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    assert not pickup_file(env.cfg, env.spool, env.cleanup, name)
    assert env.scan() == 0 and env.ls("maildrop") == [name] and env.ls("incoming") == []
    monkeypatch.undo()
    assert env.scan() == 1 and len(env.ls("incoming")) == 1


def wait_for(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_standalone_pickup_process(env: Env) -> None:
    fifo = env.spool.queue_path("public") + "/pickup"
    log = env.dir / "maillog"
    with open(env.dir / "main.cf", "a") as f:
        f.write(f"maillog_file = {log}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "transports.pickup", "-c", str(env.dir), "-n", "pickup",
         "-t", "fifo", "-l", fifo], cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: os.path.exists(fifo))
        deadline = time.monotonic() + 10
        while not env.ls("incoming") and time.monotonic() < deadline:
            err = io.StringIO()
            assert sendmail_run(["-c", str(env.dir), "r@example.net"],
                                io.BytesIO(b"Subject: s\n\nx\n"), err) == 0
            wait_for(lambda: env.ls("incoming"), 2.0)
        assert env.ls("incoming"), proc.stderr
        assert wait_for(lambda: "from=<" in log.read_text())
        assert "qmgrd/pickup[" in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()


def test_a_header_over_header_size_limit_is_cut(tmp_path: Path, maillog: Path) -> None:
    """Locally submitted mail gets Postfix's header_size_limit as SMTP mail does: the
    excess of a long header is dropped (the rest of the message is kept)."""
    e = Env(tmp_path, "header_size_limit = 200\n")
    e.sendmail(["-i", "bob@example.net"],
               b"X-Long: " + b"a" * 150 + b"\n " + b"b" * 150 + b"\nSubject: kept\n\nbody\n")
    assert e.scan() == 1
    [qid] = e.ls("incoming")
    with QueueFile.open(e.spool, "incoming", qid) as qf:
        lines = list(qf.iter_lines())
    long = [x for x in lines if x.startswith(b"X-Long:")]
    assert long == [b"X-Long: " + b"a" * 150], long
    assert b" " + b"b" * 41 in lines, lines
    assert b"Subject: kept" in lines and lines[-1] == b"body"
    assert f"{qid}: 1 header(s) longer than header_size_limit (200) truncated" in \
        maillog.read_text()


def test_a_stop_ends_the_scan_after_the_file_in_hand(env: Env) -> None:
    """qmgr-master stop (SIGTERM) during a long scan: pickup stops taking files at once,
    as Postfix's does; the rest waits in maildrop/ for the next start, none lost."""
    for i in range(5):
        env.sendmail([f"r{i}@example.net"], b"Subject: s\n\nx\n")
    asked: list[int] = []

    def stopping() -> bool:
        asked.append(len(env.ls("incoming")))
        return len(asked) > 2  # stop when asked before the third file

    assert pickup_scan(env.cfg, env.spool, env.cleanup, stopping) == 2
    assert asked == [0, 1, 2]
    assert len(env.ls("maildrop")) == 3 and len(env.ls("incoming")) == 2
    assert env.scan() == 3
    assert env.ls("maildrop") == [] and len(env.ls("incoming")) == 5


def test_sigterm_sets_the_stop_flag_a_long_trigger_handler_looks_at(env: Env) -> None:
    from master.server.skeleton import ServerContext, _Loop

    ctx = ServerContext(service="pickup", config=env.cfg, queue_directory=str(env.dir / "q"),
                        listen_fds=[], generation=0, args=[], status_fd=None)
    loop = _Loop(ctx)
    assert not ctx.terminating
    loop._record(signal.SIGTERM, None)  # the handler pickup's scan runs under
    assert loop.terminate and ctx.terminating
    assert ctx._stopping is None  # no asyncio.Event made: a synchronous server
