"""Tests for qmgrd.spool.statuslog: Postfix bounce/defer/trace log entries."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from master import log
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import Recipient
from qmgrd.spool.queue import Spool
from qmgrd.spool.statuslog import Dsn, format_entry, quote_822_local

QID = "4SVLCh0sf8z9HdB"

REFERENCE = (
    "\n<bob@example.net>: host mx.example.net[192.0.2.1] said: 450 4.2.0 try later\n"
    "recipient=bob@example.net\noriginal_recipient=alias@example.net\noffset=254\n"
    "dsn_orig_rcpt=rfc822;bob@example.net\nnotify_flags=8\nstatus=4.2.0\naction=delayed\n"
    "diag_type=smtp\ndiag_text=450 4.2.0 try later\nmta_type=dns\nmta_mname=mx.example.net\n"
    "reason=host mx.example.net[192.0.2.1] said: 450 4.2.0 try later\n\n"
)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    sp = Spool(str(tmp_path / "q"))
    sp.make_dirs()
    return sp


def ref_pair() -> tuple[Recipient, Dsn]:
    reason = "host mx.example.net[192.0.2.1] said: 450 4.2.0 try later"
    return (Recipient("bob@example.net", "alias@example.net", "rfc822;bob@example.net", 8, 254),
            Dsn("4.2.0", "delayed", reason, "smtp", "450 4.2.0 try later", "dns",
                "mx.example.net"))


@pytest.fixture
def maillog(tmp_path: Path) -> Iterator[Path]:
    """Send master.log lines to a file for this test (whatever other tests set up)."""
    path = tmp_path / "maillog"
    log.setup("test", str(path))
    try:
        yield path
    finally:
        log.close()


def test_reference_format() -> None:
    assert format_entry(*ref_pair()).decode() == REFERENCE


def test_optional_fields_omitted() -> None:
    text = format_entry(Recipient("", "", "", 0, 0),
                        Dsn("5.1.1", "failed", "bad\nline", "smtp", "", "dns", "")).decode()
    assert text == "\n<>: bad?line\nrecipient=<>\nstatus=5.1.1\naction=failed\nreason=bad?line\n\n"
    same = format_entry(Recipient("a@x", "A@X"), Dsn("2.0.0", "delivered", "ok")).decode()
    assert "original_recipient" not in same


def test_quote_822_local() -> None:
    assert quote_822_local("bob@example.net") == "bob@example.net"
    assert quote_822_local("a b@example.net") == '"a b"@example.net'
    assert quote_822_local('x"y@h') == '"x\\"y"@h'
    assert quote_822_local(".x@h") == '".x"@h'
    assert quote_822_local("jörg@h") == "jörg@h"


def test_append_read_hashed_defer(spool: Spool) -> None:
    rcpt, dsn = ref_pair()
    statuslog.append(spool, "defer", QID, rcpt, dsn)
    statuslog.append(spool, "defer", QID, Recipient("c@example.org", offset=300),
                     Dsn("4.4.1", "delayed", "connect refused"))
    path = spool.path("defer", QID)
    assert path.endswith("/defer/1/" + QID)
    assert Path(path).read_text().startswith(REFERENCE)
    assert os.stat(path).st_mode & 0o777 == 0o600
    got = statuslog.read(spool, "defer", QID)
    assert got[0] == (rcpt, dsn)
    assert got[1][0] == Recipient("c@example.org", "", "", 0, 300)
    assert got[1][1] == Dsn("4.4.1", "delayed", "connect refused")
    assert statuslog.read(spool, "bounce", QID) == []
    assert statuslog.remove(spool, "defer", QID) and not statuslog.remove(spool, "defer", QID)
    with pytest.raises(ValueError):
        statuslog.append(spool, "mailbox", QID, rcpt, dsn)
    with pytest.raises(ValueError):
        statuslog.read(spool, "defer", "../x")


def test_read_tolerates_garbage(spool: Spool, maillog: Path) -> None:
    good = format_entry(Recipient("a@x", offset=5), Dsn("5.0.0", "failed", "no"))
    data = (b"garbage without equals\n\nstatus=4.0.0\naction=x\n\n" + good
            + b"\nrecipient=b@x\noffset=notanumber\n\n\xff\xfe=\x00\nrecipient=c@x\n")
    Path(spool.path("bounce", QID)).write_bytes(data)
    got = statuslog.read(spool, "bounce", QID)
    assert [r.address for r, _ in got] == ["a@x", "c@x"]
    err = maillog.read_text()
    assert "malformed log line" in err and "without recipient" in err and "bad offset" in err


def test_append_failure_truncates(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    rcpt, dsn = ref_pair()
    statuslog.append(spool, "bounce", QID, rcpt, dsn)
    size = os.path.getsize(spool.path("bounce", QID))

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        statuslog.append(spool, "bounce", QID, rcpt, dsn)
    assert os.path.getsize(spool.path("bounce", QID)) == size


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")
def test_root_writer_gives_log_to_queue_owner(spool: Spool) -> None:
    """The local agent runs as root: its defer/bounce logs (and new hash directories)
    must belong to the queue's owner, or the qmgr and bounce service cannot read them."""
    nobody = 65534
    for name in ("defer", "bounce"):
        os.chown(spool.queue_path(name), nobody, nobody)
    qid = "4SVLCh0sf8z9HdB"
    for name in ("defer", "bounce"):
        statuslog.append(spool, name, qid, Recipient("a@b.example"), Dsn("4.0.0", "delayed", "x"))
        path = spool.path(name, qid)
        assert (os.stat(path).st_uid, os.stat(path).st_gid) == (nobody, nobody)
        d = os.path.dirname(path)
        assert os.stat(d).st_uid == nobody


def test_a_symlinked_log_is_never_written_or_read_through(tmp_path: Path) -> None:
    """A symbolic link under a queue id's name in defer/ is not followed (the local
    agent appends as root): the append fails with ELOOP, the target is untouched."""
    spool = Spool(str(tmp_path / "q"), hash_queue_depth=0)
    spool.make_dirs()
    f, qid, _ = spool.create("incoming")
    f.close()
    target = tmp_path / "target"
    target.write_bytes(b"")
    os.symlink(target, spool.path("defer", qid))
    with pytest.raises(OSError) as info:
        statuslog.append(spool, "defer", qid, Recipient("a@example.net"),
                         Dsn("4.0.0", "delayed", "later"))
    assert info.value.errno == errno.ELOOP
    with pytest.raises(OSError):
        statuslog.read(spool, "defer", qid)
    assert target.read_bytes() == b""
