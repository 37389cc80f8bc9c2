"""client — the qmgr's asynchronous client side of the agent and bounce-service protocols.

Summary
    Connects to ``<queue_directory>/private/<service>``, checks the server's
    ``protocol=...`` greeting, sends one request and reads one reply (postfix.md §5.2,
    §5.4). One request per connection. The connection is a plain non-blocking socket
    driven by the event loop's ``sock_*`` calls (no stream transport, protocol and
    reader objects per delivery: they were a third of the qmgr's CPU per message).

Public API
    AgentClient(queue_directory, greeting_timeout, reply_timeout)
        async deliver(transport, request) -> DeliverStatus
            raises TransportUnavailable when the agent cannot be reached or does not
            greet properly (the transport is then suspended by the scheduler); a reply
            that is malformed, truncated or late becomes a failed DeliverStatus with
            ``4.3.0 unknown mail transport error`` (negative feedback, never a bounce).
        async status_request(service, request) -> bool
            the bounce/defer/trace service; False on any failure (the message stays
            deferred and is retried later).
"""

from __future__ import annotations

import asyncio
import os
import socket

from master import log
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

__all__ = ["AgentClient", "TransportUnavailable"]


class TransportUnavailable(Exception):
    """The delivery agent's socket refused us or did not greet properly."""


class AgentClient:
    """Connects to agents and the bounce service (see module docstring)."""

    def __init__(self, queue_directory: str, greeting_timeout: float, reply_timeout: float):
        self.queue_directory = queue_directory
        self.greeting_timeout = greeting_timeout
        self.reply_timeout = reply_timeout

    async def _open(self, service: str, protocol: str) -> tuple[socket.socket, AttrDecoder]:
        path = os.path.join(self.queue_directory, "private", service)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        dec = AttrDecoder()
        try:
            async with asyncio.timeout(self.greeting_timeout):
                await loop.sock_connect(sock, path)
        except (TimeoutError, OSError) as exc:
            sock.close()
            raise TransportUnavailable(f"connect to {path}: {exc}") from exc
        try:
            async with asyncio.timeout(self.greeting_timeout):
                greet = await _read_list(loop, sock, dec)
            check_greeting(greet, protocol)
        except (TimeoutError, OSError, ProtocolError) as exc:
            sock.close()
            raise TransportUnavailable(f"{path}: no valid greeting: {exc}") from exc
        return sock, dec

    async def deliver(self, transport: str, request: DeliverRequest) -> DeliverStatus:
        """Send one delivery request to ``private/<transport>`` and wait for the reply."""
        sock, dec = await self._open(transport, DELIVER_PROTOCOL)
        loop = asyncio.get_running_loop()
        try:
            try:
                await loop.sock_sendall(sock, request.encode())
            except OSError as exc:
                raise TransportUnavailable(f"write to {transport}: {exc}") from exc
            try:
                async with asyncio.timeout(self.reply_timeout):
                    reply = await _read_list(loop, sock, dec)
                return DeliverStatus.from_attrs(reply)
            except (TimeoutError, OSError, ProtocolError) as exc:
                log.warning(
                    f"{request.queue_id}: {transport} agent: bad or no reply: "
                    f"{exc or type(exc).__name__}"
                )
                return DeliverStatus(
                    status=1, dsn_status="4.3.0", action="delayed",
                    reason="unknown mail transport error", agent_failed=True,
                )
        finally:
            sock.close()

    async def status_request(self, service: str, request: StatusRequest) -> bool:
        """Ask the bounce/defer/trace service for a notice. True on success."""
        try:
            sock, dec = await self._open(service, STATUS_PROTOCOL)
        except TransportUnavailable as exc:
            log.warning(f"{request.queue_id}: {service} service unavailable: {exc}")
            return False
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(sock, encode(request.to_attrs()))
            async with asyncio.timeout(self.reply_timeout):
                reply = await _read_list(loop, sock, dec)
            if len(reply) != 1 or reply[0][0] != "status" or not reply[0][1].isdigit():
                raise ProtocolError(f"bad reply {reply[:2]!r}")
            return int(reply[0][1]) == 0
        except (TimeoutError, OSError, ProtocolError) as exc:
            log.warning(f"{request.queue_id}: {service} service: {exc or type(exc).__name__}")
            return False
        finally:
            sock.close()


async def _read_list(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                     dec: AttrDecoder) -> Pairs:
    """One attribute list from ``sock`` (``dec`` keeps what follows it).

    Raises:
        ProtocolError: EOF or malformed input. OSError from the socket.
    """
    while True:
        lst = dec.pop()
        if lst is not None:
            return lst
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise ProtocolError("unexpected EOF")
        dec.feed(data)
