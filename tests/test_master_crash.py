"""Master death (kill -9): every child notices EOF on its status channel and exits - the
idle ones at once, a busy one after the request in hand - and a new master starts
cleanly on the same queue (stale pid file, lock files, sockets and FIFOs reused or
recreated)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from tests.services.procs import (
    child_env,
    kill_session,
    log_lines,
    session_procs,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(60)

MASTER_CF = """\
echo   unix - - n - 2 tests.services.echo_agent
solo   unix - - n - 1 tests.services.echo_agent slow
qmgr   fifo n n n 300 1 tests.services.async_agent
pickup fifo n n n 60 1 tests.services.trigger_agent
"""



def start(base: Path, etc: Path) -> subprocess.Popen[bytes]:
    before = sum("daemon started" in line for line in log_lines(base))
    with open(base / "stderr", "ab") as err:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "master.cli", "-c", str(etc),
                                 "start", "--foreground"], env=child_env(),
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    wait_for(lambda: sum("daemon started" in line for line in log_lines(base)) > before,
             what="daemon started")
    return proc


def line_of(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data.decode()


def ask(path: Path) -> list[str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"hello\n")
        return line_of(sock).split()


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_kill_9_master_children_exit_new_master_starts(base: Path) -> None:
    etc = write_config(base, MASTER_CF)
    q = base / "q"
    first = start(base, etc)
    sessions = [first.pid]
    try:
        state = q / "qmgr.state"
        wait_for(lambda: state.exists() and state.read_text() == "running", what="qmgr")
        echo_pid = int(ask(q / "private" / "echo")[1])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
            held.settimeout(10)
            held.connect(str(q / "private" / "solo"))
            held.sendall(b"a\n")
            started = line_of(held).split()
            assert started[0] == "started"
            solo_pid = int(started[1])
            children = {p.pid for p in psutil.Process(first.pid).children()}
            assert {echo_pid, solo_pid} <= children and len(children) == 4

            os.kill(first.pid, signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
            idle = children - {solo_pid}
            wait_for(lambda: not any(alive(pid) for pid in idle), timeout=10,
                     what="idle children exit on EOF")
            assert state.read_text() == "stopped"  # the async server saw ctx.stopping
            assert alive(solo_pid)  # busy: finishes the request in hand first
            held.sendall(b"rest\n")
            assert line_of(held).split()[:2] == ["solo", str(solo_pid)]
        wait_for(lambda: not alive(solo_pid), timeout=10, what="busy child exits")
        assert session_procs(first.pid) == []

        # stale master.pid, master.lock, master.ctl, sockets and FIFOs are all still there
        assert (q / "pid" / "master.pid").exists() and (q / "pid" / "master.ctl").exists()
        second = start(base, etc)
        sessions.append(second.pid)
        assert (q / "pid" / "master.pid").read_text() == f"{second.pid:>32}\n"
        assert (base / "data" / "master.lock").read_text() == f"{second.pid:>32}\n"
        reply = ask(q / "private" / "echo")
        assert reply[0] == "echo" and int(reply[1]) != echo_pid
        wait_for(lambda: state.read_text() == "running", what="a new qmgr")
        status = subprocess.run([sys.executable, "-P", "-m", "master.cli", "-c", str(etc),
                                 "status", "--json"], env=child_env(), capture_output=True,
                                text=True, timeout=30, check=False)
        assert status.returncode == 0
        data = json.loads(status.stdout)
        assert data["pid"] == second.pid and data["master"]["pid"] == second.pid
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0
        assert not (q / "pid" / "master.ctl").exists()
        assert not (base / "data" / "master.lock").exists()
    finally:
        for sid in sessions:
            kill_session(sid)
        first.wait(10)
