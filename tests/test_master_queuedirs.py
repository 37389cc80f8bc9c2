"""The queue tree check (master.daemon.queuedirs, ``qmgr-master check``): directories are
created with their owners and modes, wrong ones are fixed and reported, leftover queue
files are handed to mail_owner, and the reachability test.  Owner changes need root (any
uid will do, the account need not exist); the modes are checked for every user."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from master.daemon.queuedirs import QUEUE_DIRS, check_queue_dirs, unreachable_by
from master.server.jail import Owner

ROOT = os.geteuid() == 0
as_root = pytest.mark.skipif(not ROOT, reason="chown needs root")
OWNER = Owner("mailer", 4321, 4322, True)
MODES = {"maildrop": 0o1733, "public": 0o755, "pid": 0o755, "private": 0o700,
         "incoming": 0o700, "active": 0o700, "deferred": 0o700, "hold": 0o700,
         "corrupt": 0o700, "bounce": 0o700, "defer": 0o700, "trace": 0o700,
         "flush": 0o700, "saved": 0o700}



def me() -> Owner:
    return Owner("me", os.geteuid(), os.getegid(), False)


def tree(q: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for p in q.iterdir():
        st = p.stat()
        out[p.name] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return out


def test_table_matches_the_documented_layout() -> None:
    assert {name: mode for name, (mode, _) in QUEUE_DIRS.items()} == MODES
    assert [name for name, (_, by_owner) in QUEUE_DIRS.items() if not by_owner] == ["pid"]


def test_creates_everything_with_modes_as_the_invoking_user(base: Path) -> None:
    q, data = base / "spool" / "q", base / "lib" / "data"
    (base / "spool").mkdir()  # only the directories themselves are made, in their parents
    (base / "lib").mkdir()
    changes = check_queue_dirs(str(q), str(data), me())
    assert len(changes) == 16 and all(c.startswith("created ") for c in changes)
    assert {name: mode for name, (mode, _, _) in tree(q).items()} == MODES
    assert stat.S_IMODE(q.stat().st_mode) == 0o755
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    uid = os.geteuid()
    assert all(owner == uid for _, owner, _ in tree(q).values())
    assert check_queue_dirs(str(q), str(data), me()) == []  # idempotent, silent


def test_fixes_wrong_modes_and_reports(base: Path) -> None:
    q = base / "q"
    check_queue_dirs(str(q), str(base / "data"), me())
    os.chmod(q / "maildrop", 0o777)
    os.chmod(q / "active", 0o755)
    os.chmod(q, 0o700)
    changes = check_queue_dirs(str(q), str(base / "data"), me())
    assert sorted(changes) == sorted([
        f"fixed {q}: mode 0700 -> 0755",
        f"fixed {q / 'maildrop'}: mode 0777 -> 1733",
        f"fixed {q / 'active'}: mode 0755 -> 0700"])
    assert {name: mode for name, (mode, _, _) in tree(q).items()} == MODES


def test_a_file_in_the_way_is_an_error(base: Path) -> None:
    q = base / "q"
    q.mkdir()
    (q / "active").write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        check_queue_dirs(str(q), "", me())


@as_root
def test_owners_as_root(base: Path) -> None:
    q, data = base / "q", base / "data"
    check_queue_dirs(str(q), str(data), OWNER)
    got = tree(q)
    for name, (mode, uid, gid) in got.items():
        want = (0, 0) if name == "pid" else (OWNER.uid, OWNER.gid)
        assert (uid, gid) == want, name
    assert (q.stat().st_uid, q.stat().st_gid) == (0, 0)
    assert (data.stat().st_uid, data.stat().st_gid) == (OWNER.uid, OWNER.gid)


@as_root
def test_fixes_owners_and_hands_leftover_files_to_mail_owner(base: Path) -> None:
    q = base / "q"
    check_queue_dirs(str(q), str(base / "data"), OWNER)
    os.chown(q / "incoming", 0, 0)
    os.chown(q / "pid", OWNER.uid, OWNER.gid)
    os.chown(q, OWNER.uid, 0)
    (q / "deferred" / "A").mkdir()
    (q / "deferred" / "A" / "4SVLCh0sf8z9HdB").write_text("queue file of a root run")
    (q / "active" / "4SVLCh0sf8z9HdC").write_text("another")
    (q / "maildrop" / "4SVLCh0sf8z9HdD").write_text("a user's submission")
    changes = check_queue_dirs(str(q), str(base / "data"), OWNER)
    assert f"fixed {q}: owner {OWNER.uid}:0 -> 0:0" in changes
    assert f"fixed {q / 'incoming'}: owner 0:0 -> {OWNER.uid}:{OWNER.gid}" in changes
    assert f"fixed {q / 'pid'}: owner {OWNER.uid}:{OWNER.gid} -> 0:0" in changes
    assert f"fixed {q / 'deferred'}: 2 entries handed to mailer" in changes
    assert f"fixed {q / 'active'}: 1 entries handed to mailer" in changes
    assert (q / "deferred" / "A" / "4SVLCh0sf8z9HdB").stat().st_uid == OWNER.uid
    assert (q / "maildrop" / "4SVLCh0sf8z9HdD").stat().st_uid == 0  # the submitter's
    assert len(changes) == 5


def test_unreachable_by(base: Path) -> None:
    inner = base / "a" / "b"
    inner.mkdir(parents=True)
    os.chmod(base / "a", 0o700)
    uid, gid = 4321, 4322
    assert unreachable_by(str(inner), uid, gid) == str(base / "a")
    os.chmod(base / "a", 0o711)
    assert unreachable_by(str(inner), uid, gid) is None
    os.chmod(base / "a", 0o750)
    assert unreachable_by(str(inner), uid, gid) == str(base / "a")
    assert unreachable_by(str(base / "missing"), uid, gid) == str(base / "missing")


def test_a_mistyped_queue_directory_is_refused_not_created(tmp_path: Path) -> None:
    """A missing queue directory is made only inside an existing parent: a typo in the
    path must not become a new, empty queue (Postfix refuses to start without one)."""
    wrong = tmp_path / "no-such-dir" / "spool"
    with pytest.raises(FileNotFoundError, match="parent directory .*no-such-dir does not"):
        check_queue_dirs(str(wrong), str(tmp_path / "data"), me())
    assert not (tmp_path / "no-such-dir").exists()
    with pytest.raises(FileNotFoundError, match="data_directory"):
        check_queue_dirs(str(tmp_path / "q"), str(tmp_path / "nope" / "data"), me())
    assert not (tmp_path / "nope").exists()
