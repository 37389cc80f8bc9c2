"""client — the qmgr's asynchronous client side of the agent and bounce-service protocols.

Summary
    Connects to ``<queue_directory>/private/<service>``, checks the server's
    ``protocol=...`` greeting, sends one request and reads one reply (postfix.md §5.2,
    §5.4). One request per connection.

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

from master import log
from qmgrd.delivery import (
    DELIVER_PROTOCOL,
    STATUS_PROTOCOL,
    AttrDecoder,
    DeliverRequest,
    DeliverStatus,
    ProtocolError,
    StatusRequest,
    async_read_list,
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

    async def _open(
        self, service: str, protocol: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, AttrDecoder]:
        path = os.path.join(self.queue_directory, "private", service)
        try:
            async with asyncio.timeout(self.greeting_timeout):  # no task per call
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        except (TimeoutError, OSError) as exc:
            raise TransportUnavailable(f"connect to {path}: {exc}") from exc
        dec = AttrDecoder()
        try:
            async with asyncio.timeout(self.greeting_timeout):
                greet = await async_read_list(reader, dec)
            check_greeting(greet, protocol)
        except (TimeoutError, OSError, ProtocolError) as exc:
            writer.close()
            raise TransportUnavailable(f"{path}: no valid greeting: {exc}") from exc
        return reader, writer, dec

    async def deliver(self, transport: str, request: DeliverRequest) -> DeliverStatus:
        """Send one delivery request to ``private/<transport>`` and wait for the reply."""
        reader, writer, dec = await self._open(transport, DELIVER_PROTOCOL)
        try:
            try:
                writer.write(request.encode())
                await writer.drain()
            except OSError as exc:
                raise TransportUnavailable(f"write to {transport}: {exc}") from exc
            try:
                async with asyncio.timeout(self.reply_timeout):
                    reply = await async_read_list(reader, dec)
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
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def status_request(self, service: str, request: StatusRequest) -> bool:
        """Ask the bounce/defer/trace service for a notice. True on success."""
        try:
            reader, writer, dec = await self._open(service, STATUS_PROTOCOL)
        except TransportUnavailable as exc:
            log.warning(f"{request.queue_id}: {service} service unavailable: {exc}")
            return False
        try:
            writer.write(encode(request.to_attrs()))
            await writer.drain()
            async with asyncio.timeout(self.reply_timeout):
                reply = await async_read_list(reader, dec)
            if len(reply) != 1 or reply[0][0] != "status" or not reply[0][1].isdigit():
                raise ProtocolError(f"bad reply {reply[:2]!r}")
            return int(reply[0][1]) == 0
        except (TimeoutError, OSError, ProtocolError) as exc:
            log.warning(f"{request.queue_id}: {service} service: {exc or type(exc).__name__}")
            return False
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
