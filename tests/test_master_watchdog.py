"""The watchdog (master.server.watchdog): which parameter applies, the re-arm interval, a
wedged single_server killed by SIGALRM with the master naming the watchdog and spawning a
new child, and an async_server that lives while its loop turns and dies when it wedges."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from master.config import Config
from master.server.watchdog import Watchdog, watchdog_param, watchdog_timeout
from tests.services.procs import (
    child_env,
    kill_session,
    log_lines,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(60)


def test_parameter_and_interval() -> None:
    assert watchdog_param("qmgr") == "qmgr_daemon_timeout"
    assert watchdog_param("smtp") == "daemon_timeout"
    assert watchdog_param("echo_agent") == "daemon_timeout"
    cfg = Config.from_text("daemon_timeout = 2m\n", "/etc/qmgrd-test")
    assert watchdog_timeout(cfg, "smtp") == 120
    assert watchdog_timeout(cfg, "qmgr") == 1000  # qmgr_daemon_timeout's default
    assert watchdog_timeout(cfg.with_overrides({"qmgr_daemon_timeout": "7"}), "qmgr") == 7
    assert watchdog_timeout(cfg, "qmgr", param="daemon_timeout") == 120
    assert [Watchdog(t).interval() for t in (1, 8, 1000)] == [0.25, 2.0, 10.0]


def test_arm_and_disarm_use_the_alarm_clock() -> None:
    before = signal.getsignal(signal.SIGALRM)
    try:
        dog = Watchdog(30)
        dog.arm()
        assert signal.alarm(0) == 30  # what was pending
        dog.arm()
        dog.disarm()
        assert signal.alarm(0) == 0
        assert signal.getsignal(signal.SIGALRM) == before  # no handler installed
    finally:
        signal.alarm(0)



def talk(path: Path, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(line + b"\n")
        return sock.recv(100)


def test_wedged_child_is_killed_logged_and_replaced(base: Path) -> None:
    etc = write_config(base, "wedge unix - - n - 1 tests.services.wedge_agent "
                             "-o daemon_timeout=1s\n")
    with open(base / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "master.cli", "-c", str(etc),
                                 "start", "--foreground"], env=child_env(),
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: any("daemon started" in x for x in log_lines(base)), what="start")
        sock = base / "q" / "private" / "wedge"
        first = talk(sock, b"hello").split()
        assert first[0] == b"ok"
        pid = int(first[1])
        assert talk(sock, b"wedge") == b"wedged\n"
        marker = (f"warning: process tests.services.wedge_agent pid {pid} killed by signal "
                  "14 (watchdog timeout after 1s?)")
        wait_for(lambda: any(x.endswith(marker) for x in log_lines(base)), what="watchdog")
        second = talk(sock, b"hello").split()  # a new child: the service is not throttled
        assert second[0] == b"ok" and int(second[1]) != pid
        assert not any("throttling" in x for x in log_lines(base))
    finally:
        kill_session(proc.pid)
        proc.wait(10)


def test_async_server_lives_while_its_loop_turns(base: Path) -> None:
    write_config(base, "")
    (base / "q").mkdir()
    proc = subprocess.Popen([sys.executable, "-P", "-m", "tests.services.async_wedge_agent",
                             "-c", str(base / "etc"), "-n", "spin", "-o",
                             "daemon_timeout=1s"], env=child_env(), start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ticks = base / "q" / "spin.ticks"
    try:
        # 2.5 s of ticks: well past the 1 s watchdog, kept alive by the keepalive task
        wait_for(lambda: ticks.exists() and int(ticks.read_text() or 0) >= 25, what="ticks")
        assert proc.poll() is None
        (base / "q" / "spin.wedge").touch()
        assert proc.wait(10) == -signal.SIGALRM
    finally:
        kill_session(proc.pid)
        proc.wait(10)
    assert os.path.exists(ticks)
