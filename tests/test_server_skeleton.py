"""The child-side skeleton (master.server.skeleton) with real processes: stand-alone mode
(-l), limits (max_use, max_idle), SIGTERM, the fatal boundary, the status protocol on
fd 5 under a stand-in master (the real spawn layer), trigger and async servers; and
multi_server's accept loop in-process (the limit, busy/idle, stopping, max_use, max_idle,
a failing handler, the timer hook)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from master import log
from master.config import Config, Service
from master.daemon.spawn import PosixOs, child_argv, wait_child
from master.daemon.supervisor import STATUS
from master.server.skeleton import (
    AsyncTimerHook,
    ServerContext,
    _MultiLoop,
    _parse_argv,
    preparse,
    split_argv,
)
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


@pytest.mark.parametrize("setting,module", [
    ("", "uvloop"),  # the default
    ("async_event_loop = uvloop\n", "uvloop"),
    ("async_event_loop = asyncio\n", "asyncio.unix_events"),
])
def test_async_server_runs_on_the_async_event_loop(base: Path, run: Standalone, setting: str,
                                                   module: str) -> None:
    """async_event_loop picks the loop async_server runs main on: uvloop's by default,
    the standard library's with ``asyncio``."""
    write_config(base, "", setting)
    proc = run.start(base, "async_agent", "qmgr")
    state = base / "q" / "qmgr.state"
    wait_for(lambda: state.exists() and state.read_text() == "running", what="running")
    assert (base / "q" / "qmgr.loop").read_text() == module
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


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


# ------------------------------------------------------------------ multi_server (_MultiLoop)
# In-process: the accept loop of multi_server run in asyncio.run with a ServerContext of
# our own (fd 5 = one end of a socketpair whose other end collects the =iIi records, one
# listening AF_UNIX socket); the handlers wait on events the test sets.

BUSY, IDLE = 0, 1


class Multi:
    """A _MultiLoop under test: its context, listener, status records and handlers."""

    def __init__(self, base: Path, limit: int = 2, timer: AsyncTimerHook | None = None,
                 **main: str) -> None:
        cfg = Config.load(str(base / "etc"), main)
        self.path = base / "q" / "multi.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(16)
        self.status, self.status_child = socket.socketpair()
        self.status.setblocking(False)
        self.ctx = ServerContext(service="multi", config=cfg, queue_directory=str(base / "q"),
                                 listen_fds=[self.listener.fileno()], generation=7, args=[],
                                 status_fd=self.status_child.fileno())
        self.loop = _MultiLoop(self.ctx, self.handler, limit=limit, timer=timer)
        self.clients: dict[str, socket.socket] = {}
        self.release: dict[str, asyncio.Event] = {}
        self.started: list[str] = []  # client names, in the order their handlers began
        self.finished: list[str] = []
        self.running = 0
        self.most = 0  # the most handlers seen running at once
        self.fail: set[str] = set()  # clients whose handler raises when released
        self.data = b""

    async def handler(self, conn: socket.socket, ctx: ServerContext) -> None:
        assert ctx is self.ctx and not conn.getblocking()
        name = (await asyncio.get_running_loop().sock_recv(conn, 16)).decode()
        self.started.append(name)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.setdefault(name, asyncio.Event()).wait()
            if name in self.fail:
                raise ValueError(f"handler of {name} failed")
            self.finished.append(name)
        finally:
            self.running -= 1

    def connect(self, name: str) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(self.path))  # completes at once: the backlog holds it
        client.sendall(name.encode())
        self.clients[name] = client
        self.release.setdefault(name, asyncio.Event())
        return client

    def records(self) -> list[int]:
        """The ``avail`` of every status record so far (pid and generation checked)."""
        try:
            while chunk := self.status.recv(4096):
                self.data += chunk
        except BlockingIOError:
            pass
        assert len(self.data) % STATUS.size == 0
        recs = [STATUS.unpack_from(self.data, i) for i in range(0, len(self.data), STATUS.size)]
        assert all(rec[:2] == (os.getpid(), 7) for rec in recs), recs
        return [rec[2] for rec in recs]

    def states(self) -> list[int]:
        """The busy (0) / idle (1) records so far, in order."""
        return [avail for avail in self.records() if avail >= 0]

    def uses(self) -> int:
        """The completed connections reported so far (records with avail -n)."""
        return -sum(avail for avail in self.records() if avail < 0)

    def close(self) -> None:
        for sock in (*self.clients.values(), self.listener, self.status, self.status_child):
            sock.close()


@pytest.fixture
def multi(base: Path) -> Iterator[Callable[..., Multi]]:
    made: list[Multi] = []

    def make(**kw: Any) -> Multi:
        m = Multi(base, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


async def until(cond: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Let the loop run until ``cond()`` is true (AssertionError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def ended(task: asyncio.Task[None], timeout: float = 5.0) -> None:
    """serve() must return (not raise) within ``timeout`` s."""
    await asyncio.wait_for(asyncio.shield(task), timeout)


QUIET = 0.3  # seconds in which something that must not happen is given the chance to


def test_multi_server_limit_two_busy_at_limit_third_waits(multi: Callable[..., Multi]) -> None:
    m = multi(limit=2)

    async def body() -> None:
        serve = asyncio.create_task(m.loop.serve())
        m.connect("c1")
        await until(lambda: m.started == ["c1"], "the first handler")
        assert m.states() == []  # 1 of 2 in hand: still available, nothing said
        m.connect("c2")
        m.connect("c3")
        await until(lambda: m.running == 2, "two handlers at once")
        await asyncio.sleep(QUIET)
        assert m.started == ["c1", "c2"], "a third connection was taken at the limit"
        assert m.states() == [BUSY]  # at the limit: busy
        m.release["c1"].set()
        await until(lambda: m.started == ["c1", "c2", "c3"], "the third handler")
        assert m.finished == ["c1"] and m.running == 2
        # idle when c1 finished, busy again when c3 was taken (at the limit again); the
        # first completed connection is reported as a use at once
        assert m.states() == [BUSY, IDLE, BUSY]
        assert m.uses() == 1
        m.release["c2"].set()
        m.release["c3"].set()
        await until(lambda: m.running == 0, "every handler to finish")
        assert m.states() == [BUSY, IDLE, BUSY, IDLE]
        assert not serve.done()
        m.ctx.stopping.set()
        await ended(serve)
        assert m.uses() == 3  # the rest within a second, or when the loop ends
        assert m.most == 2 and sorted(m.finished) == ["c1", "c2", "c3"]
        for client in m.clients.values():  # the skeleton closed each connection
            client.settimeout(5)
            assert client.recv(1) == b""

    asyncio.run(body())


def test_multi_server_stopping_finishes_the_connection_in_hand(
        multi: Callable[..., Multi]) -> None:
    m = multi(limit=2)

    async def body() -> None:
        serve = asyncio.create_task(m.loop.serve())
        m.connect("c1")
        await until(lambda: m.running == 1, "the first handler")
        m.ctx.stopping.set()  # fd-5 EOF or SIGTERM
        # closing: busy, so that the master sends no more (a connection made in the same
        # loop iteration as the stop is the test below)
        await until(lambda: m.states() == [BUSY], "busy once the stop is seen")
        m.connect("c2")
        await asyncio.sleep(QUIET)
        assert m.started == ["c1"], "a connection was taken after stopping was set"
        assert not serve.done(), "serve() returned with a connection in hand"
        m.release["c1"].set()
        await ended(serve)
        assert m.finished == ["c1"] and m.started == ["c1"]
        assert m.states() == [BUSY] and m.uses() == 1
        # c2 is still in the listener's backlog, for another process to take
        m.listener.setblocking(False)
        conn, _ = m.listener.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(16) == b"c2"

    asyncio.run(body())


def test_multi_server_no_connection_taken_once_stopping_is_set(
        multi: Callable[..., Multi]) -> None:
    """At the limit, with a connection waiting, the stop arrives (SIGTERM, fd-5 EOF) in
    the same loop iteration as one handler's end: the waiting connection must not be
    taken, nor the master told "idle"."""
    m = multi(limit=2)

    async def body() -> None:
        serve = asyncio.create_task(m.loop.serve())
        for name in ("c1", "c2", "c3"):
            m.connect(name)
        await until(lambda: m.running == 2 and m.states() == [BUSY], "the limit")
        m.ctx.stopping.set()
        m.release["c1"].set()
        await asyncio.sleep(QUIET)
        started, records = list(m.started), m.states()
        m.release["c2"].set()
        m.release["c3"].set()
        await ended(serve)
        assert started == ["c1", "c2"], "a connection was taken after stopping was set"
        assert records == [BUSY]

    asyncio.run(body())


def test_multi_server_max_use_counts_per_slot(multi: Callable[..., Multi]) -> None:
    m = multi(limit=2, max_use="1")  # 1 x limit 2 = two connections, then exit

    async def body() -> None:
        serve = asyncio.create_task(m.loop.serve())
        m.connect("c1")
        m.release["c1"].set()
        await until(lambda: m.finished == ["c1"], "the first connection")
        await asyncio.sleep(QUIET)
        assert not serve.done(), "serve() returned after 1 of max_use x limit = 2"
        # the first completed connection is reported as a use at once, no busy/idle
        assert m.states() == [] and m.uses() == 1
        m.connect("c2")
        m.connect("c3")
        await until(lambda: m.started == ["c1", "c2"], "the second connection")
        await asyncio.sleep(QUIET)
        assert m.started == ["c1", "c2"], "a connection beyond max_use x limit was taken"
        assert not serve.done(), "serve() returned with a connection in hand"
        assert m.states() == [BUSY]  # the last use taken: closing, busy
        m.release["c2"].set()
        await ended(serve)
        assert m.finished == ["c1", "c2"]
        assert m.states() == [BUSY] and m.uses() == 2

    asyncio.run(body())


def test_multi_server_failed_handler_is_logged_and_the_loop_goes_on(
        base: Path, multi: Callable[..., Multi]) -> None:
    log.setup("multi_test", str(base / "maillog"))
    m = multi(limit=2)
    m.fail.add("c1")

    async def body() -> None:
        serve = asyncio.create_task(m.loop.serve())
        m.connect("c1")
        m.release["c1"].set()
        await until(lambda: any("connection handler failed" in line
                                for line in log_lines(base)), "the error line")
        m.clients["c1"].settimeout(5)
        assert m.clients["c1"].recv(1) == b""  # its connection was closed all the same
        await asyncio.sleep(QUIET)
        assert not serve.done(), "one handler's exception ended the loop"
        m.connect("c2")
        m.release["c2"].set()
        await until(lambda: m.finished == ["c2"], "the next connection to be served")
        assert not serve.done()
        m.ctx.stopping.set()
        await ended(serve)

    asyncio.run(body())
    [line] = [ln for ln in log_lines(base) if "connection handler failed" in ln]
    assert "error: multi: connection handler failed: handler of c1 failed: " in line
    assert "Traceback (most recent call last):" in line and "ValueError" in line


def test_multi_server_max_idle_and_timer_hook(multi: Callable[..., Multi]) -> None:
    calls: list[bool] = []

    async def timer(final: bool) -> float | None:
        calls.append(final)
        return None

    m = multi(limit=2, timer=timer, max_idle="1s")

    async def body() -> None:
        serve = asyncio.create_task(m.loop.serve())
        m.connect("c1")
        await until(lambda: m.running == 1, "the handler")
        await asyncio.sleep(1.5)  # longer than max_idle, with a connection in hand
        assert not serve.done(), "max_idle ended the loop with a connection in hand"
        m.release["c1"].set()
        await ended(serve, timeout=5)  # then max_idle after it, with nothing in hand
        assert m.finished == ["c1"]

    asyncio.run(body())
    assert calls and calls[0] is False  # called while serving
    assert calls.count(True) == 1 and calls[-1] is True  # once, final, at the end


def test_multi_server_loop_sleeps_while_connections_are_in_hand(
        multi: Callable[..., Multi], monkeypatch: pytest.MonkeyPatch) -> None:
    """serve()'s own loop acts only when nothing is in hand (max_idle, the exit): a
    connection that ends while others go on does not wake it (that cost an smtp process
    two tasks and a wait per delivery), and after a stop it waits for the last one
    without spinning."""
    waits = 0
    real_wait = asyncio.wait

    async def counting_wait(*args: Any, **kw: Any) -> Any:
        nonlocal waits
        waits += 1
        return await real_wait(*args, **kw)

    monkeypatch.setattr(asyncio, "wait", counting_wait)
    m = multi(limit=3)

    async def body() -> None:
        serve = asyncio.create_task(m.loop.serve())
        for name in ("c1", "c2", "c3"):
            m.connect(name)
        await until(lambda: m.running == 3, "three handlers")
        before = waits
        m.release["c1"].set()
        m.release["c2"].set()
        await until(lambda: m.finished == ["c1", "c2"], "two connections to end")
        await asyncio.sleep(QUIET)
        assert waits == before, "the loop woke for connections that ended with one in hand"
        m.ctx.stopping.set()
        await asyncio.sleep(QUIET)
        assert not serve.done(), "serve() returned with a connection in hand"
        assert waits <= before + 2, f"{waits - before} waits in {QUIET}s after the stop"
        m.release["c3"].set()
        await ended(serve)
        assert m.finished == ["c1", "c2", "c3"]

    asyncio.run(body())


@pytest.mark.parametrize("argv,options,args", [
    # the master's form: "--" before the service's arguments, which stay verbatim
    (["-c", "/e", "-n", "p", "--", "flags=R", "argv=/bin/x", "-f", "${sender}", "--",
      "${recipient}"],
     ["-c", "/e", "-n", "p"], ["flags=R", "argv=/bin/x", "-f", "${sender}", "--",
                               "${recipient}"]),
    # without "--", the options end at the first word that is not one (getopt)
    (["-c", "/e", "--unpriv", "argv=/bin/x", "-f", "-o", "a=b", "-c", "y"],
     ["-c", "/e", "--unpriv"], ["argv=/bin/x", "-f", "-o", "a=b", "-c", "y"]),
    (["-c/e", "-o", "a=b", "-", "-n", "x"], ["-c/e", "-o", "a=b"], ["-", "-n", "x"]),
    (["-c", "/e", "--", "--"], ["-c", "/e"], ["--"]),
    (["-c", "/e"], ["-c", "/e"], []),
])
def test_child_argv_options_end_as_getopt(argv: list[str], options: list[str],
                                          args: list[str]) -> None:
    assert split_argv(argv) == (options, args)
    parsed = _parse_argv(argv)
    assert parsed.args == args
    preparse(argv)  # the master's parse before it forks the child: the same result
    again = _parse_argv(argv)
    assert again.args == args and again.config_dir == parsed.config_dir
    again.args.append("x")  # a child's changes do not reach the cached parse
    assert _parse_argv(argv).args == args


def test_child_argv_from_the_master_reaches_the_service(tmp_path: Path) -> None:
    """A pipe line's arguments, through child_argv (what the master runs) and the
    skeleton's parse, arrive as master.cf gave them."""
    svc = Service(name="p", type="unix", private=True, unpriv=False, chroot=False,
                  wakeup=0, wakeup_if_used=False, maxproc=1, command="pipe",
                  args=["user=nobody", "argv=/bin/cmd", "-f", "${sender}", "-o", "x=y",
                        "--", "${recipient}"], overrides={"a": "b"}, module="transports.pipe")
    argv = child_argv(svc, str(tmp_path), foreground=True)
    parsed = _parse_argv(argv[4:])
    assert parsed.args == svc.args and parsed.overrides == ["a=b"]
    assert parsed.service == "p" and parsed.foreground
