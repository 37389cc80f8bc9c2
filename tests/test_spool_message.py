"""Tests for qmgrd.spool.message.QueueFile: reading, locking, in-place updates, corruption."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from master.config import Config
from qmgrd.qmgr.qfile import ActiveFile
from qmgrd.spool import records as R
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.message import (
    CorruptQueueFile,
    QueueFile,
    QueueFileError,
    QueueFileLocked,
    QueueFileNotReady,
)
from qmgrd.spool.queue import Spool
from qmgrd.spool.records import encode, size_payload


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Cleanup, Spool]:
    cfg = Config.from_text(f"queue_directory = {tmp_path}/q\nmyhostname = h.example\n",
                           str(tmp_path))
    spool = Spool.from_config(cfg)
    spool.make_dirs()
    return Cleanup(cfg, spool), spool


def submit(c: Cleanup, n: int = 2, content: bytes = b"Subject: s\n\nbody\n") -> str:
    rcpts = [Recipient(f"u{i}@example.net", notify=2 if i % 2 else 0) for i in range(n)]
    return c.submit(Envelope("s@example.org", rcpts), content, origin="smtp")


def write_raw(spool: Spool, records: list[tuple[bytes, bytes]], mode: int = 0o700) -> str:
    f, qid, path = spool.create("incoming")
    with f:
        f.write(b"".join(encode(t, d) for t, d in records))
    os.chmod(path, mode)
    return qid


def good_records(data_size: int | None = None) -> list[tuple[bytes, bytes]]:
    body = [(b"T", b"1 2"), (b"S", b"a@b"), (b"R", b"c@d"), (b"M", b"")]
    return with_size(body + [(b"N", b"hi"), (b"X", b""), (b"E", b"")], data_size)


def with_size(recs: list[tuple[bytes, bytes]],
              data_size: int | None = None) -> list[tuple[bytes, bytes]]:
    """Prefix a correct C record (data_offset after M, data_size up to X)."""
    pos = R.SIZE_RECORD_LEN
    off = ds = 0
    for t, d in recs:
        if t == b"X" and off:
            ds = pos - off
        pos += len(encode(t, d))
        if t == b"M":
            off = pos
    ds = ds if data_size is None else data_size
    return [(b"C", size_payload(ds, off, 1, 0, ds, 0))] + recs


def test_good_raw_file(setup: tuple[Cleanup, Spool]) -> None:
    _, spool = setup
    qid = write_raw(spool, good_records())
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert (qf.sender, qf.arrival, qf.create_time) == ("a@b", (1, 2), 1)
        assert [r.address for r in qf.recipients] == ["c@d"]
        assert list(qf.iter_lines()) == [b"hi"]
        assert qf.content_size == 4 and qf.data_offset == 114


@pytest.mark.parametrize("mutate,reason", [
    (lambda r: r[1:], "first record"),
    (lambda r: r[:-1], "premature end"),
    (lambda r: [x for x in r if x[0] != b"T"], "missing T"),
    (lambda r: [x for x in r if x[0] != b"S"], "missing S"),
    (lambda r: r[:2] + [(b"N", b"x")] + r[2:], "unexpected record type"),
    (lambda r: r[:6] + [(b"T", b"1")] + r[6:], "unexpected record type"),
    (lambda r: r[:7] + [(b"N", b"x")] + r[7:], "unexpected record type"),
    (lambda r: [(b"C", b"1 x")] + r[1:], "bad size"),
    (lambda r: [(b"C", b"0 117")] + r[1:], "bad size"),
    (lambda r: [(b"C", size_payload(4, 117, 1, 0x20))] + r[1:], "flags"),
    (lambda r: r[:1] + [(b"T", b"soon")] + r[2:], "arrival time"),
    (lambda r: r[:3] + [(b"A", b"noequals")] + r[3:], "attribute"),
])
def test_corrupt_files(setup: tuple[Cleanup, Spool], mutate: object, reason: str) -> None:
    _, spool = setup
    recs = mutate(good_records())  # type: ignore[operator]
    if recs and recs[0][0] == b"C" and reason not in ("bad size", "flags"):
        recs = with_size(recs[1:])
    qid = write_raw(spool, recs)
    with pytest.raises(CorruptQueueFile, match=reason), \
            QueueFile.open(spool, "incoming", qid) as qf:
        list(qf.iter_lines())


def test_data_size_must_land_on_x(setup: tuple[Cleanup, Spool]) -> None:
    _, spool = setup
    qid = write_raw(spool, good_records(data_size=3))
    with pytest.raises(CorruptQueueFile, match="does not land on X"):
        QueueFile.open(spool, "incoming", qid)


def test_truncated_file(setup: tuple[Cleanup, Spool]) -> None:
    c, spool = setup
    qid = submit(c)
    path = spool.path("incoming", qid)
    size = os.path.getsize(path)
    for cut in (size - 1, size - 3, 150, 96, 1):
        os.truncate(path, cut)
        with pytest.raises(CorruptQueueFile):
            QueueFile.open(spool, "incoming", qid)


def test_not_ready_and_locks(setup: tuple[Cleanup, Spool]) -> None:
    c, spool = setup
    qid = submit(c)
    path = spool.path("incoming", qid)
    with QueueFile.open(spool, "incoming", qid, lock="sh"):
        with QueueFile.open(spool, "incoming", qid, lock="sh"):
            pass
        with pytest.raises(QueueFileLocked):
            QueueFile.open(spool, "incoming", qid, lock="ex")
        QueueFile.open(spool, "incoming", qid, lock=None, readonly=True).close()
    QueueFile.open(spool, "incoming", qid, lock="ex").close()
    os.chmod(path, 0o600)
    with pytest.raises(QueueFileNotReady):
        QueueFile.open(spool, "incoming", qid)
    with pytest.raises(ValueError):
        QueueFile.open(spool, "incoming", "../../etc/passwd")
    with pytest.raises(FileNotFoundError):
        QueueFile.open(spool, "active", qid)


def test_mark_done_and_corrupt(setup: tuple[Cleanup, Spool]) -> None:
    c, spool = setup
    qid = submit(c, 3)
    with QueueFile.open(spool, "incoming", qid, lock="sh") as qf:
        r0, r1, _ = qf.recipients
        qf.mark_done(r1.offset)
        qf.mark_done(r1.offset)  # already done: no-op
        with pytest.raises(CorruptQueueFile, match="expected R"):
            qf.mark_done(r0.offset - 1)
        with pytest.raises(QueueFileError):
            qf.set_warn_done()  # no W record without delay_warning_time
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert [r.address for r in qf.recipients] == ["u0@example.net", "u2@example.net"]
        assert (qf.undone_count, qf.done_count, qf.rcpt_count) == (2, 1, 3)
        qf.mark_corrupt()
    with pytest.raises(QueueFileNotReady):
        QueueFile.open(spool, "incoming", qid)


def test_recipient_batches(setup: tuple[Cleanup, Spool]) -> None:
    c, spool = setup
    qid = submit(c, 7)
    with QueueFile.open(spool, "incoming", qid, rcpt_limit=3) as qf:
        assert [r.address for r in qf.recipients] == [f"u{i}@example.net" for i in range(3)]
        assert qf.undone_count == 7 and qf.has_more_recipients
        qf.mark_done(qf.recipients[0].offset)
        b2 = qf.read_recipients(3)
        assert [(r.address, r.notify) for r in b2] == [
            ("u3@example.net", 2), ("u4@example.net", 0), ("u5@example.net", 2)]
        qf.mark_done(b2[0].offset)
        assert [r.address for r in qf.read_recipients(3)] == ["u6@example.net"]
        assert not qf.has_more_recipients and qf.read_recipients(3) == []
        assert list(qf.iter_lines())[-1] == b"body"


def test_extracted_segment_recipients(setup: tuple[Cleanup, Spool]) -> None:
    _, spool = setup
    recs = good_records()[1:]
    recs = recs[:6] + [(b"A", b"notify_flags=4"), (b"O", b"orig@x"), (b"R", b"late@x"),
                       (b"D", b"gone@x")] + recs[6:]
    qid = write_raw(spool, with_size(recs))
    with QueueFile.open(spool, "incoming", qid, rcpt_limit=1) as qf:
        assert [r.address for r in qf.recipients] == ["c@d"]
        more = qf.read_recipients(10)
        assert [(r.address, r.orig_rcpt, r.notify) for r in more] == [("late@x", "orig@x", 4)]
        assert qf.done_count == 1


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_random_bytes_only_corrupt(setup: tuple[Cleanup, Spool], data: bytes) -> None:
    _, spool = setup
    f, qid, path = spool.create("incoming")
    with f:
        f.write(data)
    os.chmod(path, 0o700)
    try:
        with QueueFile.open(spool, "incoming", qid) as qf:
            list(qf.iter_lines())
            qf.read_recipients(5)
    except CorruptQueueFile:
        pass
    finally:
        os.unlink(path)


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4))
def test_mutated_files_only_corrupt(setup: tuple[Cleanup, Spool],
                                    flips: list[tuple[int, int]]) -> None:
    c, spool = setup
    qid = submit(c, 2)
    path = spool.path("incoming", qid)
    data = bytearray(Path(path).read_bytes())
    for pos, val in flips:
        data[pos % len(data)] = val
    Path(path).write_bytes(bytes(data))
    try:
        with QueueFile.open(spool, "incoming", qid) as qf:
            list(qf.iter_lines())
            qf.read_recipients(5)
    except CorruptQueueFile:
        pass
    finally:
        os.unlink(path)


def test_record_constants() -> None:
    assert R.REC_SIZE == b"C" and R.REC_DONE == b"D" and R.REC_END == b"E"


def test_symlink_or_fifo_is_a_damaged_queue_file(setup: tuple[Cleanup, Spool]) -> None:
    """Queue files are regular files (Postfix's mail_open_ok): a symbolic link under a
    queue id's name is never followed - the qmgr, agents and tools would read or lock
    its target - and a FIFO never blocks the open; both are CorruptQueueFile, what
    every caller already does with a damaged file."""
    c, spool = setup
    qid = submit(c)
    path = spool.path("incoming", qid)
    target = path + ".target"
    os.rename(path, target)  # a good, ready queue file, reached only through the link
    os.symlink(target, path)
    for readonly in (False, True):
        with pytest.raises(CorruptQueueFile, match=r"not a regular file \(symbolic link\)"):
            QueueFile.open(spool, "incoming", qid, lock="ex", readonly=readonly)
    with pytest.raises(CorruptQueueFile, match="symbolic link"):
        ActiveFile.reopen(spool, "incoming", qid, 1, 1, 1)
    os.unlink(path)
    os.mkfifo(path, 0o700)
    with pytest.raises(CorruptQueueFile, match="not a regular file"):
        QueueFile.open(spool, "incoming", qid, readonly=True)
