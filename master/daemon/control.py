"""master.daemon.control - the master's control socket: its own state, on request.

Summary
    ``qmgr-master status`` needs what only the master knows - which child is busy or
    idle, how many requests each completed, which service is throttled until when.  The
    master serves it on a UNIX stream socket, ``<queue_directory>/pid/master.ctl``
    (mode 0600: root, or the user the mail system runs as), from its own selectors loop:
    nothing is written on every change, nothing is computed until someone asks.

    Protocol: the client sends one JSON object on one line (``{"request": "status"}``);
    the master answers one JSON object on one line and closes.  Unknown requests get
    ``{"error": "..."}``.

    It can never stall the master: the listening socket and every connection are
    non-blocking; at most MAX_CLIENTS connections are open (more are closed at once);
    a request is at most MAX_REQUEST bytes; a connection that has not finished within
    CLIENT_TIMEOUT seconds (slow request, or a reader that does not read the reply) is
    closed; the reply is written as far as the socket takes it, the rest when it becomes
    writable.  While no client is connected it costs the loop nothing: no timer.

Public API
    CONTROL_NAME = "master.ctl";  control_path(queue_directory) -> str
    ControlServer(path, handler, selector, monotonic=time.monotonic)
        handler(request: dict) -> dict       the reply object (the master's)
        open() (raises OSError), close(), fileno() -> int,
        on_ready(key_data, fd, mask)         the loop hands it its own events
        next_deadline() -> float | None;  run_timers()
    KIND = "control": the ``data`` of every selector key the server registers
    query(path, request, timeout=5.0) -> dict
        the client; raises OSError (no master, permission) or ValueError (bad reply)

Logs
    warning: control socket: <problem> (a malformed request; the client gets an error).
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from master import log

__all__ = ["CONTROL_NAME", "KIND", "ControlServer", "control_path", "query"]

CONTROL_NAME = "master.ctl"
KIND = "control"
MAX_CLIENTS = 8
MAX_REQUEST = 4096
MAX_REPLY = 16 * 1024 * 1024
CLIENT_TIMEOUT = 2.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def control_path(queue_directory: str) -> str:
    """``<queue_directory>/pid/master.ctl``."""
    return os.path.join(queue_directory, "pid", CONTROL_NAME)


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    deadline: float
    inbuf: bytes = b""
    outbuf: memoryview = field(default_factory=lambda: memoryview(b""))
    writing: bool = False


class ControlServer:
    """The control socket inside the master's loop (module docstring).  The constructor
    does no I/O."""

    def __init__(self, path: str, handler: Handler, selector: selectors.BaseSelector,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.handler = handler
        self.selector = selector
        self.monotonic = monotonic
        self._listener: socket.socket | None = None
        self._clients: dict[int, _Client] = {}

    def open(self) -> None:
        """Create the socket (replacing a stale one), mode 0600, and watch it.
        Raises OSError."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            sock.listen(MAX_CLIENTS)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self.selector.register(sock, selectors.EVENT_READ, KIND)

    def fileno(self) -> int:
        """The listening descriptor (-1 when closed)."""
        return self._listener.fileno() if self._listener is not None else -1

    def close(self) -> None:
        """Close every connection and the listener; remove the socket file."""
        for fd in list(self._clients):
            self._drop(fd)
        if self._listener is not None:
            self.selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def next_deadline(self) -> float | None:
        """The earliest client deadline, None while no client is connected."""
        if not self._clients:
            return None
        return min(c.deadline for c in self._clients.values())

    def run_timers(self) -> None:
        """Close clients past their deadline."""
        if not self._clients:
            return
        now = self.monotonic()
        for fd in [fd for fd, c in self._clients.items() if c.deadline <= now]:
            self._drop(fd)

    def on_ready(self, fd: int, mask: int) -> None:
        """One selector event of ours (key.data == KIND)."""
        if self._listener is not None and fd == self._listener.fileno():
            self._accept()
            return
        client = self._clients.get(fd)
        if client is None:
            return
        if client.writing:
            if mask & selectors.EVENT_WRITE:
                self._write(fd, client)
            return
        self._read(fd, client)

    # --- internals --------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(MAX_CLIENTS):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning(f"control socket: accept: {exc.strerror}")
                return
            if len(self._clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, self.monotonic() + CLIENT_TIMEOUT)
            self._clients[sock.fileno()] = client
            self.selector.register(sock, selectors.EVENT_READ, KIND)

    def _read(self, fd: int, client: _Client) -> None:
        try:
            data = client.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not data:
            self._drop(fd)
            return
        client.inbuf += data
        line, newline, _ = client.inbuf.partition(b"\n")
        if not newline:
            if len(client.inbuf) > MAX_REQUEST:
                log.warning("control socket: request too long")
                self._drop(fd)
            return
        self._reply(fd, client, self._answer(line))

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            log.warning("control socket: malformed request")
            return {"error": "malformed request"}
        if not isinstance(request, dict):
            log.warning("control socket: malformed request")
            return {"error": "malformed request"}
        return self.handler(request)

    def _reply(self, fd: int, client: _Client, reply: dict[str, Any]) -> None:
        data = json.dumps(reply, separators=(",", ":")).encode("utf-8") + b"\n"
        client.outbuf = memoryview(data)
        client.writing = True
        self.selector.modify(client.sock, selectors.EVENT_WRITE, KIND)
        self._write(fd, client)

    def _write(self, fd: int, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        client.outbuf = client.outbuf[sent:]
        if not client.outbuf:
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        client = self._clients.pop(fd, None)
        if client is None:
            return
        self.selector.unregister(client.sock)
        client.sock.close()


def query(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the master's control socket and return its reply.

    Raises:
        OSError: the socket is missing, refuses us, or the exchange timed out.
        ValueError: the reply is not one JSON object (or exceeds MAX_REPLY).
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
        chunks: list[bytes] = []
        size = 0
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY:
                raise ValueError("reply too large")
    reply = json.loads(b"".join(chunks).decode("utf-8"))
    if not isinstance(reply, dict):
        raise ValueError("reply is not a JSON object")  # noqa: TRY004 - bad data, not type
    return reply
