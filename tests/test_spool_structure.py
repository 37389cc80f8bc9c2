"""Queue structure repair (qmgrd.spool.structure, Postfix's postsuper -s): files left in
the hash directories of an earlier hash_queue_names/hash_queue_depth are moved where
Spool.path() looks for them, so that the qmgr delivers them again; a file whose place is
taken, names that are not queue ids, and maildrop are left alone. qmgr-ctl repair runs it
for the operator."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from master import log
from master.config import Config
from qmgrd.ctl.cli import EX_IOERR, EX_NOPERM, EX_OK, EX_TEMPFAIL, cli
from qmgrd.qmgr.scheduler import Scheduler
from qmgrd.spool import structure
from qmgrd.spool.queue import Spool
from qmgrd.spool.queueid import new_long_id
from tests.harness import PY, REPO
from tests.test_qmgr_scheduler import Env, FakeAgents, defer_reasons, drain, make_cfg

# five ids whose hex microseconds (the hash directories) all differ
IDS = [new_long_id(1700000000, 0x1E240 + i * 0x11111, 1000 + i) for i in range(5)]


@pytest.fixture
def maillog(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "maillog"
    log.setup("test", str(path))
    yield path
    log.close()


def put(spool: Spool, queue: str, qid: str, data: bytes = b"") -> Path:
    """A file where ``spool`` (its hashing) puts ``qid`` in ``queue``."""
    path = Path(spool.path(queue, qid))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or f"{queue} {qid}".encode())
    return path


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root``: relative path -> content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


# ------------------------------------------------------------------ the repair itself

def test_depth_1_to_2_moves_messages_and_logs_into_place(tmp_path: Path,
                                                          maillog: Path) -> None:
    hashed = ("deferred", "defer", "bounce", "hold", "trace", "corrupt")
    old = Spool(str(tmp_path / "q"), hashed, 1)
    old.make_dirs()
    placed = {(queue, qid): put(old, queue, qid)
              for qid in IDS for queue in ("deferred", "defer", "bounce")}
    placed[("hold", IDS[0])] = put(old, "hold", IDS[0])
    placed[("trace", IDS[2])] = put(old, "trace", IDS[2])
    placed[("corrupt", IDS[3])] = put(old, "corrupt", IDS[3])
    placed[("incoming", IDS[1])] = put(old, "incoming", IDS[1])  # not hashed: stays
    inodes = {key: p.stat().st_ino for key, p in placed.items()}
    new = Spool(str(tmp_path / "q"), hashed, 2)

    report = structure.repair(new)

    assert (report.messages, report.logs, report.conflicts, report.errors) == (7, 11, 0, 0)
    for (queue, qid), before in placed.items():
        now = Path(new.path(queue, qid))
        assert now.read_bytes() == f"{queue} {qid}".encode()
        assert now.stat().st_ino == inodes[(queue, qid)]  # renamed, not copied
        if queue != "incoming":
            assert not before.exists() and now.parent.parent.parent.name == queue
    # what the qmgr and qmgr-ctl use now finds every file
    assert sorted(q for q, _ in new.scan_paths("deferred")) == sorted(IDS)
    assert "Moved to the right queue subdirectory: 7 messages, 11 log files" in \
        maillog.read_text()
    # a second run has nothing to do and says nothing
    size = maillog.stat().st_size
    assert structure.repair(new) == structure.Report()
    assert maillog.stat().st_size == size


def test_depth_2_to_unhashed_moves_up_and_removes_empty_hash_dirs(tmp_path: Path,
                                                                   maillog: Path) -> None:
    old = Spool(str(tmp_path / "q"), ("deferred", "defer"), 2)
    old.make_dirs()
    for qid in IDS:
        put(old, "deferred", qid)
        put(old, "defer", qid)
    new = Spool(str(tmp_path / "q"), (), 1)

    report = structure.repair(new)

    assert (report.messages, report.logs) == (5, 5)
    for queue in ("deferred", "defer"):
        top = tmp_path / "q" / queue
        assert sorted(p.name for p in top.iterdir()) == sorted(IDS)  # no directory left
    assert report.removed_dirs == 2 * 2 * len(IDS)


def test_depth_2_to_1_keeps_the_level_still_wanted(tmp_path: Path, maillog: Path) -> None:
    old = Spool(str(tmp_path / "q"), ("deferred",), 2)
    old.make_dirs()
    put(old, "deferred", IDS[0])
    new = Spool(str(tmp_path / "q"), ("deferred",), 1)
    assert structure.repair(new).messages == 1
    first = Path(new.path("deferred", IDS[0])).parent
    assert first.parent.name == "deferred" and [p.name for p in first.iterdir()] == [IDS[0]]


@pytest.mark.parametrize("noreplace", [True, False], ids=["renameat2", "fallback"])
def test_a_file_in_the_way_is_never_overwritten(tmp_path: Path, maillog: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                noreplace: bool) -> None:
    if not noreplace:  # a file system without RENAME_NOREPLACE: checked, then renamed
        monkeypatch.setattr(structure, "_RENAMEAT2", None)
    old = Spool(str(tmp_path / "q"), ("deferred", "defer"), 1)
    old.make_dirs()
    stale = put(old, "deferred", IDS[0], b"old place")
    put(old, "defer", IDS[0], b"old log")
    put(old, "deferred", IDS[1], b"movable")
    new = Spool(str(tmp_path / "q"), ("deferred", "defer"), 2)
    taken = put(new, "deferred", IDS[0], b"new place")

    report = structure.repair(new)

    assert stale.read_bytes() == b"old place" and taken.read_bytes() == b"new place"
    assert Path(new.path("defer", IDS[0])).read_bytes() == b"old log"  # its log moved
    assert Path(new.path("deferred", IDS[1])).read_bytes() == b"movable"
    assert (report.messages, report.logs, report.conflicts, report.errors) == (1, 1, 1, 0)
    want = (f"warning: rename file deferred/{stale.parent.name}/{IDS[0]} as "
            f"deferred/{taken.parent.parent.name}/{taken.parent.name}/{IDS[0]}: File exists")
    assert report.problems and report.problems[0].startswith(want[len("warning: "):])
    assert want in maillog.read_text()
    assert stale.parent.is_dir()  # not empty: kept


def test_names_that_are_not_queue_ids_and_maildrop_are_left_alone(tmp_path: Path,
                                                                 maillog: Path) -> None:
    old = Spool(str(tmp_path / "q"), ("deferred", "maildrop"), 1)
    old.make_dirs()
    q = tmp_path / "q"
    odd = [q / "deferred" / "1" / f"{IDS[0]}.tmp", q / "deferred" / "1" / "README",
           q / "deferred" / "12345.678", q / "incoming" / "12345.678",
           q / "deferred" / "notes" / IDS[1],  # a directory with a longer name
           q / "defer" / "X" / "x", q / "maildrop" / "E" / IDS[2]]
    for p in odd:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    link = q / "deferred" / "2" / IDS[3]
    link.parent.mkdir()
    link.symlink_to(q / "incoming" / "12345.678")
    before = files(q)
    new = Spool(str(tmp_path / "q"), ("deferred",), 2)

    report = structure.repair(new)

    assert report == structure.Report(removed_dirs=0)
    assert files(q) == before and link.is_symlink()
    assert "warning" not in maillog.read_text()


# ------------------------------------------------------------------ the stuck message

def test_deferred_mail_and_logs_are_moved_into_place_after_a_depth_change(
        tmp_path: Path) -> None:
    """After a depth change the files of the old depth are not where every process
    looks for them (qmgr-ctl show/delete, the defer logs a notice is made from; the
    qmgr's own feed takes a misplaced file in from where its scan found it, tested in
    test_qmgr_scan.py). After the repair they are, and the next deferred scan delivers
    them."""
    env = Env(tmp_path)  # hash_queue_depth = 1
    env.agents.decide = lambda transport, req, rcpt: "defer"
    qids = [env.submit("a@x.example", [f"r{i}@remote.example"]) for i in range(3)]

    async def first() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    asyncio.run(first())
    assert sorted(env.files("deferred")) == sorted(qids)
    assert all(defer_reasons(env.spool, q) == [("4.2.0", "try later")] for q in qids)

    cfg = make_cfg(tmp_path, hash_queue_depth="2")
    spool = Spool.from_config(cfg)
    agents = FakeAgents(spool)

    async def retry() -> None:
        sched = Scheduler(cfg, spool, agents, clock=env.clock)  # type: ignore[arg-type]
        sched.startup()
        sched.trigger(b"A")  # the next deferred scan ignores the retry times
        sched.trigger(b"D")
        await drain(sched)

    assert sorted(spool.scan("deferred")) == sorted(qids)
    assert not any(os.path.exists(spool.path("deferred", q)) for q in qids)
    assert not any(os.path.exists(spool.path("defer", q)) for q in qids)

    log.setup("test", str(tmp_path / "maillog"))
    try:
        report = structure.repair(spool)
    finally:
        log.close()
    assert (report.messages, report.logs) == (3, 3)
    assert all(defer_reasons(spool, q) == [("4.2.0", "try later")] for q in qids)

    asyncio.run(retry())
    assert sorted(r.queue_id for _, r in agents.requests) == sorted(qids)
    assert not list(spool.scan("deferred")) and not list(spool.scan_paths("defer"))


# ------------------------------------------------------------------ qmgr-ctl repair

def ctl(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.stdout, res.stderr


def test_qmgr_ctl_repair_after_a_depth_change(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    main = f"queue_directory = {tmp_path}/q\nmaillog_file = {tmp_path}/maillog\n"
    (etc / "main.cf").write_text(main)
    old = Spool.from_config(Config.load(str(etc)))
    old.make_dirs()
    for qid in IDS[:2]:
        put(old, "deferred", qid)
        put(old, "defer", qid)
    (etc / "main.cf").write_text(main + "hash_queue_depth = 2\n")
    new = Spool.from_config(Config.load(str(etc)))

    # before: show cannot reach the message, delete does not find it (EX_NOINPUT)
    assert ctl("-c", str(etc), "show", IDS[0])[0] != 0
    assert ctl("-c", str(etc), "delete", "--dry-run", IDS[0])[0] == 66

    code, out, err = ctl("-c", str(etc), "repair")
    assert (code, out) == (EX_OK, "")
    assert err == "qmgr-ctl: Moved to the right queue subdirectory: 2 messages, 2 log files\n"
    assert "qmgrd/qmgr-ctl[" in (tmp_path / "maillog").read_text()
    assert all(os.path.exists(new.path(q, i)) for q in ("deferred", "defer") for i in IDS[:2])
    assert ctl("-c", str(etc), "repair") == (EX_OK, "", "")  # nothing left to do

    # a file in the way: a warning, exit 0, both files kept
    put(old, "deferred", IDS[0], b"duplicate")
    code, out, err = ctl("-c", str(etc), "repair")
    assert (code, out) == (EX_OK, "")
    stale = os.path.relpath(old.path("deferred", IDS[0]), tmp_path / "q")
    assert err.startswith(f"qmgr-ctl: warning: rename file {stale} as deferred/")
    assert "File exists" in err
    assert Path(old.path("deferred", IDS[0])).read_bytes() == b"duplicate"
    assert Path(new.path("deferred", IDS[0])).read_bytes() == f"deferred {IDS[0]}".encode()


def repair_setup(tmp_path: Path) -> tuple[Path, Spool]:
    """A configuration asking for depth 2 over a queue laid out unhashed (IDS[0], [1])."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {tmp_path}/q\nmaillog_file = "
                                 f"{tmp_path}/maillog\nhash_queue_depth = 2\n")
    old = Spool(str(tmp_path / "q"))
    old.make_dirs()
    put(old, "deferred", IDS[0])
    put(old, "deferred", IDS[1])
    return etc, old


def test_qmgr_ctl_repair_warns_and_goes_on_when_a_rename_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """postsuper: (void) postrename(...) - a failed rename is a warning, the walk goes on;
    the exit status (74, EX_IOERR) says files were left, not that the queue is unusable."""
    etc, old = repair_setup(tmp_path)

    def rename(src: str, dst: str) -> None:
        if src.endswith(IDS[0]):
            raise PermissionError(13, "Permission denied", src)
        os.rename(src, dst)

    monkeypatch.setattr(structure, "_rename_noreplace", rename)
    code, out, err = ctl("-c", str(etc), "repair")
    assert (code, out) == (EX_IOERR, "")
    stale = os.path.relpath(old.path("deferred", IDS[0]), tmp_path / "q")
    assert err.startswith(f"qmgr-ctl: warning: rename file {stale} as deferred/")
    assert ": Permission denied\nqmgr-ctl: Moved to the right queue subdirectory: " \
        "1 message, 0 log files\nqmgr-ctl: warning: 1 file left out of place: " in err
    assert f"warning: rename file {stale} as" in (tmp_path / "maillog").read_text()
    assert os.path.isfile(old.path("deferred", IDS[0]))  # left, not lost


def test_qmgr_ctl_repair_exits_75_when_a_directory_cannot_be_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable queue directory is postsuper's fatal error: 75, also when renames
    failed too; the other queues are still repaired."""
    etc, old = repair_setup(tmp_path)
    put(old, "defer", IDS[2])
    scandir = os.scandir
    hold = str(tmp_path / "q" / "hold")

    def unreadable(path: str) -> object:
        if path == hold:
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(structure.os, "scandir", unreadable)
    code, out, err = ctl("-c", str(etc), "repair")
    assert (code, out) == (EX_TEMPFAIL, "")
    assert "qmgr-ctl: warning: open directory hold: Permission denied\n" in err
    assert "Moved to the right queue subdirectory: 2 messages, 1 log file" in err

    def rename(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied", src)

    put(old, "deferred", IDS[3])
    monkeypatch.setattr(structure, "_rename_noreplace", rename)
    assert ctl("-c", str(etc), "repair")[0] == EX_TEMPFAIL


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_qmgr_ctl_repair_refuses_other_users(base: Path) -> None:
    tmp_path = base  # 0755: the user can read main.cf, as on a real system
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {tmp_path}/q\nhash_queue_depth = 2\n")
    Spool(str(tmp_path / "q")).make_dirs()
    put(Spool(str(tmp_path / "q")), "deferred", IDS[0])
    before = files(tmp_path / "q")
    nobody = pwd.getpwnam("nobody")
    # the interpreter may live where nobody cannot read: load qmgr-ctl, then drop (the
    # refusal comes before the repair module, and ctypes, are loaded)
    code = ("import os, sys, difflib; import qmgrd.ctl.cli as c; "
            f"os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid}); "
            "c.main(sys.argv[1:])")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([PY, "-c", code, "-c", str(etc), "repair"], env=env,
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == EX_NOPERM, r
    assert "repair: permission denied: only root and the mail queue owner" in r.stderr
    assert files(tmp_path / "q") == before
