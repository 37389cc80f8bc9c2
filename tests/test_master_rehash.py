"""hash_queue_depth changed under deferred mail, end to end: qmgr-master start runs
qmgr-ctl repair before the services start (as postfix start runs postsuper), and a
reload that changes the hashing runs it in the background (as postfix reload does), so
the deferred messages and their defer logs are found again by qmgr-ctl show/delete and
delivered at the next scan. A failed repair fails the start."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from master import log
from master.config import Config
from master.daemon import master as master_mod
from qmgrd.spool.queue import Spool
from tests.conftest import Peers
from tests.harness import CaptureServer, MailSystem, MakeSystem, inject_many, wait_for

SENDER = "alice@mail.test.example"
N = 4


def deferred_mail(ms: MailSystem, cap: CaptureServer) -> list[str]:
    """N messages deferred by ``cap`` (450), each with its defer log; their ids."""
    inject_many(ms, [(["-f", SENDER, f"r{i}@remote.example"],
                      f"Subject: {i}\nMessage-ID: <rehash{i}@test>\n\nbody {i}\n".encode())
                     for i in range(N)])
    wait_for(lambda: len(ms.queue_files("deferred")) == N, 30, "deferred mail")
    qids = sorted(p.name for p in ms.queue_files("deferred"))
    wait_for(lambda: at_depth(ms, qids, 1), 10, "their defer logs")
    return qids


def at_depth(ms: MailSystem, qids: list[str], depth: int) -> bool:
    """Every message and its defer log is where ``hash_queue_depth = depth`` puts it."""
    spool = Spool(str(ms.spool), ("deferred", "defer"), depth)
    return all(os.path.isfile(spool.path(q, i)) for q in ("deferred", "defer") for i in qids)


def moved_line(ms: MailSystem) -> bool:
    return bool(re.search(r"qmgrd/qmgr-ctl\[\d+\]: Moved to the right queue subdirectory: "
                          rf"{N} messages, {N} log files", ms.log()))


def check_reachable_and_delivered(ms: MailSystem, cap: CaptureServer,
                                  qids: list[str]) -> None:
    r = ms.ctl("show", qids[0])
    assert r.returncode == 0 and "@remote.example" in r.stdout, r
    assert "450 4.2.0" in r.stdout  # its defer log was found too
    r = ms.ctl("list")
    assert r.returncode == 0 and r.stdout.count("450 4.2.0") >= 1, r
    r = ms.ctl("delete", qids[-1])
    assert r.returncode == 0 and f"{qids[-1]}: removed" in r.stdout, r
    cap.set_mode("accept")
    r = ms.ctl("flush")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(cap.messages()) == N - 1 and ms.queue_empty(), 30,
             "delivery of the repaired messages")
    assert not [p for p in (ms.spool / "defer").rglob("*") if not p.is_dir()]


def test_start_moves_deferred_mail_after_a_depth_change(mailsys: MakeSystem,
                                                         peers: Peers) -> None:
    cap = peers.capture("defer")
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{cap.port}", "hash_queue_depth": "1"})
    ms.start()
    qids = deferred_mail(ms, cap)
    ms.stop()
    assert at_depth(ms, qids, 1)

    ms.write_main(hash_queue_depth="2")
    # what the old code did: the new setting's paths find nothing
    assert ms.ctl("show", qids[0]).returncode != 0
    ms.start()
    r = ms.ctl("show", qids[1])
    assert r.returncode == 0 and "450 4.2.0" in r.stdout, r  # message and defer log
    assert at_depth(ms, qids, 2) and moved_line(ms)
    check_reachable_and_delivered(ms, cap, qids)


def test_reload_with_a_new_depth_moves_deferred_mail(mailsys: MakeSystem,
                                                    peers: Peers) -> None:
    cap = peers.capture("defer")
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{cap.port}", "hash_queue_depth": "1"})
    ms.start()
    qids = deferred_mail(ms, cap)
    before = ms.log().count("qmgr-ctl repair (pid")
    r = ms.master("reload")  # same hashing: no repair
    assert r.returncode == 0, r.stderr

    ms.write_main(hash_queue_depth="2")
    r = ms.master("reload")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: at_depth(ms, qids, 2) and moved_line(ms), 30, "the repair after reload")
    log = ms.log()
    assert log.count("qmgr-ctl repair (pid") == before + 1
    assert "hash_queue_names or hash_queue_depth changed: qmgr-ctl repair (pid" in log
    check_reachable_and_delivered(ms, cap, qids)
    assert "warning: qmgr-ctl repair" not in ms.log()


class _EndedOs:
    """A one-shot command that has ended with ``code`` when first asked."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.argv: list[str] = []

    def start_command(self, argv: list[str]) -> int:
        self.argv = argv
        return 4242

    def wait_command(self, pid: int, block: bool = False) -> int | None:
        assert pid == 4242
        return self.code


@pytest.mark.parametrize("code,text", [(75, "exit status 75"), (-9, "killed by signal 9")])
def test_a_failed_repair_fails_the_start(tmp_path: Path, code: int, text: str) -> None:
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n")
    cfg = Config.load(str(tmp_path))
    m = master_mod.Master(str(tmp_path))
    fake = _EndedOs(code)
    with pytest.raises(master_mod.StartupError) as ei:
        m._repair_structure(cfg, fake)  # type: ignore[arg-type]
    assert str(ei.value) == (f"queue structure check failed: qmgr-ctl repair {text} "
                             "(see its lines in the mail log)")
    assert fake.argv == [sys.executable, "-P", "-m", "qmgrd.ctl", "-c", str(tmp_path),
                         "repair"]


def test_files_left_out_of_place_do_not_fail_the_start(tmp_path: Path) -> None:
    """qmgr-ctl repair's 74 (some renames failed, the rest done) is a warning, as
    postsuper warns about a failed rename and postfix start goes on."""
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n")
    cfg = Config.load(str(tmp_path))
    maillog = tmp_path / "maillog"
    log.setup("master", str(maillog))
    try:
        master_mod.Master(str(tmp_path))._repair_structure(
            cfg, _EndedOs(master_mod.REPAIR_INCOMPLETE))  # type: ignore[arg-type]
    finally:
        log.close()
    assert "warning: queue structure check: qmgr-ctl repair exit status 74: some queue " \
        "files could not be moved into place" in maillog.read_text()


class _FakeCommands:
    """PosixOs's one-shot command half: records what was started."""

    def __init__(self) -> None:
        self.started: list[list[str]] = []

    def start_command(self, argv: list[str]) -> int:
        self.started.append(argv)
        return 1000 + len(self.started)


def test_reload_repairs_only_when_the_hashing_changed(tmp_path: Path) -> None:
    """Postfix's postfix reload runs postsuper after every SIGHUP; the master runs
    qmgr-ctl repair when hash_queue_names or hash_queue_depth changed (nothing else a
    reload does moves queue files), once more when they change again meanwhile, and
    reports a failed run."""
    def cfg(text: str) -> Config:
        (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n{text}")
        return Config.load(str(tmp_path))

    maillog = tmp_path / "maillog"
    log.setup("master", str(maillog))
    try:
        m = master_mod.Master(str(tmp_path))
        fake = _FakeCommands()
        m._posix = fake  # type: ignore[assignment]
        m._hashing = master_mod._hashing(cfg(""))
        m._repair_after_reload(cfg("hash_queue_names = defer,  DEFERRED\n"))  # the same
        assert fake.started == []
        m._repair_after_reload(cfg("hash_queue_depth = 2\n"))
        assert fake.started == [[sys.executable, "-P", "-m", "qmgrd.ctl", "-c",
                                 str(tmp_path), "repair"]]
        m._repair_after_reload(cfg("hash_queue_depth = 2\nhash_queue_names = deferred\n"))
        assert len(fake.started) == 1  # after the one running
        m._reaped([(4242, 0)])  # another process's end: none of its business
        assert len(fake.started) == 1
        m._reaped([(1001, 0)])
        assert len(fake.started) == 2
        m._reaped([(1002, 75)])
        assert len(fake.started) == 2
    finally:
        log.close()
    text = maillog.read_text()
    assert text.count("hash_queue_names or hash_queue_depth changed: qmgr-ctl repair (pid "
                      "100") == 2
    assert "warning: qmgr-ctl repair pid 1002 exit status 75: some queue files may still " \
        "be out of place" in text
