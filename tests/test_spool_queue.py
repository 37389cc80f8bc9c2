"""Tests for qmgrd.spool.queue.Spool: layout, hashing, create, move, scan."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from master.config import Config, ConfigError
from master.config.params import PARAMS
from qmgrd.ctl.cli import cli
from qmgrd.spool.queue import MAX_HASH_DEPTH, QUEUES, Spool
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
    """scan_paths yields every valid name (no stat: the qmgr's feed checks the mode
    itself); scan yields complete files only."""
    done, qdone, pdone = spool.create("incoming")
    done.close()
    os.chmod(pdone, 0o700)
    busy, qbusy, _ = spool.create("incoming")
    busy.close()
    Path(spool.queue_path("incoming"), "junk.txt").write_text("x")
    assert list(spool.scan("incoming")) == [qdone]
    assert sorted(q for q, _ in spool.scan_paths("incoming")) == sorted([qdone, qbusy])


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


# ------------------------------------------------------------------ hash_queue_depth range

def test_the_parameter_table_and_spool_agree_on_the_depth_range() -> None:
    assert (PARAMS["hash_queue_depth"].min, PARAMS["hash_queue_depth"].max) == (
        1, MAX_HASH_DEPTH)
    Spool("/nonexistent", hash_queue_depth=MAX_HASH_DEPTH)
    with pytest.raises(ValueError):
        Spool("/nonexistent", hash_queue_depth=MAX_HASH_DEPTH + 1)


@pytest.mark.parametrize("value,what", [("11", "maximum is 10"), ("16", "maximum is 10"),
                                        ("0", "minimum is 1")])
def test_a_depth_out_of_range_is_a_config_error_with_its_line(tmp_path: Path, value: str,
                                                              what: str) -> None:
    (tmp_path / "main.cf").write_text(f"queue_directory = /var/spool/qmgrd\n"
                                      f"hash_queue_depth = {value}\n")
    cfg = Config.load(str(tmp_path))
    want = (f'{tmp_path}/main.cf, line 2: invalid hash_queue_depth parameter value '
            f'"{value}": {what}')
    for check in (cfg.check, lambda: Spool.from_config(cfg)):
        with pytest.raises(ConfigError) as ei:
            check()
        assert str(ei.value) == want
    # and what builds a Spool from it says so instead of crashing (qmgr-ctl: EX_CONFIG)
    res = CliRunner().invoke(cli, ["-c", str(tmp_path), "list"])
    assert (res.exit_code, res.stdout, res.stderr) == (78, "", f"qmgr-ctl: fatal: {want}\n")


def test_scan_paths_gives_where_each_name_was_found(spool: Spool) -> None:
    """scan_paths yields (qid, path) - the actual path, also for a file in the hash
    directory of other settings - and move(src_path=) takes the file from there."""
    f, qid, path = spool.create("incoming")
    f.close()
    os.chmod(path, 0o700)
    old = Spool(spool.queue_directory, hash_queue_depth=3)  # earlier settings
    misplaced = old.move(qid, "incoming", "deferred")
    assert misplaced != spool.path("deferred", qid)
    assert list(spool.scan_paths("deferred")) == [(qid, misplaced)]
    assert spool.move(qid, "deferred", "active", src_path=misplaced) == spool.path("active", qid)
    assert list(spool.scan_paths("active")) == [(qid, spool.path("active", qid))]
    assert list(spool.scan_paths("deferred")) == []
