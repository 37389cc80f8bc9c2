"""scheduler — the qmgr: moves mail through the active queue to the delivery agents.

Summary
    One Scheduler object owns all qmgr state (postfix.md §4): the two scans, the active
    queue, transports and their destination queues. Its loop does, in turn:

    * feed: while the active queue holds fewer than ``qmgr_message_active_limit``
      messages, take ONE file from the scans, alternating incoming and deferred (after a
      feed the other queue goes first; when the active queue is full, incoming is
      preferred), move it to ``active/``, lock, read, resolve every recipient, group
      recipients per (transport, destination) into entries of at most
      ``<transport>_destination_recipient_limit``;
    * dispatch: for each transport, round robin across destinations, start deliveries
      while the destination's concurrency window and the transport's process limit allow;
    * react to agent replies: concurrency feedback, dead destinations, dead transports;
    * complete messages whose last entry finished: send the non-delivery notice (bounce
      service), then remove the file, or — when a recipient was deferred — set its
      mtime to now + backoff (message age clamped to minimal_backoff_time ..
      maximal_backoff_time) and move it to ``deferred/``; expired messages
      (``maximal_queue_lifetime``, ``bounce_queue_lifetime`` for the null sender) are
      returned to the sender through the ``defer`` service.

    Triggers (one byte each): I/W incoming scan, D deferred scan, A ignore time stamps,
    F forget dead transports and destinations. Unknown bytes are ignored (a warning once
    per kind). A deferred scan also runs every ``queue_run_delay``.

Logs (Postfix's lines): ``<id>: from=<s>, size=N, nrcpt=N (queue active)``,
``<id>: removed``, ``<id>: from=<s>, status=expired, returned to sender``,
``<id>: skipped, still being delivered``, per-recipient ``status=deferred`` lines for
mail the qmgr defers itself; warnings for corrupt files (moved to ``corrupt/``).

Public API
    Scheduler(cfg, spool, client, clock=time.time, process_limits={}, resolver=None)
    .startup()                 move active/ back to incoming/ and start both scans
    .trigger(data: bytes)      handle trigger bytes
    .step() -> bool            one feed + dispatch round; True when it did work
    async run(stopping)        the loop; returns after in-flight deliveries finished
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from typing import Any

from master import log
from master.config import Config
from qmgrd import logfmt
from qmgrd.delivery import BOUNCE_CMD_FLUSH, DeliverRequest, RecipientInfo, StatusRequest
from qmgrd.qmgr.client import AgentClient, TransportUnavailable
from qmgrd.qmgr.feedback import feedback_value, negative, parse_feedback, positive
from qmgrd.qmgr.message import Message
from qmgrd.qmgr.resolve import Resolver
from qmgrd.qmgr.scan import Scan
from qmgrd.qmgr.transport import Entry, Transport
from qmgrd.spool import statuslog
from qmgrd.spool.message import (
    CorruptQueueFile,
    QueueFile,
    QueueFileLocked,
    QueueFileNotReady,
)
from qmgrd.spool.queue import Spool

__all__ = ["Scheduler"]

_TRIGGER_CODES = frozenset(b"IWDAF")


class Scheduler:
    """The queue manager's state and loop (see module docstring)."""

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        client: AgentClient,
        clock: Callable[[], float] = time.time,
        process_limits: dict[str, int] | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.client = client
        self.clock = clock
        self.process_limits = process_limits or {}
        self.resolver = resolver if resolver is not None else Resolver(cfg)
        self.active_limit = cfg.get_int("qmgr_message_active_limit")
        self.min_backoff = cfg.get_time("minimal_backoff_time")
        self.max_backoff = cfg.get_time("maximal_backoff_time")
        self.max_lifetime = cfg.get_time("maximal_queue_lifetime")
        self.bounce_lifetime = min(cfg.get_time("bounce_queue_lifetime"), self.max_lifetime)
        self.transport_retry_time = cfg.get_time("transport_retry_time")
        self.queue_run_delay = cfg.get_time("queue_run_delay")
        self.double_bounce = cfg.get("double_bounce_sender").lower()
        self.default_process_limit = cfg.get_int("default_process_limit")
        self.incoming = Scan("incoming", lambda: spool.scan("incoming"))
        self.deferred = Scan("deferred", lambda: spool.scan("deferred"))
        self._incoming_first = True
        self.active: dict[str, Message] = {}
        self.transports: dict[str, Transport] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.wakeup = asyncio.Event()
        self._warned_bytes: set[int] = set()
        self._next_deferred_scan = 0.0
        self.stopping = False

    # ---------------------------------------------------------------- triggers
    def trigger(self, data: bytes) -> None:
        """Handle one read of trigger bytes (untrusted: unknown bytes are ignored)."""
        codes = set(data)
        for b in codes - _TRIGGER_CODES:
            if b != 0 and b not in self._warned_bytes:
                self._warned_bytes.add(b)
                log.warning(f"ignoring unknown trigger request: {bytes([b])!r}")
        scan_all = ord("A") in codes
        if ord("F") in codes:
            self.flush_dead()
        if ord("I") in codes or ord("W") in codes:
            self.incoming.request(scan_all)
        if ord("D") in codes:
            self.deferred.request(scan_all)
        elif scan_all:
            self.incoming.request(True)
        self.wakeup.set()

    def flush_dead(self) -> None:
        """Forget every dead transport and destination (trigger F)."""
        for t in self.transports.values():
            t.dead_until = 0.0
            t.dead_reason = ""
            for q in list(t.queues.values()):
                if q.dead_until:
                    q.revive()
                    t.make_ready(q, self.clock())
                    t.drop_idle_queue(q)

    # ---------------------------------------------------------------- start-up
    def startup(self) -> None:
        """Move leftovers from active/ to incoming/ (mtime now) and start both scans."""
        now = self.clock()
        for qid in list(self.spool.scan("active")):
            try:
                path = self.spool.move(qid, "active", "incoming")
                os.utime(path, (now, now))
            except OSError as exc:
                log.warning(f"{qid}: cannot move from active to incoming: {exc}")
        self.incoming.request()
        self.deferred.request()
        self._next_deferred_scan = now + self.queue_run_delay

    # ---------------------------------------------------------------- transports
    def transport(self, name: str) -> Transport:
        """Find or create the in-memory transport ``name`` with its parameters."""
        t = self.transports.get(name)
        if t is None:
            cfg = self.cfg

            def feedback(suffix: str) -> tuple[float, bool]:
                text = cfg.transport_param(name, suffix)
                try:
                    return parse_feedback(text)
                except ValueError:
                    log.warning(f"{name}{suffix}: bad value {text!r}; using 1")
                    return (1.0, False)

            maxproc = self.process_limits.get(name, self.default_process_limit)
            t = Transport(
                name,
                recipient_limit=cfg.transport_int(name, "_destination_recipient_limit"),
                concurrency_limit=cfg.transport_int(name, "_destination_concurrency_limit"),
                initial_concurrency=cfg.transport_int(name, "_initial_destination_concurrency"),
                max_inflight=maxproc if maxproc > 0 else self.default_process_limit,
                positive=feedback("_destination_concurrency_positive_feedback"),
                negative=feedback("_destination_concurrency_negative_feedback"),
                cohort_limit=cfg.transport_int(
                    name, "_destination_concurrency_failed_cohort_limit"
                ),
            )
            self.transports[name] = t
        return t

    # ---------------------------------------------------------------- feeding
    def _next_file(self) -> tuple[str, Scan] | None:
        order = (self.incoming, self.deferred) if self._incoming_first else (
            self.deferred, self.incoming)
        for scan in order:
            qid = scan.next()
            if qid is not None:
                self._incoming_first = scan is not self.incoming
                return qid, scan
        return None

    def feed_one(self) -> bool:
        """Take one file from the scans into the active queue. True if a name was taken."""
        if len(self.active) >= self.active_limit:
            self._incoming_first = True
            return False
        nxt = self._next_file()
        if nxt is None:
            return False
        qid, scan = nxt
        if qid not in self.active:
            self._feed(qid, scan.name, scan.scan_all)
        return True

    def _feed(self, qid: str, from_queue: str, scan_all: bool) -> None:
        now = self.clock()
        path = self.spool.path(from_queue, qid)
        try:
            st = os.stat(path)
        except OSError:
            return
        if st.st_mode & 0o700 != 0o700:
            return
        if not scan_all and st.st_mtime > now + 1:
            return
        try:
            apath = self.spool.move(qid, from_queue, "active")
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning(f"{qid}: cannot move {from_queue} to active: {exc}")
            return
        try:
            qf = QueueFile.open(self.spool, "active", qid, lock="ex")
        except (QueueFileLocked, QueueFileNotReady):
            log.info(f"{qid}: skipped, still being delivered")
            self._back_to_incoming(qid, now + 60)
            return
        except CorruptQueueFile as exc:
            log.warning(f"{qid}: {exc}: moving to corrupt queue")
            self._to_corrupt(qid)
            return
        except OSError as exc:
            log.warning(f"{qid}: cannot open {apath}: {exc}")
            self._back_to_incoming(qid, now + 60)
            return
        try:
            self._read_message(qf, qid, now)
        except CorruptQueueFile as exc:
            log.warning(f"{qid}: {exc}: moving to corrupt queue")
            self.active.pop(qid, None)
            self._to_corrupt(qid)
        finally:
            qf.close()
        msg = self.active.get(qid)
        if msg is not None and msg.refcount == 0:
            self._start_completion(msg)

    def _read_message(self, qf: QueueFile, qid: str, now: float) -> None:
        try:
            os.unlink(self.spool.path("defer", qid))
        except OSError:
            pass
        msg = Message.from_queue_file(qf, now)
        recipients = list(qf.recipients)
        msg.nrcpt = len(recipients)
        self.active[qid] = msg
        log.info(f"{qid}: from=<{msg.sender}>, size={msg.size}, nrcpt={msg.nrcpt} (queue active)")
        groups: dict[tuple[str, str], tuple[str, list[Any]]] = {}
        for rcpt in recipients:
            res = self.resolver.resolve(rcpt.address)
            if res.local and rcpt.address.rpartition("@")[0].lower() == self.double_bounce:
                qf.mark_done(rcpt.offset)
                log.info(logfmt.delivery_line(
                    qid, rcpt.address, rcpt.orig_rcpt, "none", msg.arrival, now, now, now, now,
                    "2.0.0", "sent", "undeliverable postmaster notification discarded"))
                continue
            t = self.transport(res.transport)
            qname = res.nexthop
            if t.recipient_limit == 1 and res.transport not in ("error", "retry"):
                qname = rcpt.address.rpartition("@")[0] + "@" + res.nexthop
            groups.setdefault((res.transport, qname.lower()), (res.nexthop, []))[1].append(rcpt)
        for (tname, qname), (nexthop, rcpts) in groups.items():
            t = self.transports[tname]
            q = t.queue_for(qname, nexthop)
            if t.dead(now):
                self._defer_now(msg, rcpts, "4.3.0", t.dead_reason or "mail transport unavailable")
                t.drop_idle_queue(q)
                continue
            if q.dead(now):
                self._defer_now(msg, rcpts, q.dead_status or "4.4.1", q.dead_reason)
                continue
            limit = t.recipient_limit if t.recipient_limit > 0 else len(rcpts)
            for i in range(0, len(rcpts), limit):
                q.todo.append(Entry(msg, q, rcpts[i : i + limit]))
                msg.refcount += 1
            t.make_ready(q, now)

    def _back_to_incoming(self, qid: str, mtime: float) -> None:
        try:
            path = self.spool.move(qid, "active", "incoming")
            os.utime(path, (mtime, mtime))
        except OSError as exc:
            log.warning(f"{qid}: cannot move back to incoming: {exc}")

    def _to_corrupt(self, qid: str) -> None:
        try:
            self.spool.move(qid, "active", "corrupt")
        except OSError as exc:
            log.warning(f"{qid}: cannot move to corrupt: {exc}")

    def _defer_now(self, msg: Message, rcpts: list[Any], status: str, reason: str) -> None:
        """Defer recipients without a delivery attempt: defer log + Postfix log line."""
        now = self.clock()
        msg.deferred = True
        for rcpt in rcpts:
            try:
                statuslog.append(
                    self.spool, "defer", msg.qid, rcpt,
                    statuslog.Dsn(status=status, action="delayed", reason=reason),
                )
            except OSError as exc:
                log.warning(f"{msg.qid}: cannot update defer log: {exc}")
            log.info(logfmt.delivery_line(
                msg.qid, rcpt.address, rcpt.orig_rcpt, "none", msg.arrival, msg.active_arrival,
                now, now, now, status, "deferred", reason))

    # ---------------------------------------------------------------- dispatch
    def dispatch(self) -> bool:
        """Start every delivery that the windows allow. True if any started."""
        if self.stopping:
            return False
        now = self.clock()
        started = False
        for t in list(self.transports.values()):
            while True:
                entry = t.next_entry(now)
                if entry is None:
                    break
                started = True
                self._spawn(self._deliver(entry))
        return started

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error(f"qmgr task failed: {exc!r}")
        self.wakeup.set()

    def _request(self, entry: Entry) -> DeliverRequest:
        m = entry.message
        return DeliverRequest(
            queue_name="active",
            queue_id=m.qid,
            offset=m.data_offset,
            size=m.size,
            nexthop=entry.queue.nexthop,
            sender=m.sender,
            recipients=[
                RecipientInfo(r.address, r.orig_rcpt, r.offset, r.dsn_orcpt, r.notify)
                for r in entry.recipients
            ],
            encoding=m.encoding,
            smtputf8=m.smtputf8,
            envelope_id=m.envid,
            ret_flags=m.ret,
            arrival=m.arrival,
            active_arrival=m.active_arrival,
            handoff=self.clock(),
            client_name=m.client_name,
            client_address=m.client_address,
            protocol_name=m.protocol_name,
            helo_name=m.helo_name,
            rewrite_context=m.rewrite_context,
        )

    async def _deliver(self, entry: Entry) -> None:
        q = entry.queue
        t = q.transport
        try:
            status = await self.client.deliver(t.name, self._request(entry))
        except TransportUnavailable as exc:
            log.warning(f"connect to transport private/{t.name}: {exc}")
            self._transport_dead(t, "mail transport unavailable")
            self._entry_done(entry, failed=True, reason="mail transport unavailable",
                             dsn_status="4.3.0")
            return
        now = self.clock()
        if status.hop_failed:
            dead = negative(q.window, feedback_value(t.negative, q.window.window), t.cohort_limit)
            if dead:
                q.dead_until = now + self.min_backoff
                q.dead_reason = status.reason
                q.dead_status = status.dsn_status or "4.4.1"
                for e in list(q.todo):
                    self._defer_now(e.message, e.recipients, q.dead_status, q.dead_reason)
                pending = list(q.todo)
                q.todo.clear()
                for e in pending:
                    self._release(e.message)
        else:
            positive(q.window, feedback_value(t.positive, q.window.window), q.busy,
                     t.initial_concurrency, t.concurrency_limit)
        if t.dead_until:
            t.dead_until = 0.0
            t.dead_reason = ""
        self._entry_done(entry, failed=status.status != 0)

    def _transport_dead(self, t: Transport, reason: str) -> None:
        now = self.clock()
        if not t.dead_until:
            log.warning(f"transport {t.name}: suspended for {self.transport_retry_time}s: {reason}")
        t.dead_until = now + self.transport_retry_time
        t.dead_reason = reason
        for q in list(t.queues.values()):
            pending = list(q.todo)
            q.todo.clear()
            for e in pending:
                self._defer_now(e.message, e.recipients, "4.3.0", reason)
                self._release(e.message)
            t.drop_idle_queue(q)

    def _entry_done(self, entry: Entry, failed: bool, reason: str = "",
                    dsn_status: str = "") -> None:
        q = entry.queue
        t = q.transport
        q.busy -= 1
        t.inflight -= 1
        if failed:
            entry.message.deferred = True
            if reason:
                self._defer_now(entry.message, entry.recipients, dsn_status or "4.3.0", reason)
        t.make_ready(q, self.clock())
        t.drop_idle_queue(q)
        self._release(entry.message)

    def _release(self, msg: Message) -> None:
        msg.refcount -= 1
        if msg.refcount <= 0:
            self._start_completion(msg)

    # ---------------------------------------------------------------- completion
    def _start_completion(self, msg: Message) -> None:
        if msg.completing:
            return
        msg.completing = True
        self._spawn(self._complete(msg))

    def _status_request(self, msg: Message, nrequest: int) -> StatusRequest:
        return StatusRequest(
            nrequest=nrequest, queue_name="active", queue_id=msg.qid, sender=msg.sender,
            encoding=msg.encoding, smtputf8=msg.smtputf8, envelope_id=msg.envid,
            ret_flags=msg.ret,
        )

    async def _complete(self, msg: Message) -> None:
        """Finish a message whose entries are all done (postfix.md §4.9)."""
        qid = msg.qid
        try:
            bpath = self.spool.path("bounce", qid)
            try:
                bsize = os.stat(bpath).st_size
            except OSError:
                bsize = -1
            if bsize == 0:
                os.unlink(bpath)
            elif bsize > 0:
                ok = await self.client.status_request(
                    "bounce", self._status_request(msg, BOUNCE_CMD_FLUSH))
                if not ok:
                    msg.deferred = True
            path = self.spool.path("active", qid)
            try:
                st = os.stat(path)
            except OSError as exc:
                log.warning(f"{qid}: active queue file vanished: {exc}")
                return
            if st.st_mode & 0o700 != 0o700:
                log.warning(f"{qid}: queue file marked corrupt: moving to corrupt queue")
                self._to_corrupt(qid)
                return
            now = self.clock()
            if msg.deferred:
                lifetime = self.bounce_lifetime if not msg.sender else self.max_lifetime
                if now >= msg.create_time + lifetime:
                    log.info(f"{qid}: from=<{msg.sender}>, status=expired, returned to sender")
                    ok = await self.client.status_request(
                        "defer", self._status_request(msg, BOUNCE_CMD_FLUSH))
                    if ok:
                        self._remove(qid)
                        return
                delay = min(max(now - msg.create_time, self.min_backoff), self.max_backoff)
                try:
                    os.utime(path, (now + delay, now + delay))
                    self.spool.move(qid, "active", "deferred")
                except OSError as exc:
                    log.warning(f"{qid}: cannot move to deferred: {exc}")
            else:
                self._remove(qid)
        finally:
            self.active.pop(qid, None)
            self.wakeup.set()

    def _remove(self, qid: str) -> None:
        for queue in ("defer", "active"):
            try:
                os.unlink(self.spool.path(queue, qid))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning(f"{qid}: remove {queue} file: {exc}")
                return
        log.info(f"{qid}: removed")

    # ---------------------------------------------------------------- loop
    def step(self) -> bool:
        """One round: feed at most one message, then dispatch. True if work was done."""
        now = self.clock()
        if now >= self._next_deferred_scan:
            self._next_deferred_scan = now + self.queue_run_delay
            self.deferred.request()
        fed = False if self.stopping else self.feed_one()
        started = self.dispatch()
        return fed or started

    async def run(self, stopping: asyncio.Event, drain_timeout: float = 30.0) -> None:
        """Run until ``stopping`` is set, then wait (bounded) for in-flight deliveries."""
        self.startup()
        stop_task = asyncio.ensure_future(stopping.wait())
        try:
            while not stopping.is_set():
                if self.step():
                    await asyncio.sleep(0)
                    continue
                self.wakeup.clear()
                timeout = max(0.05, self._next_deferred_scan - self.clock())
                wake = asyncio.ensure_future(self.wakeup.wait())
                await asyncio.wait({wake, stop_task}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
        finally:
            stop_task.cancel()
        self.stopping = True
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=drain_timeout)
