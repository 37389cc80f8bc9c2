"""Tests for qmgrd.spool.queue.Spool: layout, hashing, create, move, scan."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qmgrd.spool.queue import QUEUES, Spool
from qmgrd.spool.queueid import hash_dir, hash_dir_of_valid, valid_id


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    sp = Spool(str(tmp_path / "q"))
    sp.make_dirs()
    return sp


def test_make_dirs_modes(spool: Spool) -> None:
    for q in QUEUES:
        assert os.path.isdir(spool.queue_path(q))
    assert stat.S_IMODE(os.stat(spool.queue_path("maildrop")).st_mode) == 0o730
    assert stat.S_IMODE(os.stat(spool.queue_path("incoming")).st_mode) == 0o700
    spool.make_dirs()  # idempotent


def test_paths_hashing_and_validation(spool: Spool) -> None:
    qid = "4SVLCh0sf8z9HdB"
    assert spool.path("incoming", qid) == os.path.join(spool.queue_directory, "incoming", qid)
    assert spool.path("deferred", qid) == os.path.join(
        spool.queue_directory, "deferred", "1", qid)
    assert spool.path("defer", qid).endswith("/defer/1/" + qid)
    deep = Spool(spool.queue_directory, ["Deferred"], 2)
    assert deep.path("deferred", qid).endswith("/deferred/1/E/" + qid)
    assert deep.path("defer", qid).endswith("/defer/" + qid)
    for bad in ("../x", "4SVLCh0sf8z9HdB/../../x", ""):
        with pytest.raises(ValueError):
            spool.path("incoming", bad)
    with pytest.raises(ValueError):
        spool.path("etc", qid)


def test_create_is_embryonic_and_unique(spool: Spool) -> None:
    ids = set()
    for _ in range(50):
        f, qid, path = spool.create("incoming")
        with f:
            f.write(b"x")
        assert valid_id(qid) and qid not in ids
        ids.add(qid)
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and not Spool.is_ready(st)
        assert path == spool.path("incoming", qid)
    assert sorted(os.listdir(spool.queue_path("incoming"))) == sorted(ids)  # no temp names
    assert list(spool.scan("incoming")) == []


def test_move_makes_hash_dirs_and_scan_recurses(spool: Spool) -> None:
    f, qid, path = spool.create("incoming")
    f.close()
    os.chmod(path, 0o700)
    assert list(spool.scan("incoming")) == [qid]
    new = spool.move(qid, "incoming", "deferred")
    assert new == spool.path("deferred", qid)
    assert os.path.basename(os.path.dirname(new)) == hash_dir(qid, 1)[0]
    assert list(spool.scan("deferred")) == [qid]
    assert list(spool.scan("incoming")) == []
    # junk is ignored by scan
    Path(spool.queue_path("deferred"), "junk.txt").write_text("x")
    os.mkdir(os.path.join(spool.queue_path("deferred"), "longname"))
    assert list(spool.scan("deferred")) == [qid]
    with pytest.raises(FileNotFoundError):
        spool.move(qid, "incoming", "active")
    assert spool.remove("deferred", qid) and not spool.remove("deferred", qid)


def test_scan_names_only_includes_files_still_being_written(spool: Spool) -> None:
    """ready_only=False yields every valid name (no stat: the qmgr's feed checks the mode
    itself); the default yields complete files only."""
    done, qdone, pdone = spool.create("incoming")
    done.close()
    os.chmod(pdone, 0o700)
    busy, qbusy, _ = spool.create("incoming")
    busy.close()
    Path(spool.queue_path("incoming"), "junk.txt").write_text("x")
    assert list(spool.scan("incoming")) == [qdone]
    assert sorted(spool.scan("incoming", ready_only=False)) == sorted([qdone, qbusy])


def test_path_hashing_matches_hash_dir(spool: Spool) -> None:
    for _ in range(20):
        f, qid, _ = spool.create("incoming")
        f.close()
        assert hash_dir_of_valid(qid, 3) == hash_dir(qid, 3)
        assert spool.path("deferred", qid) == os.path.join(
            spool.queue_path("deferred"), *hash_dir(qid, 1), qid)
        assert spool.path("incoming", qid) == os.path.join(spool.queue_path("incoming"), qid)


def test_scan_missing_queue_dir(tmp_path: Path) -> None:
    assert list(Spool(str(tmp_path / "none")).scan("incoming")) == []


def test_is_ready_modes() -> None:
    class St:
        def __init__(self, mode: int) -> None:
            self.st_mode = stat.S_IFREG | mode

    assert Spool.is_ready(St(0o700))  # type: ignore[arg-type]
    assert Spool.is_ready(St(0o744))  # type: ignore[arg-type]
    assert not Spool.is_ready(St(0o600))  # type: ignore[arg-type]
    assert not Spool.is_ready(St(0o400))  # type: ignore[arg-type]
