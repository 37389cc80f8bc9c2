"""show — ``qmgr-ctl show ID``: one queue file as Postfix's postcat(1) prints it.

Summary
    The message is looked for in maildrop, incoming, active, deferred, hold and corrupt
    (postcat -q's order, corrupt instead of saved). Output follows postcat (postfix.md
    §7.5) for the records qmgrd writes:

    * with the envelope (``--envelope``, or no section option at all) the sections are
      framed by ``*** ENVELOPE RECORDS <path> ***``, ``*** MESSAGE CONTENTS <path> ***``,
      ``*** HEADER EXTRACTED <path> ***`` and ``*** MESSAGE FILE END <path> ***``;
      without it only the chosen content is printed, unframed (as ``postcat -h``/``-b``);
    * envelope records print as ``<name>: <value>`` with postcat's record names
      (``sender``, ``recipient``, ``done_recipient``, ``original_recipient``,
      ``named_attribute: name=value`` ...); times (``T``, ``W``, ``A create_time``) as
      ``asctime`` in local time; ``C`` raw; pointer and padding records are not shown;
    * content: the header lines (a header and its continuation lines) are the headers;
      everything from the first other line on is the body (``--headers`` stops before
      it, ``--body`` starts with it); ``L`` records join the next ones into one line.

    After the file (with the envelope) come the message's status logs, the entries of
    ``bounce/<id>``, ``defer/<id>`` and ``trace/<id>``, as::

        *** DEFER LOG <id> ***
        recipient: bob@example.net
        status: 4.2.0 (delayed)
        reason: host mx.example.net[192.0.2.1] said: 450 4.2.0 try later

    ``--json``: one object ``{"queue_name", "queue_id", "path", "sender", "recipients":
    [{"address", "done"}], "headers", "body", "logs": {"bounce"|"defer"|"trace":
    [{"recipient", "status", "action", "reason"}]}}`` (text as UTF-8, undecodable bytes
    replaced).

Public API
    SEARCH_ORDER                 queues searched for an id
    locate(spool, qid) -> tuple[str, str] | None     (queue, path); ValueError: bad id;
        PermissionError: a queue directory may not be searched
    render(path, *, envelope, headers, body) -> Iterator[bytes]
        raises OSError (qmgrd.ctl.qread.NotRegular: a FIFO, device or symbolic link,
        opened O_NONBLOCK|O_NOFOLLOW and never read); CorruptQueueFile
        (qmgrd.spool.message) when the file is broken
    render_logs(spool, qid) -> Iterator[bytes]
    as_json(spool, queue, qid, path) -> dict

Logs nothing.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from qmgrd.ctl.qread import open_regular
from qmgrd.spool import statuslog
from qmgrd.spool.message import CorruptQueueFile
from qmgrd.spool.queue import Spool
from qmgrd.spool.records import RecordError, RecordReader

__all__ = ["SEARCH_ORDER", "as_json", "locate", "render", "render_logs"]

SEARCH_ORDER = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
_NAMES = {
    b"C": "message_size", b"T": "message_arrival_time", b"c": "create_time",
    b"F": "sender_fullname", b"I": "content_inspector", b"L": "content_filter",
    b"S": "sender", b"D": "done_recipient", b"R": "recipient", b"O": "original_recipient",
    b"/": "canceled_recipient", b"W": "warning_message_time", b"A": "named_attribute",
    b"K": "killed_recipient", b">": "redirect_to", b"f": "flags", b"d": "deliver_request",
    b"r": "return_receipt", b"e": "errors_to", b"P": "priority", b"V": "verp_delimiters",
    b"<": "dsn_ret_flags", b"i": "dsn_envelope_id", b"o": "dsn_original_recipient",
    b"n": "dsn_notify_flags", b"m": "milter_count",
}
_TIMES = (b"T", b"W", b"c")
_HEADER = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_MAX_JUMPS = 10000


def locate(spool: Spool, qid: str) -> tuple[str, str] | None:
    """The queue and path of message ``qid``, or None when no queue holds it.

    Raises:
        ValueError: ``qid`` is not a valid queue id (checked before any path is made).
        PermissionError: a queue directory cannot be searched (not root or mail_owner)
            and the message was not found elsewhere.
    """
    denied: PermissionError | None = None
    for queue in SEARCH_ORDER:
        path = spool.path(queue, qid)
        try:
            os.lstat(path)
        except PermissionError as exc:
            denied = denied or exc
            continue
        except (FileNotFoundError, NotADirectoryError):
            continue
        return queue, path
    if denied is not None:
        raise denied
    return None


def _asctime(data: bytes) -> str:
    try:
        when = int(data.split()[0])
    except (IndexError, ValueError):
        return data.decode("utf-8", "replace")
    if when <= 0:
        return data.decode("utf-8", "replace")
    return time.asctime(time.localtime(when))


def _records(path: str) -> Iterator[tuple[bytes, bytes]]:
    """Every record of the file in reading order, following pointer records; the file
    is opened (and checked) at once, before the first record is asked for."""
    fd, _ = open_regular(path)  # never a FIFO or a symbolic link (/dev/urandom ...)
    return _read_records(open(fd, "rb"))


def _read_records(f: BinaryIO) -> Iterator[tuple[bytes, bytes]]:
    with f:
        reader = RecordReader(f, offset=0)
        jumps = 0
        try:
            while True:
                rec = reader.read()
                if rec is None:
                    return
                if rec.rtype == b"p":
                    try:
                        target = int(rec.data)
                    except ValueError:
                        raise CorruptQueueFile(f"bad pointer record {rec.data[:20]!r}") from None
                    if target > 0:
                        jumps += 1
                        if jumps > _MAX_JUMPS:
                            raise CorruptQueueFile("pointer loop")
                        reader.seek(target)
                    continue
                yield rec.rtype, rec.data
                if rec.rtype == b"E":
                    return
        except RecordError as exc:
            raise CorruptQueueFile(str(exc)) from None


def _envelope_line(rtype: bytes, data: bytes) -> bytes | None:
    name = _NAMES.get(rtype)
    if rtype in (b"w",):
        return None
    if rtype in _TIMES:
        return f"{name}: {_asctime(data)}\n".encode()
    if rtype == b"A":
        key, _, value = data.partition(b"=")
        if key == b"create_time":
            return f"create_time: {_asctime(value)}\n".encode()
        return b"named_attribute: " + data + b"\n"
    label = (name or f"record_type_{rtype!r}").encode()
    return label + b": " + data + b"\n"


def render(path: str, *, envelope: bool, headers: bool, body: bool) -> Iterator[bytes]:
    """postcat's output for the queue file at ``path`` (see module docstring).

    Raises:
        OSError: the file cannot be read; CorruptQueueFile: bad framing or structure.
    """
    name = path.encode("utf-8", "surrogateescape")
    records = _records(path)  # opened before anything is shown
    if envelope:
        yield b"*** ENVELOPE RECORDS " + name + b" ***\n"
    segment = "envelope"
    in_header = True
    pending = b""
    for rtype, data in records:
        if segment == "content":
            if rtype == b"L":
                pending += data
                continue
            if rtype == b"N":
                line, pending = pending + data, b""
                if in_header and not (_HEADER.match(line)
                                      or (line[:1] in (b" ", b"\t") and line.strip())):
                    in_header = False
                if (headers and in_header) or (body and not in_header):
                    yield line + b"\n"
                continue
            if rtype == b"w":
                continue
            if rtype != b"X":
                raise CorruptQueueFile(f"unexpected record type {rtype!r} in content")
            if pending and ((headers and in_header) or (body and not in_header)):
                yield pending + b"\n"
            segment = "extracted"
            if envelope:
                yield b"*** HEADER EXTRACTED " + name + b" ***\n"
            continue
        if rtype == b"M":
            segment = "content"
            if envelope:
                yield b"*** MESSAGE CONTENTS " + name + b" ***\n"
            continue
        if rtype == b"E":
            if envelope:
                yield b"*** MESSAGE FILE END " + name + b" ***\n"
            return
        if envelope:
            shown = _envelope_line(rtype, data)
            if shown is not None:
                yield shown
    raise CorruptQueueFile("no end record")


def _log_entries(spool: Spool, qid: str) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for name in statuslog.LOGS:
        try:
            entries = statuslog.read(spool, name, qid)
        except OSError:
            continue
        if entries:
            out[name] = [{"recipient": r.address or "<>", "status": d.status,
                          "action": d.action, "reason": d.reason} for r, d in entries]
    return out


def render_logs(spool: Spool, qid: str) -> Iterator[bytes]:
    """The bounce, defer and trace log entries of ``qid`` (nothing when it has none)."""
    for name, entries in _log_entries(spool, qid).items():
        yield f"*** {name.upper()} LOG {qid} ***\n".encode()
        for e in entries:
            yield (f"recipient: {e['recipient']}\nstatus: {e['status']} ({e['action']})\n"
                   f"reason: {e['reason']}\n\n").encode("utf-8", "surrogateescape")


def as_json(spool: Spool, queue: str, qid: str, path: str) -> dict[str, Any]:
    """The message as plain data (``--json``; see module docstring).

    Raises:
        OSError, CorruptQueueFile.
    """
    sender = ""
    rcpts: list[dict[str, Any]] = []
    for rtype, data in _records(path):
        text = data.decode("utf-8", "replace")
        if rtype == b"S":
            sender = text
        elif rtype in (b"R", b"D"):
            rcpts.append({"address": text, "done": rtype == b"D"})
    head = b"".join(render(path, envelope=False, headers=True, body=False))
    body = b"".join(render(path, envelope=False, headers=False, body=True))
    return {"queue_name": queue, "queue_id": qid, "path": path, "sender": sender,
            "recipients": rcpts, "headers": head.decode("utf-8", "replace"),
            "body": body.decode("utf-8", "replace"), "logs": _log_entries(spool, qid)}
