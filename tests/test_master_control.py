"""The master's control socket (master.daemon.control) driven in-process: one JSON
request, one JSON reply; bad, oversized, slow and excess clients cannot stall the loop;
big replies are written as the socket takes them; the socket is 0600; no timer while idle."""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from master.daemon import control
from master.daemon.control import ControlServer, query
from tests.services.procs import make_base, remove_base


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Loop:
    """A ControlServer and the bits of the master's loop that drive it."""

    def __init__(self, path: Path, reply: dict[str, Any] | None = None) -> None:
        self.sel = selectors.DefaultSelector()
        self.clock = Clock()
        self.requests: list[dict[str, Any]] = []
        self.reply = reply if reply is not None else {"ok": True}
        self.server = ControlServer(str(path), self.handle, self.sel, self.clock)
        self.server.open()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        return self.reply

    def turn(self, timeout: float = 0.0) -> None:
        self.server.run_timers()
        for key, mask in self.sel.select(timeout):
            assert key.data == control.KIND
            self.server.on_ready(key.fd, mask)

    def clients(self) -> int:
        return len(self.sel.get_map()) - 1

    def close(self) -> None:
        self.server.close()
        self.sel.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    base = make_base()
    lp = Loop(base / "master.ctl")
    yield lp
    lp.close()
    remove_base(base)


def client(lp: Loop) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(lp.server.path)
    sock.settimeout(5)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the other end closed (EOF, or a reset: it had unread data)."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def read_all(lp: Loop, sock: socket.socket) -> bytes:
    data = b""
    sock.setblocking(False)
    for _ in range(1000):
        lp.turn(0.01)
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError("no EOF")


def test_request_reply_and_mode(loop: Loop) -> None:
    assert stat.S_IMODE(os.stat(loop.server.path).st_mode) == 0o600
    assert loop.server.next_deadline() is None  # idle: no timer at all
    with client(loop) as sock:
        sock.sendall(b'{"request": "sta')
        loop.turn(0.5)
        assert loop.requests == []
        sock.sendall(b'tus"}\n')
        reply = read_all(loop, sock)
    assert json.loads(reply) == {"ok": True} and reply.endswith(b"\n")
    assert loop.requests == [{"request": "status"}]
    assert loop.clients() == 0 and loop.server.next_deadline() is None


def test_malformed_and_oversized_requests(loop: Loop) -> None:
    with client(loop) as sock:
        sock.sendall(b"not json\n")
        assert json.loads(read_all(loop, sock)) == {"error": "malformed request"}
    with client(loop) as sock:
        sock.sendall(b"[1, 2]\n")
        assert json.loads(read_all(loop, sock)) == {"error": "malformed request"}
    with client(loop) as sock:
        sock.sendall(b"x" * (control.MAX_REQUEST + 10))
        assert read_all(loop, sock) == b""  # dropped, no reply
    assert loop.requests == [] and loop.clients() == 0


def test_slow_client_is_dropped_at_its_deadline(loop: Loop) -> None:
    with client(loop) as sock:
        sock.sendall(b'{"request"')
        loop.turn(0.5)
        assert loop.clients() == 1
        assert loop.server.next_deadline() == loop.clock.now + control.CLIENT_TIMEOUT
        loop.clock.now += control.CLIENT_TIMEOUT
        loop.turn()
        assert loop.clients() == 0
        assert closed_by_peer(sock)


def test_excess_clients_are_closed_at_once(loop: Loop) -> None:
    socks: list[socket.socket] = []
    try:
        for _ in range(control.MAX_CLIENTS + 3):
            socks.append(client(loop))
            loop.turn(0.05)
        assert loop.clients() == control.MAX_CLIENTS
        closed = 0
        for sock in socks[control.MAX_CLIENTS:]:
            sock.settimeout(2)
            closed += closed_by_peer(sock)
        assert closed == 3
    finally:
        for sock in socks:
            sock.close()


def test_big_reply_is_written_as_the_reader_reads(loop: Loop) -> None:
    loop.reply = {"blob": "y" * 3_000_000}
    with client(loop) as sock:
        sock.sendall(b'{"request": "status"}\n')
        loop.turn(0.5)  # the reply does not fit in the socket buffer: no blocking here
        assert loop.clients() == 1
        assert len(json.loads(read_all(loop, sock))["blob"]) == 3_000_000


def test_reader_that_never_reads_is_dropped(loop: Loop) -> None:
    loop.reply = {"blob": "y" * 3_000_000}
    with client(loop) as sock:
        sock.sendall(b'{"request": "status"}\n')
        loop.turn(0.5)
        loop.clock.now += control.CLIENT_TIMEOUT
        loop.turn()
        assert loop.clients() == 0


def test_query_client_and_stale_socket() -> None:
    base = make_base()
    path = base / "master.ctl"
    try:
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(path))  # left behind by a dead master
        lp = Loop(path, {"services": []})
        try:
            with pytest.raises(TimeoutError):
                query(str(path), {"request": "status"}, timeout=0.2)  # nobody turns the loop
            for _ in range(3):  # accepted, request read, reply to a closed peer: dropped
                lp.turn()
            assert lp.clients() == 0
        finally:
            lp.close()
        assert not path.exists()
        with pytest.raises(FileNotFoundError):
            query(str(path), {"request": "status"}, timeout=0.2)
    finally:
        remove_base(base)
