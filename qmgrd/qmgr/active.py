"""active — the active queue: taking files in, reading recipients in batches, assigning them.

Summary
    The active queue is a leaky bucket (postfix.md §4.2-§4.4): the scheduler feeds it one
    file at a time while it holds fewer than ``qmgr_message_active_limit`` messages and
    fewer than ``qmgr_message_recipient_limit`` recipients in memory.

    Feeding a file (qmgr_active_feed): skip names that are not regular files (an
    ``lstat``: a symbolic link named like a queue id is never renamed into ``active/``
    nor read through), files that are not ready (mode) or whose
    mtime is more than 1 s in the future unless the scan ignores time stamps (``A``);
    rename into ``active/``; take an exclusive non-blocking lock (held elsewhere:
    ``<id>: skipped, still being delivered``, back to ``incoming/`` with mtime now+60);
    a structurally broken file, or one the qmgr may not open (not mail_owner's), goes
    to ``corrupt/``. The group-read mode bit asks for a
    per-message flush (revive the dead transports and destinations it needs, ignore
    ``defer_transports``) and is cleared; group-execute forces expiry. The stale
    ``defer/<id>`` log is removed before this attempt writes to it (before the first
    delivery request, a deferral by the qmgr, or the move back to deferred/:
    Message.drop_stale_defer_log), not here as Postfix does (issue 8). Logs
    ``<id>: from=<s>, size=N, nrcpt=N (queue active)``.

    Recipients are read in batches (qmgr_message_read): the first batch holds up to
    max(``qmgr_message_recipient_minimum``, the recipient limit minus the recipients in
    memory), at most 5000; later batches (``refill``) reopen the file without a lock and
    continue at the remembered offset, up to the message's free recipient slots (its
    jobs' share of their transports' pools, qmgrd.qmgr.joblist). A file read to the end
    returns its unused slots.

    (``qmgr_fudge_factor`` belongs to Postfix's old scheduler, oqmgr; this is nqmgr, which
    reads the parameter but gives it no effect.)

    Each batch is resolved and assigned (qmgr_message_resolve, qmgr_message_assign):
    resolver (transport, nexthop); the local ``double_bounce_sender`` is discarded
    (``status=sent`` "undeliverable postmaster notification discarded", marked done);
    forced expiry defers with ``4.7.0 message is administratively expired``;
    ``defer_transports`` (unless flushed) defers with ``4.3.2 deferred transport``; an
    operator's suspension of the recipient domain or nexthop (qmgrd.qmgr.suspend)
    defers with ``4.3.2 delivery to <key> suspended ...`` and a retry at its end; a dead
    transport defers with its saved status and reason, a dead destination with
    ``delivery temporarily suspended: <its reason>`` (no attempt, Postfix's text); the
    queue name is the nexthop, or ``localpart@nexthop`` (address extension removed) when
    the transport's recipient limit is 1. Recipients of one message for one queue are
    batched into entries of ``<transport>_destination_recipient_limit`` (one with VERP).
    Each new entry may trigger the ``qmgr_clog_warn_time`` warning.

Public API
    ActiveQueue(cfg, spool, resolver, clock, owner)
        owner: Owner protocol (transport(name), unthrottle_transport(t),
        unthrottle_queue(q), start_completion(msg))
        .messages (dict qid -> Message), .rcpt_count, .message_limit, .recipient_limit
        .full() -> bool
        .feed(qid, from_queue, scan_all=False, flush=False, path=None) -> bool   taken
                                        in (path: where the scan found it)
        .refill(msg)                    read the next batch (no-op when none is due)
        .release(msg)                   forget a finished message (frees its jobs)
        .recover()                      start-up: active/ -> incoming/ (mtime now)
        .to_corrupt(qid), .back_to_incoming(qid, mtime)
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Protocol

from master import log
from master.config import Config
from qmgrd import logfmt
from qmgrd.qmgr.destqueue import DestQueue
from qmgrd.qmgr.entry import Entry
from qmgrd.qmgr.job import Job
from qmgrd.qmgr.message import Message
from qmgrd.qmgr.peer import Peer
from qmgrd.qmgr.qfile import ActiveFile
from qmgrd.qmgr.resolve import Resolver
from qmgrd.qmgr.scan import scan_failed
from qmgrd.qmgr.suspend import Suspensions
from qmgrd.qmgr.transport import Transport
from qmgrd.spool.envelope import Recipient
from qmgrd.spool.message import CorruptQueueFile, QueueFileLocked, QueueFileNotReady
from qmgrd.spool.queue import Spool
from qmgrd.spool.statuslog import quote_822_local

__all__ = ["ActiveQueue", "Owner", "suspended_reason"]


def suspended_reason(reason: str) -> str:
    """The deferral reason of mail not attempted because its destination is dead:
    Postfix's ``delivery temporarily suspended: <the reason it died>``."""
    return f"delivery temporarily suspended: {reason}"

MAX_BATCH = 5000  # recipients per read, for latency (Postfix's cap)
_STAT_UNTHROTTLE = stat.S_IRGRP
_STAT_EXPIRE = stat.S_IXGRP
_ERROR_TRANSPORTS = ("error", "retry")


class Owner(Protocol):
    """What the active queue needs from the scheduler that owns it."""

    def transport(self, name: str) -> Transport: ...

    def unthrottle_transport(self, t: Transport) -> None: ...

    def unthrottle_queue(self, q: DestQueue) -> None: ...

    def start_completion(self, msg: Message) -> None: ...


class ActiveQueue:
    """The in-memory active queue (see module docstring)."""

    def __init__(self, cfg: Config, spool: Spool, resolver: Resolver,
                 clock: Callable[[], float], owner: Owner) -> None:
        self.spool = spool
        self.resolver = resolver
        self.clock = clock
        self.owner = owner
        self.messages: dict[str, Message] = {}
        self.rcpt_count = 0
        self.message_limit = cfg.get_int("qmgr_message_active_limit")
        self.recipient_limit = cfg.get_int("qmgr_message_recipient_limit")
        self.recipient_minimum = cfg.get_int("qmgr_message_recipient_minimum")
        self.clog_warn_time = cfg.get_time("qmgr_clog_warn_time")
        self.defer_transports = frozenset(cfg.get_list("defer_transports"))
        self.double_bounce = cfg.get("double_bounce_sender").lower()
        self.delimiter = cfg.get("recipient_delimiter")
        self.suspended: Suspensions | None = None  # set by the Scheduler

    def __len__(self) -> int:
        return len(self.messages)

    def full(self) -> bool:
        """True when no more messages may enter (message or recipient limit reached)."""
        return (len(self.messages) >= self.message_limit
                or self.rcpt_count >= self.recipient_limit)

    # ---------------------------------------------------------------- files
    def recover(self) -> None:
        """Start-up: move leftovers from ``active/`` back to ``incoming/`` (mtime now).
        An ``active/`` that cannot be read is fatal (qmgrd.qmgr.scan.scan_failed)."""
        now = self.clock()
        try:
            leftovers = list(self.spool.scan("active"))
        except OSError as exc:
            scan_failed(exc, self.spool.queue_directory)
        for qid in leftovers:
            try:
                path = self.spool.move(qid, "active", "incoming")
                os.utime(path, (now, now))
            except OSError as exc:
                log.warning(f"{qid}: cannot move from active to incoming: {exc}")

    def back_to_incoming(self, qid: str, mtime: float) -> None:
        """Return ``qid`` to ``incoming/`` with the given mtime (retry after it)."""
        try:
            path = self.spool.move(qid, "active", "incoming")
            os.utime(path, (mtime, mtime))
        except OSError as exc:
            log.warning(f"{qid}: cannot move back to incoming: {exc}")

    def to_corrupt(self, qid: str) -> None:
        """Move ``qid`` from ``active/`` to ``corrupt/``."""
        try:
            self.spool.move(qid, "active", "corrupt")
        except OSError as exc:
            log.warning(f"{qid}: cannot move to corrupt: {exc}")

    # ---------------------------------------------------------------- feeding
    def feed(self, qid: str, from_queue: str, scan_all: bool = False,
             flush: bool = False, path: str | None = None) -> bool:
        """Take ``qid`` from ``from_queue`` into the active queue. True when taken in.

        ``path``: where the scan found the file (default ``spool.path(from_queue,
        qid)``); the file is checked and moved from there, so one left in the hash
        directory of other hashing settings (after a reload changed
        ``hash_queue_depth``/``hash_queue_names``) is taken in, not skipped at every
        scan.
        """
        if qid in self.messages:
            return False
        now = self.clock()
        try:
            if path is None:
                path = self.spool.path(from_queue, qid)
            st = os.lstat(path)  # a symbolic link is not a queue file: never followed
        except (OSError, ValueError):
            return False
        if not Spool.is_ready(st):  # regular files only (links, FIFOs, ... skipped)
            return False
        if not scan_all and st.st_mtime > now + 1:
            return False
        try:
            self.spool.move(qid, from_queue, "active", src_path=path)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno != errno.ENOENT:
                log.warning(f"{qid}: cannot move {from_queue} to active: {exc}")
            return False
        budget = min(max(self.recipient_minimum, self.recipient_limit - self.rcpt_count),
                     MAX_BATCH)
        try:
            qf = ActiveFile.first(self.spool, qid, budget)
        except (QueueFileLocked, QueueFileNotReady):
            log.info(f"{qid}: skipped, still being delivered")
            self.back_to_incoming(qid, now + 60)
            return False
        except CorruptQueueFile as exc:
            log.warning(f"{qid}: {exc}: moving to corrupt queue")
            self.to_corrupt(qid)
            return False
        except PermissionError as exc:
            log.warning(f"{qid}: cannot open active queue file: {exc}: moving to corrupt queue")
            self.to_corrupt(qid)
            return False
        except OSError as exc:
            log.warning(f"{qid}: cannot open active queue file: {exc}")
            self.back_to_incoming(qid, now + 60)
            return False
        try:
            msg = self._admit(qf, st.st_mode, flush, now)
        finally:
            qf.close()
        if msg.rcpt_offset == 0:
            self._move_limits(msg)
        if msg.refcount == 0:
            self.owner.start_completion(msg)
        return True

    def _admit(self, qf: ActiveFile, mode: int, flush: bool, now: float) -> Message:
        qid = qf.qid
        if mode & (_STAT_UNTHROTTLE | _STAT_EXPIRE):
            try:
                os.fchmod(qf.fileno(), stat.S_IMODE(mode) & ~_STAT_UNTHROTTLE)
            except OSError as exc:
                log.warning(f"{qid}: cannot clear the flush mode bit: {exc}")
        msg = Message.from_queue_file(qf, now)
        msg.stale_defer_log = True  # removed before this attempt writes one (Message)
        msg.unthrottle = bool(mode & _STAT_UNTHROTTLE)
        msg.flush = flush or msg.unthrottle
        msg.forced_expire = bool(mode & _STAT_EXPIRE)
        msg.rcpt_limit = self.recipient_minimum
        msg.rcpt_offset = qf.rcpt_offset
        msg.rcpt_unread = max(0, qf.undone_count - len(qf.recipients)) if msg.rcpt_offset else 0
        msg.refill_time = now
        msg.nrcpt = qf.rcpt_count or qf.undone_count
        self.messages[qid] = msg
        log.info(f"{qid}: from=<{quote_822_local(msg.sender)}>, size={msg.size}, nrcpt={msg.nrcpt} "
                 f"(queue active)")
        self._assign(msg, qf, qf.recipients, now)
        return msg

    def refill(self, msg: Message) -> None:
        """Read the message's next recipient batch, up to its free recipient slots."""
        if msg.rcpt_offset <= 0:
            return
        limit = min(msg.rcpt_limit - msg.rcpt_count, MAX_BATCH)
        if limit <= 0:
            return
        now = self.clock()
        try:
            qf = ActiveFile.reopen(self.spool, "active", msg.qid, msg.rcpt_offset,
                                   msg.data_offset, msg.data_size)
        except (OSError, ValueError, CorruptQueueFile) as exc:
            self._unreadable(msg, f"cannot reopen queue file: {exc}")
            return
        try:
            rcpts = qf.read_recipients(limit)
            msg.rcpt_offset = qf.rcpt_offset
            msg.rcpt_unread = max(0, msg.rcpt_unread - len(rcpts)) if msg.rcpt_offset else 0
            msg.refill_time = now
            self._assign(msg, qf, rcpts, now)
        except CorruptQueueFile as exc:
            self._unreadable(msg, str(exc))
        finally:
            qf.close()
        if msg.rcpt_offset == 0:
            self._move_limits(msg)

    def _unreadable(self, msg: Message, why: str) -> None:
        log.warning(f"{msg.qid}: {why}: the file will be moved to the corrupt queue")
        msg.corrupt = True
        msg.rcpt_offset = 0
        msg.rcpt_unread = 0

    @staticmethod
    def _move_limits(msg: Message) -> None:
        for job in list(msg.jobs.values()):
            job.joblist.move_limits(job)

    def release(self, msg: Message) -> None:
        """Forget a finished message: its jobs give their recipient slots back."""
        for job in list(msg.jobs.values()):
            job.joblist.free(job)
        self.messages.pop(msg.qid, None)

    # ---------------------------------------------------------------- resolve, assign
    def _queue_name(self, t: Transport, address: str, nexthop: str) -> str:
        if t.params.recipient_limit != 1 or t.name in _ERROR_TRANSPORTS:
            return nexthop.lower()
        local = address.rpartition("@")[0] if "@" in address else address
        for ch in self.delimiter:
            if ch and ch in local:
                local = local.split(ch, 1)[0]
                break
        return f"{local}@{nexthop}".lower()

    def _assign(self, msg: Message, qf: ActiveFile, rcpts: list[Recipient], now: float) -> None:
        """Resolve ``rcpts`` and put them into entries (see module docstring)."""
        routed: list[tuple[str, str, Transport, DestQueue, Recipient]] = []
        deferred: dict[tuple[str, str], list[Recipient]] = {}
        for rcpt in rcpts:
            res = self.resolver.resolve(rcpt.address)
            if res.local and res.address.rpartition("@")[0].lower() == self.double_bounce:
                self._discard(msg, qf, rcpt, now)
                continue
            if msg.forced_expire:
                deferred.setdefault(("4.7.0", "message is administratively expired"),
                                    []).append(rcpt)
                continue
            if res.transport in self.defer_transports and not msg.flush:
                deferred.setdefault(("4.3.2", "deferred transport"), []).append(rcpt)
                continue
            hit = self.suspended.match(rcpt.address, res.nexthop) if self.suspended else None
            if hit is not None:  # qmgr-ctl suspend: no attempt until it ends
                deferred.setdefault(("4.3.2", hit.text), []).append(rcpt)
                if hit.until and (not msg.retry_at or hit.until < msg.retry_at):
                    msg.retry_at = hit.until
                continue
            t = self.owner.transport(res.transport)
            if t.dead and msg.unthrottle:
                self.owner.unthrottle_transport(t)
            if t.dead:
                deferred.setdefault((t.dead_status, t.dead_reason), []).append(rcpt)
                continue
            qname = self._queue_name(t, res.address, res.nexthop)
            q = t.queue_find(qname)
            if q is not None and q.dead and msg.unthrottle:
                self.owner.unthrottle_queue(q)
                q = t.queue_find(qname)  # an empty revived queue is forgotten at once
            if q is not None and q.dead:
                deferred.setdefault((q.dead_status, suspended_reason(q.dead_reason)),
                                    []).append(rcpt)
                continue
            if q is None:
                q = t.queue_obtain(qname, res.nexthop)
            routed.append((t.name, q.name, t, q, rcpt))
        for (status, reason), group in deferred.items():
            msg.defer_recipients(self.spool, group, status, reason, now)
        routed.sort(key=lambda r: (r[0], r[1]))
        job: Job | None = None
        peer: Peer | None = None
        for _, _, t, q, rcpt in routed:
            if job is None or job.joblist is not t.jobs:
                job = t.jobs.obtain(msg)
                peer = None
            if peer is None or peer.queue is not q:
                peer = job.peer_obtain(q)
            tail = peer.entries.tail
            entry: Entry | None = tail.owner if tail is not None else None
            limit = t.params.recipient_limit
            if msg.single_rcpt or entry is None or (limit and len(entry.recipients) >= limit):
                entry = t.jobs.new_entry(peer)
                q.clog_check(now, self.message_limit, len(self.messages), self.clog_warn_time,
                             t.params.concurrency_limit, len(t.queues) > 1)
            entry.recipients.append(rcpt)
            job.rcpt_count += 1
            msg.rcpt_count += 1
            self.rcpt_count += 1
        for j in msg.jobs.values():
            if j.has_entries and j.blocker_tag != j.joblist.blocker_tag:
                j.joblist.candidate_cache_current = None

    def _discard(self, msg: Message, qf: ActiveFile, rcpt: Recipient, now: float) -> None:
        """Mail to the local double-bounce address: log as sent and mark done."""
        reason = "undeliverable postmaster notification discarded"
        try:
            qf.mark_done(rcpt.offset)
        except (CorruptQueueFile, OSError) as exc:
            log.warning(f"{msg.qid}: cannot mark recipient done: {exc}")
            msg.corrupt = True
            return
        log.info(logfmt.delivery_line(
            msg.qid, rcpt.address, rcpt.orig_rcpt, "none", msg.arrival, msg.active_arrival,
            now, now, now, "2.0.0", "sent", reason))
        log.warning(f"{msg.qid}: {reason}")
