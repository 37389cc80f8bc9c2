"""The child-side skeleton (master.server.skeleton) with real processes: stand-alone mode
(-l), limits (max_use, max_idle), SIGTERM, the fatal boundary, the status protocol on
fd 5 under a stand-in master (the real spawn layer), trigger and async servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from master.config import Service
from master.daemon.spawn import PosixOs, child_argv, wait_child
from master.daemon.supervisor import STATUS
from tests.services.procs import child_env, kill_session, log_lines, wait_for, write_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    write_config(tmp_path, "")
    (tmp_path / "q" / "private").mkdir(parents=True)
    (tmp_path / "q" / "public").mkdir(parents=True)
    yield tmp_path


class Standalone:
    """Run a test service stand-alone in its own session."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, base: Path, module: str, name: str, *extra: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-P", "-m", f"tests.services.{module}", "-c",
                str(base / "etc"), "-n", name, *extra]
        proc = subprocess.Popen(argv, env=child_env(), start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            kill_session(proc.pid)
            proc.wait(10)


@pytest.fixture
def run() -> Iterator[Standalone]:
    runner = Standalone()
    yield runner
    runner.cleanup()


def ask(path: Path, text: str = "hello") -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(text.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
    return data.decode()


def test_single_server_standalone_max_use(base: Path, run: Standalone) -> None:
    sock = base / "q" / "echo.sock"
    proc = run.start(base, "echo_agent", "echo", "-l", str(sock), "-o", "max_use=2")
    wait_for(sock.exists, what="listener")
    first = ask(sock, "one").split()
    assert first[0] == "echo" and first[1] == str(proc.pid) and first[2:] == ["0", "one"]
    assert ask(sock, "two").split()[3] == "two"
    assert proc.wait(10) == 0


def test_single_server_max_idle(base: Path, run: Standalone) -> None:
    sock = base / "q" / "echo.sock"
    proc = run.start(base, "echo_agent", "echo", "-l", str(sock), "-o", "max_idle=1s")
    wait_for(sock.exists, what="listener")
    ask(sock)
    assert proc.wait(10) == 0


def test_single_server_sigterm_exits_zero(base: Path, run: Standalone) -> None:
    sock = base / "q" / "echo.sock"
    proc = run.start(base, "echo_agent", "echo", "-l", str(sock))
    wait_for(sock.exists, what="listener")
    ask(sock)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_exception_is_fatal_with_traceback(base: Path, run: Standalone) -> None:
    proc = run.start(base, "fail_agent", "bad", "-l", str(base / "q" / "bad.sock"))
    assert proc.wait(10) == 1
    lines = log_lines(base)
    assert any(line.endswith("fatal: bad: this service cannot start") for line in lines)
    assert any("Traceback (most recent call last):" in line for line in lines)
    # the tag is the program (the module's name), not the service's, as Postfix's
    assert all("qmgrd/fail_agent[" in line for line in lines)


def test_trigger_server_fifo_and_socket(base: Path, run: Standalone) -> None:
    fifo = base / "q" / "public" / "pickup"
    proc = run.start(base, "trigger_agent", "pickup", "-t", "fifo", "-l", str(fifo))
    wait_for(fifo.exists, what="fifo")
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"I")
    finally:
        os.close(fd)
    record = base / "q" / "pickup.triggers"
    wait_for(lambda: record.exists() and record.read_text(), what="trigger record")
    assert record.read_text() == f"{proc.pid} b'I'\n"

    sock = base / "q" / "public" / "qmgr"
    proc2 = run.start(base, "trigger_agent", "qmgr", "-t", "unix", "-l", str(sock))
    wait_for(sock.exists, what="socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(sock))
        client.sendall(b"D\0")
    record2 = base / "q" / "qmgr.triggers"
    wait_for(lambda: record2.exists() and record2.read_text(), what="trigger record")
    assert record2.read_text() == f"{proc2.pid} b'D\\x00'\n"


def test_async_server_sigterm_sets_stopping(base: Path, run: Standalone) -> None:
    proc = run.start(base, "async_agent", "qmgr")
    state = base / "q" / "qmgr.state"
    wait_for(lambda: state.exists() and state.read_text() == "running", what="running")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert state.read_text() == "stopped"


def _service(name: str, module: str, stype: str = "unix") -> Service:
    return Service(name=name, type=stype, private=True, unpriv=True, chroot=False, wakeup=0,
                   wakeup_if_used=False, maxproc=1, command=module, module=module)


class StandIn:
    """The real spawn layer without the master: one child with fds 3-6 in place."""

    def __init__(self, base: Path, service: Service) -> None:
        self.os = PosixOs()
        self.qdir = str(base / "q")
        self.flow = self.os.open_flow()
        self.status, self.status_child = self.os.open_status()
        [self.listen] = self.os.open_listeners(service, self.qdir, 10)
        self.pid = self.os.spawn(child_argv(service, str(base / "etc"), False), 7,
                                 [*self.flow, self.status_child, self.listen])
        self.fds = [*self.flow, self.status, self.status_child, self.listen]

    def close_status(self) -> None:
        for fd in (self.status, self.status_child):
            os.close(fd)
            self.fds.remove(fd)

    def records(self, count: int) -> list[tuple[int, int, int]]:
        data = b""

        def more() -> bool:
            nonlocal data
            chunk = self.os.read_status(self.status)
            data += chunk or b""
            return len(data) >= count * STATUS.size

        wait_for(more, what=f"{count} status records")
        return [STATUS.unpack_from(data, i * STATUS.size) for i in range(count)]

    def wait(self) -> int:
        codes: list[int] = []

        def ended() -> bool:
            code = wait_child(self.pid)
            if code is not None:
                codes.append(code)
            return bool(codes)

        wait_for(ended, what="child exit")
        return codes[0]

    def cleanup(self) -> None:
        if wait_child(self.pid) is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait()
        for fd in self.fds:
            os.close(fd)


def test_status_protocol_and_eof_under_master(base: Path) -> None:
    stand_in = StandIn(base, _service("echo", "tests.services.echo_agent"))
    try:
        reply = ask(base / "q" / "private" / "echo", "hi").split()
        assert reply == ["echo", str(stand_in.pid), "7", "hi"]
        assert stand_in.records(2) == [(stand_in.pid, 7, 0), (stand_in.pid, 7, 1)]
        stand_in.close_status()  # reload or master gone: EOF on fd 5
        assert stand_in.wait() == 0
    finally:
        stand_in.cleanup()


def test_async_server_stops_on_status_eof(base: Path) -> None:
    stand_in = StandIn(base, _service("qmgr", "tests.services.async_agent", "fifo"))
    try:
        state = base / "q" / "qmgr.state"
        wait_for(lambda: state.exists() and state.read_text() == "running", what="running")
        stand_in.close_status()
        assert stand_in.wait() == 0
        assert state.read_text() == "stopped"
    finally:
        stand_in.cleanup()
