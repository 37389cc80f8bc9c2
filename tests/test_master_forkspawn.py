"""master.daemon.forkspawn: a forked child starts as an exec'd one would (module docstring).

The fork happens in the pytest process here; the child runs tests.services.fork_probe,
which reports its state and exits 7.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from master.daemon import forkspawn
from master.daemon.spawn import FD_BASE, high_fd
from tests.harness import PY, MakeSystem, wait_for


def _reap(pid: int) -> int:
    def done() -> int | None:
        got, status = os.waitpid(pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if got == pid else None
    code = wait_for(lambda: (c := done()) is not None and (c,), 20, "the forked child")
    return int(code[0])


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:
        return False


def test_forked_child_has_exactly_its_descriptors_default_signals_and_env(
        tmp_path: Path) -> None:
    sys.modules.pop("tests.services.fork_probe", None)  # not loaded: run as __main__
    report = tmp_path / "report.json"
    r, w = os.pipe()
    a, b = socket.socketpair()
    fds = [high_fd(r), high_fd(w), high_fd(a.detach())]
    stray = high_fd(os.open(os.devnull, os.O_RDONLY))  # close-on-exec: must not survive
    inheritable = {int(n) for n in os.listdir("/proc/self/fd")
                   if int(n) > 5 and _inheritable(int(n))}
    old_term = signal.signal(signal.SIGTERM, lambda *_: None)  # as the master's handlers
    old_hup = signal.signal(signal.SIGHUP, lambda *_: None)
    try:
        argv = [sys.executable, "-P", "-m", "tests.services.fork_probe", str(report), "x"]
        pid = forkspawn.fork_child("tests.services.fork_probe", argv, 42, fds,
                                   {**os.environ, "FORK_PROBE_MARKER": "yes"})
        assert _reap(pid) == 7
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
        for fd in [*fds, stray]:
            os.close(fd)
        b.close()
    got = json.loads(report.read_text())
    assert all(fd >= FD_BASE for fd in [*fds, stray])
    # exec's semantics: its three, and whatever the parent had without close-on-exec
    # (pytest's own), never the close-on-exec ones; plus the probe's listdir descriptor
    extra = set(got["fds"]) - {0, 1, 2, 3, 4, 5} - inheritable
    assert len(extra) <= 1 and all(fd < FD_BASE for fd in extra), got["fds"]  # listdir's
    assert stray not in got["fds"] and not set(fds) & set(got["fds"]) - inheritable
    assert got["pgid_is_pid"] is True
    assert got["signals"] == {"SIGTERM": "default", "SIGHUP": "default", "SIGCHLD": "default",
                              "SIGPIPE": "ignore", "SIGXFSZ": "ignore",
                              "SIGINT": "python-int"}
    assert got["blocked"] == [] and got["wakeup_fd"] == -1
    assert got["generation"] == "42" and got["env_marker"] == "yes"
    assert got["argv"] == [str(report), "x"]
    assert got["main_name"] == "__main__" and got["spec"] == "tests.services.fork_probe"


def test_a_loaded_module_main_is_called_without_running_its_body_again(
        tmp_path: Path) -> None:
    import tests.services.fork_probe as probe

    report = tmp_path / "report.json"
    argv = [sys.executable, "-P", "-m", "tests.services.fork_probe", str(report)]
    pid = forkspawn.fork_child("tests.services.fork_probe", argv, 3, [], dict(os.environ))
    assert _reap(pid) == 7
    got = json.loads(report.read_text())
    # the master's module object: its main() ran, its body was not executed again, and
    # it is __main__ (the skeleton names the process - log tag, parameters - after it)
    assert got["main_name"] == probe.__name__ == "tests.services.fork_probe"
    assert got["spec"] == "tests.services.fork_probe"
    assert got["argv"] == [str(report)] and got["generation"] == "3"


def test_only_our_own_importable_services_are_forked() -> None:
    exe = sys.executable
    assert forkspawn.forkable([exe, "-P", "-m", "transports.discard", "-n", "d"]) == \
        "transports.discard"
    assert forkspawn.forkable([exe, "-P", "-m", "qmgrd.qmgr", "-n", "qmgr"]) == "qmgrd.qmgr"
    assert "qmgrd.qmgr.__main__" in sys.modules  # a package: its __main__ is loaded
    # a user's module, another interpreter, another command line shape: spawned
    assert forkspawn.forkable([exe, "-P", "-m", "tests.services.echo_agent"]) is None
    assert forkspawn.forkable(["/usr/bin/python3.9", "-P", "-m", "transports.discard"]) \
        is None
    assert forkspawn.forkable([exe, "-m", "transports.discard"]) is None
    # ours by name but not importable: spawned, so that the child reports the error
    assert forkspawn.forkable([exe, "-P", "-m", "transports.no_such_agent"]) is None


@pytest.mark.parametrize("code,want", [(None, 0), (3, 3), ("fatal words", 1)])
def test_exit_status_as_python_would_give_it(code: object, want: int) -> None:
    assert forkspawn._exit_code(code) == want


def test_descriptors_left_open_by_the_starter_reach_no_process(mailsys: MakeSystem) -> None:
    """``( qmgr-master start 9>>file ) | cat`` must return: the master closes what its
    starter left inheritable, so neither it nor any child holds the caller's pipe."""
    ms = mailsys()
    r, w = os.pipe()
    spare = os.open(os.devnull, os.O_WRONLY)
    os.set_inheritable(spare, True)
    try:
        done = subprocess.run([PY, "-m", "master.cli", "-c", str(ms.etc), "start"],
                              env=ms.env, stdin=subprocess.DEVNULL, capture_output=True,
                              pass_fds=(w, spare), timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        os.close(w)
        w = -1
        master = psutil.Process(int((ms.spool / "pid" / "master.pid").read_text().split()[0]))
        assert ms.sendmail("-f", "a@x.example", "u1@localhost",
                           data=b"Subject: t\n\nx\n").returncode == 0
        wait_for(lambda: any("qmgr" in " ".join(c.cmdline()) for c in master.children()),
                 30, "qmgr to start")
        # every process of the system: none holds the pipe, so its read end sees EOF
        ready, _, _ = select.select([r], [], [], 10)
        assert ready and os.read(r, 1) == b"", "a qmgrd process holds the starter's pipe"
        for proc in [master, *master.children()]:
            fds = {int(n) for n in os.listdir(f"/proc/{proc.pid}/fd")}
            names = {os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in fds
                     if os.path.exists(f"/proc/{proc.pid}/fd/{fd}")}
            assert "/dev/null" not in names - {os.readlink(f"/proc/{proc.pid}/fd/0")}, \
                (proc.pid, proc.name(), names)
    finally:
        os.close(r)
        os.close(spare)
        if w >= 0:
            os.close(w)
        assert ms.master("stop").returncode == 0


def test_the_master_can_load_a_service_module_before_any_fork() -> None:
    """PosixOs.preload (called by the master for every master.cf service at start, before
    the first fork) loads our modules, and leaves other command lines alone."""
    from master.daemon.spawn import PosixOs

    exe = sys.executable
    forkspawn._Loaded.ok.discard("transports.error")
    PosixOs().preload([exe, "-P", "-m", "transports.error", "-n", "error"])
    assert "transports.error" in forkspawn._Loaded.ok
    PosixOs(fork=False).preload([exe, "-P", "-m", "transports.never_tried_agent"])
    assert "transports.never_tried_agent" not in forkspawn._Loaded.failed  # not tried
