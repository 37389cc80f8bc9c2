"""Tests for transports.pickup: maildrop/ -> cleanup -> incoming/."""

from __future__ import annotations

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
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from qmgrd.spool.records import encode
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


def test_extract_recipients(env: Env) -> None:
    env.sendmail(["-t"], b"To: a@example.net\nBcc: b@example.net\nSubject: s\n\nx\n")
    assert env.scan() == 1
    [qid] = env.ls("incoming")
    with QueueFile.open(env.spool, "incoming", qid) as qf:
        assert [r.address for r in qf.recipients] == ["a@example.net", "b@example.net"]
        assert not any(x.startswith(b"Bcc") for x in qf.iter_lines())


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
     "unexpected record type b'C' in envelope"),
    ([(b"S", b"a"), (b"M", b""), (b"R", b"b"), (b"X", b""), (b"E", b"")],
     "unexpected record type b'R' in content"),
    ([(b"S", b"a"), (b"A", b"content_filter=x:y"), (b"M", b""), (b"X", b""), (b"E", b"")],
     "unexpected attribute"),
    ([(b"R", b"b"), (b"M", b""), (b"X", b""), (b"E", b"")], "no envelope sender"),
    ([(b"S", b"a"), (b"R", b"b"), (b"M", b""), (b"N", b"x" * 3000), (b"X", b""), (b"E", b"")],
     "exceeds"),
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


def test_truncated_length_and_garbage(env: Env) -> None:
    qid = env.raw_maildrop([])
    Path(env.spool.path("maildrop", qid)).write_bytes(b"S\xff\xff\xff\xff\xff\x01")
    qid2 = env.raw_maildrop([])
    Path(env.spool.path("maildrop", qid2)).write_bytes(os.urandom(64))
    assert env.scan() == 2
    assert env.ls("corrupt") == sorted([qid, qid2])


def test_oversize_set_aside(tmp_path: Path) -> None:
    e = Env(tmp_path, "message_size_limit = 100\n")
    qid = e.raw_maildrop([(b"S", b"a"), (b"R", b"b"), (b"M", b"")]
                         + [(b"N", b"y" * 50)] * 3 + [(b"X", b""), (b"E", b"")])
    assert e.scan() == 1 and e.ls("corrupt") == [qid]


def test_cleanup_5xx_set_aside_4xx_kept(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.sendmail(["-t"], b"Subject: no recipients\n\nx\n")
    [name] = env.ls("maildrop")
    assert env.scan() == 1 and env.ls("corrupt") == [name]
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
