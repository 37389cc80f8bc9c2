"""qmgrd.qmgr.client when a service's processes are gone: the reason logged says what
happened (a full listen queue, a connection closed before the greeting) instead of a
stale errno text, and a bounce outage is one warning per SERVICE_WARN_INTERVAL, not one
per message."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from master import log
from qmgrd.delivery import (
    BOUNCE_CMD_FLUSH,
    STATUS_PROTOCOL,
    DeliverRequest,
    StatusRequest,
    encode,
    protocol_greeting,
)
from qmgrd.qmgr.client import SERVICE_WARN_INTERVAL, AgentClient, TransportUnavailable

_REQUEST = DeliverRequest(queue_name="active", queue_id="4Xq7Zc1Hl2z4abc", offset=0, size=0,
                          sender="s@x", nexthop="x")


def _status(qid: str = "4Xq7Zc1Hl2z4abc") -> StatusRequest:
    return StatusRequest(nrequest=BOUNCE_CMD_FLUSH, queue_name="active", queue_id=qid,
                         sender="s@x")


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(log, "warning", lambda msg: lines.append("warning: " + msg))
    monkeypatch.setattr(log, "info", lines.append)
    return lines


@pytest.fixture
def full_queue(tmp_path: Path) -> Iterator[socket.socket]:
    """``private/bounce`` whose listener accepts nothing and whose queue is full: the
    master's socket of a service whose processes were killed."""
    (tmp_path / "private").mkdir()
    path = str(tmp_path / "private" / "bounce")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    waiting: list[socket.socket] = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            waiting.append(s)
        yield listener
    finally:
        for s in waiting:
            s.close()
        listener.close()


def test_a_full_listen_queue_is_said_plainly(tmp_path: Path, full_queue: socket.socket,
                                             logged: list[str]) -> None:
    """No process accepts: 'listen queue full', not 'no valid greeting: Invalid
    argument' (asyncio took the UNIX connect's EAGAIN for a connection in progress and
    the read of the unconnected socket failed with EINVAL)."""
    client = AgentClient(str(tmp_path), greeting_timeout=2, reply_timeout=2)
    assert asyncio.run(client.status_request("bounce", _status())) is False
    path = tmp_path / "private" / "bounce"
    assert logged == [(
        f"warning: 4Xq7Zc1Hl2z4abc: bounce service unavailable: connect to {path}: "
        "listen queue full: no process accepts connections (the service is down, "
        "throttled or overloaded)")]
    with pytest.raises(TransportUnavailable, match="connect to .*: listen queue full"):
        asyncio.run(client.deliver("bounce", _REQUEST))


def test_a_connection_closed_before_the_greeting_says_so(tmp_path: Path,
                                                         logged: list[str]) -> None:
    (tmp_path / "private").mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "private" / "bounce"))
    listener.listen(1)

    def killed_at_once() -> None:
        conn, _ = listener.accept()
        conn.close()

    worker = threading.Thread(target=killed_at_once)
    worker.start()
    try:
        client = AgentClient(str(tmp_path), greeting_timeout=5, reply_timeout=5)
        assert asyncio.run(client.status_request("bounce", _status())) is False
    finally:
        worker.join(10)
        listener.close()
    path = tmp_path / "private" / "bounce"
    assert logged == [(f"warning: 4Xq7Zc1Hl2z4abc: bounce service unavailable: {path}: "
                       "connection closed before the greeting")]


def test_a_close_seen_by_the_first_read_says_so_too(tmp_path: Path, logged: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # the agent's end is closed before the client's first read: that read, not the
    # event loop's readiness callback, finds the EOF (CI once logged "no valid greeting:
    # unexpected EOF" here when the race above went this way)
    from qmgrd.qmgr import client as client_module
    (tmp_path / "private").mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "private" / "bounce"))
    listener.listen(1)
    original = client_module._connect

    def connect_then_wait_for_the_close(sock: socket.socket, path: str) -> None:
        original(sock, path)
        conn, _ = listener.accept()
        conn.close()

    monkeypatch.setattr(client_module, "_connect", connect_then_wait_for_the_close)
    try:
        client = AgentClient(str(tmp_path), greeting_timeout=5, reply_timeout=5)
        assert asyncio.run(client.status_request("bounce", _status())) is False
    finally:
        listener.close()
    path = tmp_path / "private" / "bounce"
    assert logged == [(f"warning: 4Xq7Zc1Hl2z4abc: bounce service unavailable: {path}: "
                       "connection closed before the greeting")]


def test_an_outage_is_one_warning_per_interval(tmp_path: Path, full_queue: socket.socket,
                                               logged: list[str]) -> None:
    """430 messages finishing while the bounce service is down: one warning, then one
    per SERVICE_WARN_INTERVAL with the count of those not logged; the first success
    says the service is back and how many failures went unlogged."""
    now = [1000.0]
    client = AgentClient(str(tmp_path), greeting_timeout=2, reply_timeout=2,
                         clock=lambda: now[0])

    async def burst(n: int) -> list[bool]:
        return [await client.status_request("bounce", _status(f"4Xq7Zc1Hl2z{i:04d}"))
                for i in range(n)]

    assert asyncio.run(burst(430)) == [False] * 430
    assert len(logged) == 1 and logged[0].startswith(
        "warning: 4Xq7Zc1Hl2z0000: bounce service unavailable: connect to ")
    now[0] += SERVICE_WARN_INTERVAL
    assert asyncio.run(burst(1)) == [False]
    assert len(logged) == 2 and logged[1].endswith(
        "(429 more failed requests since the last warning)")
    asyncio.run(burst(5))
    assert len(logged) == 2
    # the service is back: a process accepts, greets and answers
    path = str(tmp_path / "private" / "bounce")
    full_queue.close()
    os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            conn.sendall(protocol_greeting(STATUS_PROTOCOL))
            conn.recv(65536)
            conn.sendall(encode([("status", 0)]))

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        assert asyncio.run(burst(1)) == [True]
    finally:
        worker.join(10)
        listener.close()
    assert logged[2:] == [("bounce service available again (5 more failed requests "
                           "were not logged one by one)")]
