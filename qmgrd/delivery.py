"""delivery — the qmgr <-> delivery agent protocol (requests and status replies).

Summary
    Postfix's "attr0" attribute stream over a UNIX stream socket (postfix.md §5.1-5.4):
    each attribute is ``name NUL value NUL``; a lone NUL (empty name) ends a list. The
    server (agent, bounce service) speaks first with ``protocol=<name>``; the client sends
    one request; the server sends one reply; the client closes. One request per
    connection.

    This module is the only place the wire format lives: the qmgr (asyncio side) and the
    agents (blocking side) both use these types.

Public API
    RecipientInfo(address, orig_rcpt, offset, dsn_orcpt, notify)
    DeliverRequest(...)            .to_attrs() / DeliverRequest.from_lists(common, rcpts)
    DeliverStatus(status, dsn_status, diag_type, diag_text, mta_type, mta_mname, action, reason)
        .hop_failed -> bool (a non-empty reason: the whole destination had trouble)
    StatusRequest(nrequest, attrs) for the bounce/defer/trace service (BOUNCE_CMD_*)
    encode(pairs) -> bytes
    AttrReader(bounded decoder);  read_list(sock) / write_list(sock, pairs) (blocking)
    async_read_list(reader) / async_write_list(writer, pairs) (asyncio streams)
    read_request(sock) (blocking) / await read_request_async(sock) (non-blocking socket,
        the running loop's sock_recv) -> DeliverRequest: an agent reads its request
    ProtocolError: malformed or oversized input (the caller treats it as a failed
        delivery: the qmgr defers with "4.3.0 unknown mail transport error").

Bounds: a name is at most 64 bytes, a value at most MAX_VALUE bytes, a list at most
MAX_ATTRS attributes (recipient lists are sent as one list per recipient).
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the agents never load asyncio (~50 ms of start-up); the qmgr has it
    import asyncio

__all__ = [
    "BOUNCE_CMD_APPEND",
    "BOUNCE_CMD_FLUSH",
    "BOUNCE_CMD_TRACE",
    "BOUNCE_CMD_WARN",
    "DELIVER_PROTOCOL",
    "DEL_REQ_FLAG_BOUNCE",
    "DEL_REQ_FLAG_CONN_LOAD",
    "DEL_REQ_FLAG_CONN_MASK",
    "DEL_REQ_FLAG_CONN_STORE",
    "DEL_REQ_FLAG_DEFLT",
    "DEL_REQ_FLAG_SUCCESS",
    "STATUS_PROTOCOL",
    "AttrDecoder",
    "DeliverRequest",
    "DeliverStatus",
    "ProtocolError",
    "RecipientInfo",
    "StatusRequest",
    "async_read_list",
    "async_write_list",
    "check_greeting",
    "encode",
    "protocol_greeting",
    "read_list",
    "read_lists",
    "read_request",
    "read_request_async",
    "write_list",
]

DELIVER_PROTOCOL = "delivery_request_protocol"
STATUS_PROTOCOL = "delivery_status_protocol"

DEL_REQ_FLAG_SUCCESS = 1
DEL_REQ_FLAG_BOUNCE = 2
DEL_REQ_FLAG_DEFLT = DEL_REQ_FLAG_SUCCESS | DEL_REQ_FLAG_BOUNCE
DEL_REQ_FLAG_CONN_LOAD = 0x800  # the agent may reuse a cached connection
DEL_REQ_FLAG_CONN_STORE = 0x1000  # the agent may keep its connection for the next request
DEL_REQ_FLAG_CONN_MASK = DEL_REQ_FLAG_CONN_LOAD | DEL_REQ_FLAG_CONN_STORE

BOUNCE_CMD_APPEND = 0
BOUNCE_CMD_FLUSH = 1
BOUNCE_CMD_WARN = 2
BOUNCE_CMD_VERP = 3
BOUNCE_CMD_ONE = 4
BOUNCE_CMD_TRACE = 5

MAX_NAME = 64
MAX_VALUE = 4 * 2048 * 8  # 4 * line_length_limit, with room for long reasons
MAX_ATTRS = 64


class ProtocolError(Exception):
    """Malformed, truncated or oversized attribute stream."""


Pairs = list[tuple[str, str]]


_CHECKED_NAMES: set[str] = set()  # attribute names encode() has accepted


def encode(pairs: Iterable[tuple[str, str | int]]) -> bytes:
    """Encode one attribute list, terminator included.

    Raises:
        ProtocolError: a name or value contains NUL or exceeds the bounds.
    """
    parts: list[str] = []
    for name, value in pairs:
        parts.append(name)
        parts.append(value if isinstance(value, str) else str(value))
    if not parts:
        return b"\0"
    text = "\0".join(parts)
    # One look at the whole list instead of one per attribute (the qmgr and every agent
    # encode a list or two per delivery): no NUL but the separators, short enough that
    # no value can be over MAX_VALUE, names seen before. Otherwise check each.
    if (text.count("\0") != len(parts) - 1 or len(text) * 4 > MAX_VALUE
            or not _CHECKED_NAMES.issuperset(parts[0::2])):
        _check_parts(parts)
    return text.encode("utf-8", "surrogateescape") + b"\0\0"


def _check_parts(parts: list[str]) -> None:
    """encode()'s checks, one attribute at a time (raises ProtocolError)."""
    for k in range(0, len(parts), 2):
        name, v = parts[k], parts[k + 1]
        if (not name or len(name) > MAX_NAME or not name.isascii() or "\0" in name
                or "\0" in v or (len(v) * 4 > MAX_VALUE and len(
                    v.encode("utf-8", "surrogateescape")) > MAX_VALUE)):
            raise ProtocolError(f"bad attribute {name!r}")
    if len(_CHECKED_NAMES) < 1024:
        _CHECKED_NAMES.update(parts[0::2])


class AttrDecoder:
    """Incremental, bounded decoder of attr0 lists from a byte stream.

    ``feed()`` adds bytes; completed lists queue up in order and are taken with ``pop()``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._cur: Pairs = []
        self._ready: deque[Pairs] = deque()

    def feed(self, data: bytes) -> int:
        """Add bytes; return how many complete lists are queued.

        Raises:
            ProtocolError: oversized name/value or too many attributes.
        """
        buf = bytes(self._buf) + data if self._buf else data
        tokens = buf.split(b"\0")  # the last one is not terminated yet
        last = len(tokens) - 1
        cur = self._cur
        i = 0
        while i < last:
            name = tokens[i]
            if not name:  # an empty name: the end of the list
                self._ready.append(cur)
                cur = self._cur = []
                i += 1
                continue
            if i + 1 >= last:  # its value is not complete yet
                break
            value = tokens[i + 1]
            if len(name) > MAX_NAME or len(value) > MAX_VALUE:
                raise ProtocolError("attribute too long")
            if len(cur) >= MAX_ATTRS:
                raise ProtocolError("too many attributes")
            try:
                cur.append((name.decode("ascii"), value.decode("utf-8", "surrogateescape")))
            except UnicodeDecodeError as exc:
                raise ProtocolError("non-ASCII attribute name") from exc
            i += 2
        if i == last:
            rest = tokens[last]
            if len(rest) > MAX_VALUE + MAX_NAME + 2:
                raise ProtocolError("attribute too long")
        else:  # a name, then the start of its value
            rest = tokens[i] + b"\0" + tokens[last]
            if len(tokens[i]) > MAX_NAME or len(tokens[last]) > MAX_VALUE:
                raise ProtocolError("attribute too long")
        self._buf = bytearray(rest)
        return len(self._ready)

    def pop(self) -> Pairs | None:
        """The oldest complete list, or None."""
        return self._ready.popleft() if self._ready else None

    @property
    def pending(self) -> bool:
        """True when unread bytes or lists are buffered."""
        return bool(self._buf) or bool(self._cur) or bool(self._ready)


def write_list(sock: socket.socket, pairs: Iterable[tuple[str, str | int]]) -> None:
    """Blocking write of one list (the socket's timeout applies)."""
    sock.sendall(encode(pairs))


def read_lists(sock: socket.socket, count: int, decoder: AttrDecoder | None = None) -> list[Pairs]:
    """Blocking read of exactly ``count`` lists (extra bytes stay in ``decoder``).

    Raises:
        ProtocolError: EOF before ``count`` lists, or malformed input.
        OSError: socket errors and timeouts.
    """
    dec = decoder or AttrDecoder()
    got: list[Pairs] = []
    while len(got) < count:
        lst = dec.pop()
        if lst is not None:
            got.append(lst)
            continue
        data = sock.recv(65536)
        if not data:
            raise ProtocolError("unexpected EOF")
        dec.feed(data)
    return got


def read_list(sock: socket.socket) -> Pairs:
    """Blocking read of one list (see :func:`read_lists`)."""
    return read_lists(sock, 1)[0]


async def async_write_list(writer: asyncio.StreamWriter, pairs: Iterable[tuple[str, str | int]]) -> None:
    """Write one list on an asyncio stream and drain."""
    writer.write(encode(pairs))
    await writer.drain()


async def async_read_list(reader: asyncio.StreamReader, decoder: AttrDecoder) -> Pairs:
    """Read one list from an asyncio stream (``decoder`` keeps leftover bytes).

    Raises:
        ProtocolError: EOF or malformed input.
    """
    while True:
        lst = decoder.pop()
        if lst is not None:
            return lst
        data = await reader.read(65536)
        if not data:
            raise ProtocolError("unexpected EOF")
        decoder.feed(data)


def _get(pairs: Pairs, name: str, default: str | None = None) -> str:
    for n, v in pairs:
        if n == name:
            return v
    if default is None:
        raise ProtocolError(f"missing attribute {name}")
    return default


def _int(pairs: Pairs, name: str, default: int | None = None) -> int:
    raw = _get(pairs, name, None if default is None else str(default))
    if not raw.isdigit() or len(raw) > 20:
        raise ProtocolError(f"bad integer attribute {name}={raw!r}")
    return int(raw)


@dataclass
class RecipientInfo:
    """One recipient of a delivery request (postfix.md §5.2 item 3).

    offset: file offset of the recipient's ``R`` record (bytes), used to mark it done.
    notify: DSN NOTIFY bit mask (NEVER 1, SUCCESS 2, FAILURE 4, DELAY 8).
    """

    address: str
    orig_rcpt: str = ""
    offset: int = 0
    dsn_orcpt: str = ""
    notify: int = 0

    def to_attrs(self) -> list[tuple[str, str | int]]:
        return [
            ("original_recipient", self.orig_rcpt),
            ("recipient", self.address),
            ("offset", self.offset),
            ("dsn_orig_rcpt", self.dsn_orcpt),
            ("notify_flags", self.notify),
        ]

    @classmethod
    def from_attrs(cls, pairs: Pairs) -> RecipientInfo:
        return cls(
            address=_get(pairs, "recipient"),
            orig_rcpt=_get(pairs, "original_recipient", ""),
            offset=_int(pairs, "offset", 0),
            dsn_orcpt=_get(pairs, "dsn_orig_rcpt", ""),
            notify=_int(pairs, "notify_flags", 0),
        )


@dataclass
class DeliverRequest:
    """A delivery request (postfix.md §5.2), qmgr -> agent.

    offset: data offset of the content records (bytes); size: content length (bytes).
    arrival: when the message entered the queue (epoch seconds, float);
    active_arrival: when the qmgr opened it; handoff: when the qmgr sent this request.
    These three replace Postfix's binary MSG_STATS blob with decimal text.
    """

    queue_name: str
    queue_id: str
    offset: int
    size: int
    nexthop: str
    sender: str
    recipients: list[RecipientInfo] = field(default_factory=list)
    flags: int = DEL_REQ_FLAG_DEFLT
    encoding: str = ""
    smtputf8: int = 0
    envelope_id: str = ""
    ret_flags: int = 0
    arrival: float = 0.0
    active_arrival: float = 0.0
    handoff: float = 0.0
    client_name: str = ""
    client_address: str = ""
    protocol_name: str = ""
    helo_name: str = ""
    rewrite_context: str = "local"
    client_port: str = ""

    def to_lists(self) -> list[list[tuple[str, str | int]]]:
        """The attribute lists to send: the common list, then one per recipient."""
        common: list[tuple[str, str | int]] = [
            ("flags", self.flags),
            ("queue_name", self.queue_name),
            ("queue_id", self.queue_id),
            ("offset", self.offset),
            ("size", self.size),
            ("nexthop", self.nexthop),
            ("encoding", self.encoding),
            ("smtputf8", self.smtputf8),
            ("sender", self.sender),
            ("envelope_id", self.envelope_id),
            ("ret_flags", self.ret_flags),
            ("time", f"{self.arrival:.6f} {self.active_arrival:.6f} {self.handoff:.6f}"),
            ("log_client_name", self.client_name),
            ("log_client_address", self.client_address),
            ("log_client_port", self.client_port),
            ("log_protocol_name", self.protocol_name),
            ("log_helo_name", self.helo_name),
            ("rewrite_context", self.rewrite_context),
            ("recipient_count", len(self.recipients)),
        ]
        return [common] + [r.to_attrs() for r in self.recipients]

    def encode(self) -> bytes:
        return b"".join(encode(lst) for lst in self.to_lists())

    @classmethod
    def from_common(cls, pairs: Pairs) -> tuple[DeliverRequest, int]:
        """Decode the common list; returns the request and how many recipient lists follow.

        Raises:
            ProtocolError: missing/malformed attributes or a count over 100000.
        """
        try:
            times = [float(x) for x in _get(pairs, "time", "0 0 0").split()]
        except ValueError as exc:
            raise ProtocolError("bad time attribute") from exc
        times += [0.0] * (3 - len(times))
        count = _int(pairs, "recipient_count")
        if count > 100000:
            raise ProtocolError("recipient_count too large")
        req = cls(
            flags=_int(pairs, "flags", DEL_REQ_FLAG_DEFLT),
            queue_name=_get(pairs, "queue_name"),
            queue_id=_get(pairs, "queue_id"),
            offset=_int(pairs, "offset"),
            size=_int(pairs, "size"),
            nexthop=_get(pairs, "nexthop", ""),
            encoding=_get(pairs, "encoding", ""),
            smtputf8=_int(pairs, "smtputf8", 0),
            sender=_get(pairs, "sender", ""),
            envelope_id=_get(pairs, "envelope_id", ""),
            ret_flags=_int(pairs, "ret_flags", 0),
            arrival=times[0],
            active_arrival=times[1],
            handoff=times[2],
            client_name=_get(pairs, "log_client_name", ""),
            client_address=_get(pairs, "log_client_address", ""),
            client_port=_get(pairs, "log_client_port", ""),
            protocol_name=_get(pairs, "log_protocol_name", ""),
            helo_name=_get(pairs, "log_helo_name", ""),
            rewrite_context=_get(pairs, "rewrite_context", "local"),
        )
        return req, count


def read_request(sock: socket.socket) -> DeliverRequest:
    """Agent side: read a whole request (blocking).

    Raises:
        ProtocolError, OSError.
    """
    dec = AttrDecoder()
    req, count = DeliverRequest.from_common(read_lists(sock, 1, dec)[0])
    return _with_recipients(req, read_lists(sock, count, dec), dec)


def _with_recipients(req: DeliverRequest, lists: list[Pairs], dec: AttrDecoder
                     ) -> DeliverRequest:
    """``req`` with the recipient lists read after it; nothing may follow them."""
    if dec.pending:
        raise ProtocolError("unexpected data after the request")
    req.recipients = [RecipientInfo.from_attrs(p) for p in lists]
    return req


async def read_request_async(sock: socket.socket) -> DeliverRequest:
    """Agent side: :func:`read_request` on a non-blocking socket, with the running
    asyncio loop (``loop.sock_recv``); no timeout of its own.

    Raises:
        ProtocolError, OSError.
    """
    dec = AttrDecoder()
    req, count = DeliverRequest.from_common((await _read_lists_async(sock, 1, dec))[0])
    return _with_recipients(req, await _read_lists_async(sock, count, dec), dec)


async def _read_lists_async(sock: socket.socket, count: int,
                            dec: AttrDecoder) -> list[Pairs]:
    """:func:`read_lists` with ``loop.sock_recv``."""
    import asyncio  # only the agents that serve concurrently get here

    loop = asyncio.get_running_loop()
    got: list[Pairs] = []
    while len(got) < count:
        lst = dec.pop()
        if lst is not None:
            got.append(lst)
            continue
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise ProtocolError("unexpected EOF")
        dec.feed(data)
    return got


@dataclass
class DeliverStatus:
    """An agent's final reply (postfix.md §5.2 item 5).

    status: 0 when every recipient was finished (sent or bounced), non-zero when at
    least one must be retried. The hop fields (dsn_status ... reason) are empty unless
    the whole destination had a site-level problem: that is negative concurrency
    feedback for the qmgr.
    """

    status: int = 0
    dsn_status: str = ""
    diag_type: str = ""
    diag_text: str = ""
    mta_type: str = ""
    mta_mname: str = ""
    action: str = ""
    reason: str = ""
    agent_failed: bool = False  # set by the qmgr's client: no or malformed reply (not sent)

    @property
    def hop_failed(self) -> bool:
        return bool(self.reason)

    def to_attrs(self) -> list[tuple[str, str | int]]:
        return [
            ("status", self.dsn_status),
            ("diag_type", self.diag_type),
            ("diag_text", self.diag_text),
            ("mta_type", self.mta_type),
            ("mta_mname", self.mta_mname),
            ("action", self.action),
            ("reason", self.reason),
            ("status", self.status),
        ]

    @classmethod
    def from_attrs(cls, pairs: Pairs) -> DeliverStatus:
        """Raises ProtocolError unless exactly the 8 attributes, in order."""
        names = [n for n, _ in pairs]
        if names != ["status", "diag_type", "diag_text", "mta_type", "mta_mname", "action",
                     "reason", "status"]:
            raise ProtocolError(f"unexpected reply attributes {names[:10]}")
        final = pairs[7][1]
        if not final.isdigit() or len(final) > 10:
            raise ProtocolError("bad status")
        return cls(
            status=int(final),
            dsn_status=pairs[0][1],
            diag_type=pairs[1][1],
            diag_text=pairs[2][1],
            mta_type=pairs[3][1],
            mta_mname=pairs[4][1],
            action=pairs[5][1],
            reason=pairs[6][1],
        )


@dataclass
class StatusRequest:
    """A request to the bounce/defer/trace service (postfix.md §5.4).

    nrequest: BOUNCE_CMD_FLUSH (bounce notice from ``bounce/<id>`` or, sent to the
    ``defer`` service, an expiry notice from ``defer/<id>``), BOUNCE_CMD_WARN (delay
    warning), BOUNCE_CMD_TRACE (success notice).
    """

    nrequest: int
    queue_name: str
    queue_id: str
    sender: str
    encoding: str = ""
    smtputf8: int = 0
    envelope_id: str = ""
    ret_flags: int = 0
    flags: int = 0

    def to_attrs(self) -> list[tuple[str, str | int]]:
        return [
            ("nrequest", self.nrequest),
            ("flags", self.flags),
            ("queue_name", self.queue_name),
            ("queue_id", self.queue_id),
            ("encoding", self.encoding),
            ("smtputf8", self.smtputf8),
            ("sender", self.sender),
            ("envelope_id", self.envelope_id),
            ("ret_flags", self.ret_flags),
        ]

    @classmethod
    def from_attrs(cls, pairs: Pairs) -> StatusRequest:
        return cls(
            nrequest=_int(pairs, "nrequest"),
            flags=_int(pairs, "flags", 0),
            queue_name=_get(pairs, "queue_name"),
            queue_id=_get(pairs, "queue_id"),
            encoding=_get(pairs, "encoding", ""),
            smtputf8=_int(pairs, "smtputf8", 0),
            sender=_get(pairs, "sender", ""),
            envelope_id=_get(pairs, "envelope_id", ""),
            ret_flags=_int(pairs, "ret_flags", 0),
        )


def protocol_greeting(name: str) -> bytes:
    """The server's first list: ``protocol=<name>``."""
    return encode([("protocol", name)])


def check_greeting(pairs: Sequence[tuple[str, str]], name: str) -> None:
    """Raises ProtocolError unless ``pairs`` is exactly ``protocol=<name>``."""
    if list(pairs) != [("protocol", name)]:
        raise ProtocolError(f"bad protocol greeting {list(pairs)[:2]!r}")
