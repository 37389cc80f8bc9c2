"""client — the qmgr's asynchronous client side of the agent and bounce-service protocols.

Summary
    Connects to ``<queue_directory>/private/<service>``, checks the server's
    ``protocol=...`` greeting, sends one request and reads one reply (postfix.md §5.2,
    §5.4). One request per connection.

    A delivery request is written as soon as the connection is made, before the agent's
    greeting is read (Postfix's qmgr waits for the greeting first): the agent finds it
    waiting when it has greeted, so a delivery costs the qmgr and the agent one wake-up
    each less - with one smtp process serving many deliveries at once, a shorter wait
    for each of them (issue 8: H and C ran at the destination's concurrency limit of
    20, where throughput is 20 over the time one delivery takes). The greeting is still
    read and checked before the reply is trusted.

    TransportUnavailable means the agent has not delivered and will not: an agent
    greets before it reads (transports.agent), so a connection that ends before a
    complete greeting was not read. When no greeting has come by greeting_timeout, the
    qmgr first ends its side for writing and then looks again: no byte of a greeting
    yet - the agent will find EOF behind the request and deliver nothing (it looks
    before delivering) - TransportUnavailable; some - the agent may already be
    delivering, so the greeting and the reply are awaited as usual within
    reply_timeout (no reply then: the unknown outcome below, never "not attempted").
    Bounce-service requests still wait for the greeting (a handful per bounce, not per
    delivery).

    The connection is a plain non-blocking socket:
    connect and send through the event loop's ``sock_*`` calls, reads by a reader
    callback registered once per connection (no stream transport, protocol and reader
    objects per delivery: they were a third of the qmgr's CPU per message).

Public API
    AgentClient(queue_directory, greeting_timeout, reply_timeout, clock=time.monotonic)
        async deliver(transport, request) -> DeliverStatus
            raises TransportUnavailable when the agent cannot be reached, does not
            greet properly, or the request cannot be written (the transport is then
            suspended by the scheduler); a reply
            that is malformed, truncated or late becomes a failed DeliverStatus with
            ``4.3.0 unknown mail transport error`` (negative feedback, never a bounce).
        async status_request(service, request) -> bool
            the bounce/defer/trace service; False on any failure (the message stays
            deferred and is retried later); its warning at most once per
            SERVICE_WARN_INTERVAL (60 s) per service, the failures not logged are
            counted in the next warning or in ``<service> service available again``.
    SERVICE_WARN_INTERVAL = 60.0 (seconds)

Why a service is unavailable is said as it happened: ``connect to <path>: listen queue
full: no process accepts connections ...`` (the listener's queue is full: the service's
processes are gone or throttled; a UNIX-domain connect fails at once then, as Postfix's
non-blocking unix_connect), ``<path>: connection closed before the greeting``, ``<path>:
no valid greeting: <what came>``, or the socket error.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from master import log
from master.config import describe
from qmgrd.delivery import (
    DELIVER_PROTOCOL,
    STATUS_PROTOCOL,
    AttrDecoder,
    DeliverRequest,
    DeliverStatus,
    Pairs,
    ProtocolError,
    StatusRequest,
    check_greeting,
    encode,
)

__all__ = ["SERVICE_WARN_INTERVAL", "AgentClient", "TransportUnavailable"]

SERVICE_WARN_INTERVAL = 60.0  # s: at most one "service unavailable" warning per service
_QUEUE_FULL = ("listen queue full: no process accepts connections (the service is down, "
               "throttled or overloaded)")


class TransportUnavailable(Exception):
    """The delivery agent's socket refused us or did not greet properly, and the agent
    has not delivered the request and will not (module docstring)."""


class AgentClient:
    """Connects to agents and the bounce service (see module docstring)."""

    def __init__(self, queue_directory: str, greeting_timeout: float, reply_timeout: float,
                 clock: Callable[[], float] = time.monotonic):
        self.queue_directory = queue_directory
        self.greeting_timeout = greeting_timeout
        self.reply_timeout = reply_timeout
        self.clock = clock
        self._outages: dict[str, _Outage] = {}  # services whose last request failed

    async def _open(self, service: str, protocol: str, request: bytes | None = None) -> _Conn:
        """Connect to ``private/<service>`` and read its greeting (within greeting_timeout).
        With ``request``, write it as soon as the connection is made, before the greeting
        is read (module docstring).

        Raises:
            TransportUnavailable: no connection, no complete and valid greeting in time,
            or the request could not be written.
        """
        path = os.path.join(self.queue_directory, "private", service)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = _Conn(loop, sock)
        failed = f"connect to {path}"
        written = False
        try:
            try:
                async with asyncio.timeout(self.greeting_timeout):  # connect and greeting
                    _connect(sock, path)
                    if request is not None:
                        failed = f"write to {path}"
                        await loop.sock_sendall(sock, request)
                        written = True
                    failed = f"{path}: no valid greeting"
                    greet = await conn.read_list()
            except TimeoutError:
                if not (written and conn.greeted_after_all()):
                    raise
                # it greeted after all (in time or not): it may be delivering, so the
                # request is not "not attempted"; greeting and reply as usual
                async with asyncio.timeout(self.reply_timeout):
                    greet = await conn.read_list()
            check_greeting(greet, protocol)
        except (TimeoutError, OSError, ProtocolError) as exc:
            conn.close()
            text = f"{failed}: {describe(exc)}"
            if isinstance(exc, ProtocolError) and conn.eof and not conn.dec.pending:
                text = f"{path}: connection closed before the greeting"  # no byte of one
            raise TransportUnavailable(text) from exc
        except BaseException:  # cancelled (the qmgr stops): nothing left registered
            conn.close()
            raise
        return conn

    async def deliver(self, transport: str, request: DeliverRequest) -> DeliverStatus:
        """Send one delivery request to ``private/<transport>`` and wait for the reply
        (the request goes out before the greeting is read: module docstring)."""
        conn = await self._open(transport, DELIVER_PROTOCOL, request.encode())
        try:
            try:
                async with asyncio.timeout(self.reply_timeout):
                    reply = await conn.read_list()
                return DeliverStatus.from_attrs(reply)
            except (TimeoutError, OSError, ProtocolError) as exc:
                log.warning(
                    f"{request.queue_id}: {transport} agent: bad or no reply: "
                    f"{describe(exc)}"
                )
                return DeliverStatus(
                    status=1, dsn_status="4.3.0", action="delayed",
                    reason="unknown mail transport error", agent_failed=True,
                )
        finally:
            conn.close()

    async def status_request(self, service: str, request: StatusRequest) -> bool:
        """Ask the bounce/defer/trace service for a notice. True on success.

        A failure is logged as ``<id>: <service> service unavailable: <why>`` (no
        connection or greeting) or ``<id>: <service> service: <why>`` (no good reply),
        but at most once per SERVICE_WARN_INTERVAL per service: while the service is
        down every message finishing asks again, and each would log the same line.
        The next warning, or ``<service> service available again`` on the first
        success, says how many failures were not logged one by one.
        """
        try:
            conn = await self._open(service, STATUS_PROTOCOL)
        except TransportUnavailable as exc:
            self._failed(service, f"{request.queue_id}: {service} service unavailable: "
                                  f"{exc}")
            return False
        try:
            await conn.loop.sock_sendall(conn.sock, encode(request.to_attrs()))
            async with asyncio.timeout(self.reply_timeout):
                reply = await conn.read_list()
            if len(reply) != 1 or reply[0][0] != "status" or not reply[0][1].isdigit():
                raise ProtocolError(f"bad reply {reply[:2]!r}")
        except (TimeoutError, OSError, ProtocolError) as exc:
            self._failed(service, f"{request.queue_id}: {service} service: "
                                  f"{describe(exc)}")
            return False
        finally:
            conn.close()
        outage = self._outages.pop(service, None)
        if outage is not None and outage.unlogged:
            log.info(f"{service} service available again ({outage.unlogged} more failed "
                     "requests were not logged one by one)")
        return int(reply[0][1]) == 0

    def _failed(self, service: str, text: str) -> None:
        """Log ``warning: text`` unless ``service`` had one less than
        SERVICE_WARN_INTERVAL ago (then only count it)."""
        now = self.clock()
        outage = self._outages.get(service)
        if outage is not None and now - outage.warned_at < SERVICE_WARN_INTERVAL:
            outage.unlogged += 1
            return
        more = (f" ({outage.unlogged} more failed requests since the last warning)"
                if outage is not None and outage.unlogged else "")
        log.warning(text + more)
        self._outages[service] = _Outage(now)


@dataclass
class _Outage:
    """A service whose last request failed: when its last warning was logged (the
    client's clock, seconds) and how many failures since were only counted."""

    warned_at: float
    unlogged: int = 0


def _connect(sock: socket.socket, path: str) -> None:
    """Connect the non-blocking UNIX-domain ``sock`` to ``path``, at once or never.

    A UNIX-domain connect does not go on in the background as a TCP one does: it
    succeeds, or fails - with EAGAIN when the listener's queue is full because no
    process accepts (the service's processes died or are throttled). asyncio's
    sock_connect takes EAGAIN for "in progress", waits for the (unconnected, hence
    writable) socket and reports a connection that does not exist; the first read then
    failed with EINVAL, logged as ``no valid greeting: Invalid argument``.

    Raises:
        OSError: the connect failed (EAGAIN: ``listen queue full: no process accepts
            connections ...``).
    """
    try:
        sock.connect(path)
    except BlockingIOError:
        raise OSError(errno.EAGAIN, _QUEUE_FULL) from None


class _Conn:
    """One connection to an agent or the bounce service: its socket, the decoder of what
    it sent, and one registration with the event loop for the connection's life (the
    greeting and the reply are two waits; loop.sock_recv would add the socket to epoll
    and remove it again for each). The event loop's callback reads what arrived for a
    waiting read_list (one recv), so a readiness it reported is never seen twice; with
    nobody waiting it only stops watching the socket."""

    __slots__ = ("chunks", "dec", "eof", "error", "loop", "registered", "sock", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.dec = AttrDecoder()
        self.waiter: asyncio.Future[None] | None = None
        self.registered = False
        self.chunks: list[bytes] = []
        self.eof = False
        self.error: OSError | None = None

    def _readable(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():  # nobody waits: read nothing (a peer that
            self._unregister()              # sends unasked cannot fill our memory);
            return                          # read_list registers again when it waits
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.error, data = exc, b""
        if data:
            self.chunks.append(data)
        else:  # EOF or an error: the socket stays readable; stop watching it
            self.eof = True
            self._unregister()
        waiter.set_result(None)

    def _unregister(self) -> None:
        if self.registered:
            self.loop.remove_reader(self.sock.fileno())
            self.registered = False

    async def read_list(self) -> Pairs:
        """One attribute list (the decoder keeps what follows it).

        Raises:
            ProtocolError: EOF or malformed input. OSError from the socket.
        """
        while True:
            lst = self.dec.pop()
            if lst is not None:
                return lst
            if self.chunks:
                data = b"".join(self.chunks)
                self.chunks.clear()
            elif self.error is not None:
                raise self.error
            elif self.eof:
                data = b""
            else:
                try:
                    data = self.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    self.waiter = self.loop.create_future()
                    if not self.registered:
                        self.loop.add_reader(self.sock.fileno(), self._readable)
                        self.registered = True
                    await self.waiter
                    continue
            if not data:
                self.eof = True  # read here, not by _readable: the same EOF
                raise ProtocolError("unexpected EOF")
            self.dec.feed(data)

    def greeted_after_all(self) -> bool:
        """After the greeting's deadline: end our side for writing first - an agent that
        has not looked behind the request yet now finds EOF there and delivers nothing
        (transports.agent) - then True when any byte of a greeting has arrived: an agent
        that greeted may have looked before, and be delivering."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the agent's end is gone: what it sent is still here to be seen
        if self.chunks or self.dec.pending:
            return True
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""
        except OSError:  # nothing yet (EAGAIN), or a reset without a byte
            return False

    def close(self) -> None:
        self._unregister()
        self.sock.close()
