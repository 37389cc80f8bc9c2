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

    A file that vanishes between the directory scan and the read, or is not ready yet,
    is skipped silently. A ready file that does not parse (truncated, garbage, no
    sender) is skipped with a warning on standard error, like showq's ``msg_warn``:
    ``qmgr-ctl: warning: deferred/<id>: damaged queue file: truncated: a record runs
    past the end of the file; skipped`` (qmgrd.ctl.qread.Damaged; the listing on
    standard output stays complete and, with --json, parseable). A file that exists
    but cannot be opened for another reason (e.g. EACCES) is skipped with a warning; so is
    anything that is not a regular file (a FIFO or symbolic link planted in the
    world-writable maildrop): files are opened O_NONBLOCK|O_NOFOLLOW and fstat-checked
    (qmgrd.ctl.qread.open_regular), so such an entry never blocks a listing.

Public API
    QUEUE_ORDER = ("maildrop", "active", "incoming", "deferred", "hold")
    ShowRecipient(address: str, reason: str)            (NamedTuple; reason "" = none)
    QueueEntry(queue_name, queue_id, arrival_time, message_size, forced_expire, sender,
               recipients, raw_sender, raw_recipients, last_reason)   (dataclass)
    scan(spool, *, empty_address="MAILER-DAEMON", dup_filter_limit=1000,
         queues=QUEUE_ORDER) -> Iterator[QueueEntry]     OSError: a queue directory
                                                         cannot be read
    read_entry(spool, queue, qid, *, empty_address="MAILER-DAEMON",
               dup_filter_limit=1000, path=None, defer_ids=None) -> QueueEntry | None
    walk(spool, queue) -> Iterator[(qid, path)]          names only, nothing opened
    defer_log_ids(spool) -> dict[str, str]               ids with a defer log -> path

Speed: files are read with qmgrd.ctl.qread (one pread each, no locks), and the defer
directory is listed once per scan instead of trying to open a log per message, so a
listing of 100,000 messages streams at once and ends in a few seconds
(bench/ctl_list.py).

Writes ``qmgr-ctl: warning: ...`` to stderr for a damaged queue file and for a file or
defer log that exists but cannot be opened; statuslog.read warns about garbage in a defer log. Output is
byte-for-byte that of Postfix 3.7's stand-alone showq on the same queue (checked
against ``postqueue -p``/``-j`` with ``enable_long_queue_ids = yes``).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from qmgrd.ctl.qread import Damaged, open_ready, open_regular, read_envelope
from qmgrd.ctl.queues import QUEUE_ORDER
from qmgrd.spool import statuslog
from qmgrd.spool.queue import Spool
from qmgrd.spool.queueid import valid_id

__all__ = ["QUEUE_ORDER", "QueueEntry", "ShowRecipient", "defer_log_ids", "read_entry",
           "scan", "walk"]

_PRINTABLE = {c: "?" for c in [*range(32), 127]}
_ATTR_NAME = re.compile(r"[A-Za-z0-9_]*[A-Za-z0-9][A-Za-z0-9_]*\Z")
_INT = re.compile(r"-?\d+\Z")
_PLAIN = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                    r"@[A-Za-z0-9._-]+\Z")


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
        raw_sender: the sender as stored ("" = null sender), for selectors.
        raw_recipients: the undone recipients as stored, for selectors.
        last_reason: the reason of the defer log's last entry ("" = no defer log).
    """

    queue_name: str
    queue_id: str
    arrival_time: int
    message_size: int
    forced_expire: bool
    sender: str
    recipients: list[ShowRecipient] = field(default_factory=list)
    raw_sender: str = ""
    raw_recipients: list[str] = field(default_factory=list)
    last_reason: str = ""


def _printable(text: str) -> str:
    """Postfix printable(text, '?'): control characters and undecodable bytes -> '?'."""
    if text.isascii():
        return text if text.isprintable() else text.translate(_PRINTABLE)
    text = text.translate(_PRINTABLE)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        text = "".join("?" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    return text


def _show_address(address: str, empty_address: str) -> str:
    if _PLAIN.match(address):  # the common case: nothing to quote or replace
        return address
    return _printable(statuslog.quote_822_local(address or empty_address))


def walk(spool: Spool, queue: str) -> Iterator[tuple[str, str]]:
    """Yield (queue id, path) of every file with a valid id in ``queue`` (hash
    directories included, directory order, nothing opened). A missing queue is empty.

    Raises:
        OSError: a directory exists but cannot be read.
    """
    yield from _walk(spool.queue_path(queue), 11)


def _walk(path: str, depth_left: int) -> Iterator[tuple[str, str]]:
    try:
        it = os.scandir(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    subdirs: list[str] = []
    with it:
        for entry in it:
            name = entry.name
            if len(name) == 1 and depth_left > 1:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
                        continue
                except OSError:
                    continue
            if valid_id(name):
                yield name, entry.path
    for sub in subdirs:
        yield from _walk(sub, depth_left - 1)


def defer_log_ids(spool: Spool) -> dict[str, str]:
    """The ids that have a ``defer/`` log now, with its path (one directory walk, no
    file opened).

    Raises:
        OSError: the defer directory exists but cannot be read.
    """
    return dict(walk(spool, "defer"))


def _defer_reasons(spool: Spool, qid: str, path: str | None) -> list[tuple[str, str]]:
    """(recipient, reason) of each entry of ``defer/<qid>``, in log order.

    The common case is parsed here without building Recipient/Dsn objects or taking a
    lock (showq takes none); anything unusual in the log (a line that is not
    ``name=value``, an entry without recipient, a bad number) is left to
    qmgrd.spool.statuslog.read, which skips garbage with a warning.

    Raises:
        OSError: the log exists but cannot be read.
    """
    try:
        fd, _ = open_regular(path or spool.path("defer", qid))
    except FileNotFoundError:
        return []
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    out: list[tuple[str, str]] = []
    rcpt: str | None = None
    reason = ""
    seen = False
    for line in b"".join(chunks).decode("utf-8", "surrogateescape").split("\n"):
        if not line or line.isspace():
            if seen:
                if rcpt is None:
                    return _slow_defer_reasons(spool, qid)
                out.append((rcpt, reason))
                rcpt, reason, seen = None, "", False
            continue
        if not seen and line[0] == "<":
            continue
        key, sep, value = line.partition("=")
        if not sep or not _ATTR_NAME.match(key):
            return _slow_defer_reasons(spool, qid)
        seen = True
        if key == "recipient":
            rcpt = "" if value == "<>" else value
        elif key == "reason":
            reason = value
        elif key in ("offset", "notify_flags") and not _INT.match(value):
            return _slow_defer_reasons(spool, qid)
    if seen:
        if rcpt is None:
            return _slow_defer_reasons(spool, qid)
        out.append((rcpt, reason))
    return out


def _slow_defer_reasons(spool: Spool, qid: str) -> list[tuple[str, str]]:
    return [(r.address, d.reason) for r, d in statuslog.read(spool, "defer", qid)]


def read_entry(
    spool: Spool,
    queue: str,
    qid: str,
    *,
    empty_address: str = "MAILER-DAEMON",
    dup_filter_limit: int = 1000,
    path: str | None = None,
    defer_ids: dict[str, str] | None = None,
) -> QueueEntry | None:
    """Read one queue file and its defer log into a QueueEntry.

    Args:
        spool: the queue directory.
        queue: one of QUEUE_ORDER.
        qid: a queue id found by a directory scan (validated again).
        empty_address: what to show for the null sender (empty_address_recipient).
        dup_filter_limit: how many defer-log addresses to remember (0 = all).
        path: the file's path when already known (else computed from queue and id).
        defer_ids: ids known to have a defer log, with its path (None: look for one).

    Returns:
        The entry, or None when the file is gone or not ready (and, with a warning on
        stderr, when it does not parse or cannot be opened for another reason).
    """
    try:
        if path is None:
            path = spool.path(queue, qid)
        opened = open_ready(path)
    except ValueError:
        return None
    except OSError as exc:
        _warn(f"open {queue} {qid}: {exc.strerror}")
        return None
    if opened is None:
        return None
    fd, st = opened
    try:
        env = read_envelope(fd, st.st_size, maildrop=queue == "maildrop")
    except Damaged as exc:
        _warn(f"{queue}/{qid}: damaged queue file: {exc}; skipped")
        return None
    except OSError as exc:
        _warn(f"read {queue} {qid}: {exc.strerror}")
        return None
    finally:
        os.close(fd)
    if env.sender is None:  # read_envelope raises Damaged first: for the type checker
        return None
    entry = QueueEntry(
        queue_name=queue,
        queue_id=qid,
        arrival_time=env.arrival if env.arrival > 0 else int(st.st_mtime),
        message_size=env.size if env.size > 0 else st.st_size,
        forced_expire=bool(st.st_mode & stat.S_IXGRP),
        sender=_show_address(env.sender, empty_address),
        raw_sender=env.sender,
        raw_recipients=env.recipients,
    )
    seen: set[str] = set()
    deferred: list[tuple[str, str]] = []
    if defer_ids is None or qid in defer_ids:
        try:
            deferred = _defer_reasons(spool, qid, defer_ids.get(qid) if defer_ids else None)
        except OSError as exc:
            _warn(f"open defer {qid}: {exc.strerror}")
    for raw, reason in deferred:
        address = _printable(raw or "<>")
        if dup_filter_limit == 0 or len(seen) < dup_filter_limit:
            seen.add(address)
        entry.recipients.append(ShowRecipient(address, _printable(reason)))
    if deferred:
        entry.last_reason = deferred[-1][1]
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
    queues: Iterable[str] = QUEUE_ORDER,
) -> Iterator[QueueEntry]:
    """Yield a QueueEntry for each ready file in maildrop, active, incoming, deferred, hold.

    Within a queue the order is directory order (as showq). A missing queue directory
    is treated as empty. ``queues`` restricts the scan (kept in showq's order).

    Raises:
        OSError: a queue directory exists but cannot be read (e.g. PermissionError).
    """
    wanted = set(queues)
    defer_ids = defer_log_ids(spool)
    for queue in QUEUE_ORDER:
        if queue not in wanted:
            continue
        for qid, path in walk(spool, queue):
            entry = read_entry(spool, queue, qid, empty_address=empty_address,
                               dup_filter_limit=dup_filter_limit, path=path,
                               defer_ids=defer_ids)
            if entry is not None:
                yield entry


def _warn(msg: str) -> None:
    sys.stderr.write(f"qmgr-ctl: warning: {msg}\n")
