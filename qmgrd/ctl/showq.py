"""showq — read the mail queue for ``qmgr-ctl list`` the way Postfix's showq(8) does.

Summary
    ``scan()`` walks the message queues in showq's order — ``maildrop``, ``active``,
    ``incoming``, ``deferred``, ``hold`` (postfix.md §7.1) — and yields one
    :class:`QueueEntry` per *ready* queue file (owner rwx, §1.5; files still being written
    are never shown). Files are opened read-only and never locked, so listing never gets
    in the way of the qmgr or a delivery agent.

    Per file (Postfix 3.7 ``showq_report``):

    * arrival time: the ``T`` record's seconds, else the file's mtime;
    * size: field 1 of the ``C`` record (the message data size), else the file size
      (maildrop files written by qmgr-sendmail have no ``C`` record);
    * forced expiration: mode bit ``S_IXGRP`` (``postsuper -e``, §1.5);
    * sender: the ``S`` record, the null sender shown as ``empty_address_recipient``
      (``MAILER-DAEMON``);
    * recipients: first every entry of ``defer/<id>`` with its reason, in log order, then
      each recipient still to do (``R`` records; ``D`` = done is skipped) that the defer
      log did not already name, with an empty reason. The duplicate filter remembers at
      most ``duplicate_filter_limit`` (1000; 0 = no limit) defer-log addresses, as in
      Postfix.

    Addresses are shown in RFC 822 quoted-local form (``quote_822_local``) and, like
    everything shown, with control characters and undecodable bytes replaced by ``?``
    (Postfix ``printable()``).

    A file that vanishes between the directory scan and the read, is no longer ready, or
    does not parse (truncated, garbage, no sender) is skipped silently — the qmgr deals
    with corrupt files. A file that exists but cannot be opened for another reason (e.g.
    EACCES) is skipped with a warning on standard error, like showq's ``msg_warn``.

Public API
    QUEUE_ORDER = ("maildrop", "active", "incoming", "deferred", "hold")
    ShowRecipient(address: str, reason: str)            (NamedTuple; reason "" = none)
    QueueEntry(queue_name, queue_id, arrival_time, message_size, forced_expire, sender,
               recipients)                               (dataclass)
    scan(spool, *, empty_address="MAILER-DAEMON", dup_filter_limit=1000)
        -> Iterator[QueueEntry]                          OSError: a queue directory
                                                         cannot be read
    read_entry(spool, queue, qid, *, empty_address="MAILER-DAEMON",
               dup_filter_limit=1000) -> QueueEntry | None

Writes ``qmgr-ctl: warning: ...`` to stderr for a file or defer log that exists but
cannot be opened; statuslog.read warns about garbage in a defer log. Output is
byte-for-byte that of Postfix 3.7's stand-alone showq on the same queue (checked
against ``postqueue -p``/``-j`` with ``enable_long_queue_ids = yes``).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from qmgrd.spool import records as R
from qmgrd.spool import statuslog
from qmgrd.spool.message import CorruptQueueFile, QueueFile, QueueFileError
from qmgrd.spool.queue import Spool
from qmgrd.spool.records import RecordError, RecordReader

__all__ = ["QUEUE_ORDER", "QueueEntry", "ShowRecipient", "read_entry", "scan"]

QUEUE_ORDER = ("maildrop", "active", "incoming", "deferred", "hold")
_MAILDROP_MAX_LEN = 1 << 24
_PRINTABLE = {c: "?" for c in [*range(32), 127]}


class ShowRecipient(NamedTuple):
    """One recipient as listed: printable quoted address, delay reason ("" = none)."""

    address: str
    reason: str


@dataclass
class QueueEntry:
    """One queue file as showq reports it.

    Attributes:
        queue_name: "maildrop", "active", "incoming", "deferred" or "hold".
        queue_id: the queue id (file name).
        arrival_time: seconds since the epoch (T record, else mtime).
        message_size: bytes (C record field 1, else the file size).
        forced_expire: True when the file has mode bit g+x.
        sender: printable quoted sender (null sender = empty_address_recipient).
        recipients: defer-log recipients with reasons, then the other undone ones.
    """

    queue_name: str
    queue_id: str
    arrival_time: int
    message_size: int
    forced_expire: bool
    sender: str
    recipients: list[ShowRecipient] = field(default_factory=list)


def _printable(text: str) -> str:
    """Postfix printable(text, '?'): control characters and undecodable bytes -> '?'."""
    text = text.translate(_PRINTABLE)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        text = "".join("?" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    return text


def _show_address(address: str, empty_address: str) -> str:
    return _printable(statuslog.quote_822_local(address or empty_address))


class _Envelope(NamedTuple):
    arrival: int
    size: int
    sender: str
    recipients: list[str]


def _read_queue_file(spool: Spool, queue: str, qid: str) -> tuple[_Envelope, os.stat_result]:
    """Read a qmgr-format queue file with QueueFile (no lock, read-only)."""
    with QueueFile.open(spool, queue, qid, lock=None, readonly=True) as qf:
        env = _Envelope(qf.arrival[0], qf.data_size, qf.sender,
                        [r.address for r in qf.recipients])
        return env, qf.st


def _read_maildrop(spool: Spool, qid: str) -> tuple[_Envelope, os.stat_result]:
    """Read a maildrop file leniently, as showq does (records T, C, S, R up to E).

    Raises:
        OSError: open failed.
        QueueFileError: not ready, bad framing, or no sender record.
    """
    fd = os.open(spool.path("maildrop", qid), os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not Spool.is_ready(st):
            raise QueueFileError(f"{qid}: file is not ready")
        arrival = size = 0
        sender: str | None = None
        rcpts: list[str] = []
        try:
            for rec in RecordReader(f, max_len=_MAILDROP_MAX_LEN, offset=0):
                t = rec.rtype
                if t == R.REC_TIME and arrival == 0:
                    arrival = _leading_int(rec.data)
                elif t == R.REC_SIZE and size == 0:
                    size = _leading_int(rec.data)
                elif t == R.REC_FROM:
                    sender = rec.data.decode("utf-8", "surrogateescape")
                elif t == R.REC_RCPT and sender is not None:
                    rcpts.append(rec.data.decode("utf-8", "surrogateescape"))
                elif t == R.REC_END:
                    break
        except RecordError as exc:
            raise CorruptQueueFile(str(exc)) from None
        if sender is None:
            raise CorruptQueueFile(f"{qid}: no sender record")
        return _Envelope(arrival, size, sender, rcpts), st


def _leading_int(data: bytes) -> int:
    """atol(): the leading decimal number of ``data``, 0 when there is none."""
    parts = data.split()
    try:
        return int(parts[0]) if parts else 0
    except ValueError:
        return 0


def read_entry(
    spool: Spool,
    queue: str,
    qid: str,
    *,
    empty_address: str = "MAILER-DAEMON",
    dup_filter_limit: int = 1000,
) -> QueueEntry | None:
    """Read one queue file and its defer log into a QueueEntry.

    Args:
        spool: the queue directory.
        queue: one of QUEUE_ORDER.
        qid: a queue id found by Spool.scan (validated again).
        empty_address: what to show for the null sender (empty_address_recipient).
        dup_filter_limit: how many defer-log addresses to remember (0 = all).

    Returns:
        The entry, or None when the file is gone, not ready or does not parse (and,
        with a warning on stderr, when it cannot be opened for another reason).
    """
    try:
        if queue == "maildrop":
            env, st = _read_maildrop(spool, qid)
        else:
            env, st = _read_queue_file(spool, queue, qid)
    except (FileNotFoundError, QueueFileError, ValueError):
        return None
    except OSError as exc:
        _warn(f"open {queue} {qid}: {exc.strerror}")
        return None
    entry = QueueEntry(
        queue_name=queue,
        queue_id=qid,
        arrival_time=env.arrival if env.arrival > 0 else int(st.st_mtime),
        message_size=env.size if env.size > 0 else st.st_size,
        forced_expire=bool(st.st_mode & stat.S_IXGRP),
        sender=_show_address(env.sender, empty_address),
    )
    seen: set[str] = set()
    try:
        deferred = statuslog.read(spool, "defer", qid)
    except OSError as exc:
        _warn(f"open defer {qid}: {exc.strerror}")
        deferred = []
    for rcpt, dsn in deferred:
        address = _printable(rcpt.address or "<>")
        if dup_filter_limit == 0 or len(seen) < dup_filter_limit:
            seen.add(address)
        entry.recipients.append(ShowRecipient(address, _printable(dsn.reason)))
    for raw in env.recipients:
        address = _show_address(raw, empty_address)
        if address not in seen:
            entry.recipients.append(ShowRecipient(address, ""))
    return entry


def scan(
    spool: Spool,
    *,
    empty_address: str = "MAILER-DAEMON",
    dup_filter_limit: int = 1000,
) -> Iterator[QueueEntry]:
    """Yield a QueueEntry for each ready file in maildrop, active, incoming, deferred, hold.

    Within a queue the order is directory order (as showq). A missing queue directory
    is treated as empty.

    Raises:
        OSError: a queue directory exists but cannot be read (e.g. PermissionError).
    """
    for queue in QUEUE_ORDER:
        for qid in spool.scan(queue):
            entry = read_entry(spool, queue, qid, empty_address=empty_address,
                               dup_filter_limit=dup_filter_limit)
            if entry is not None:
                yield entry


def _warn(msg: str) -> None:
    sys.stderr.write(f"qmgr-ctl: warning: {msg}\n")
