"""scheduler — the qmgr: moves mail through the active queue to the delivery agents.

Summary
    One Scheduler object owns all qmgr state (postfix.md §4): the two directory scans
    (qmgrd.qmgr.scan), the active queue (qmgrd.qmgr.active), the transports with their
    destination queues and job lists (qmgrd.qmgr.transport, .destqueue, .joblist),
    timers on an injected clock (qmgrd.qmgr.timers), the deliveries
    (qmgrd.qmgr.dispatch) and message completion (qmgrd.qmgr.completion). Each loop
    round (``step``):

    1. due timers run: dead destinations come back after ``minimal_backoff_time``, dead
       transports after ``transport_retry_time``, rate-delayed queues resume; a deferred
       scan starts every ``queue_run_delay``;
    2. feed: when the active queue is below ``qmgr_message_active_limit`` messages and
       ``qmgr_message_recipient_limit`` recipients, take ONE file from the scans,
       incoming and deferred in turn (after a feed the other queue goes first; when the
       active queue is full, incoming is preferred). A message taken from incoming earns
       producers an ``in_flow_delay`` token (qmgrd.flow), withheld while the qmgr has a
       backlog (``flow_behind``: a deferred scan running, or the active queue over
       2 x ``default_process_limit`` messages) and paid once caught up;
    3. dispatch (qmgrd.qmgr.dispatch.Dispatcher): round robin over the transports that
       are alive, not rate locked and below their process limit; each hands out its
       next entry; the Dispatcher sends it to the agent and handles the reply
       (concurrency feedback, dead destinations and transports: "Agent replies" there).

    Dead transports and destinations (qmgr_transport_throttle, qmgr_queue_throttle: their
    todo entries and later mail deferred without attempts), queue suspensions
    (qmgr_queue_suspend) and entries done (qmgr_entry_done) are the Scheduler's.

    Going away (the master died, reloaded or stops: EOF on the status descriptor; SIGTERM;
    a changed table): the loop stops at once - no more feeding or dispatching - and waits
    (bounded) for the deliveries in flight; their replies are handled as usual. The
    agents go away with the master, so a delivery that then finds no agent
    (TransportUnavailable: connection refused, or reset unread in the agent's listen
    queue) or no proper reply (``agent_failed``) is not the transport's fault: its
    message is *left* - no defer log, no ``status=deferred`` line, no dead transport, no
    completion (but an operator's pending hold/delete/requeue of it is carried out,
    with local file operations only) - and stays in ``active/`` with the recipients the agents did finish
    marked done, so that the next qmgr moves it back to ``incoming/`` and retries it at
    once (Postfix's qmgr exits as soon as its master goes away, leaving its mail in
    ``active/`` the same way). The agent may notice the master's death before the qmgr
    does (the qmgr's reader of the status descriptor has not run yet): a failed delivery
    therefore asks ``master_gone`` (the status descriptor is readable), which the
    master's death, stop or reload makes true before any agent can leave because of it,
    and the qmgr stops then. Logs one line when messages are left: ``stopping: <n>
    message(s) left in the active queue for the next queue manager``.

    Triggers (one byte each, a read of up to 1024 bytes collapsed into one set): ``I``/
    ``W`` incoming scan, ``D`` deferred scan, ``A`` ignore time stamps (current and next
    scans), ``F`` forget dead transports and destinations now and ignore
    ``defer_transports`` for the current and next scans. A scan request while the scan
    runs is a flag (the scan restarts once when it ends). Unknown bytes are ignored;
    the first ones are logged once (count and hex of the first 16).

    Forced deferred scans are rate limited.  ``public/qmgr`` is writable by every local
    user, and each ``A`` makes the deferred scan ignore the files' retry times: without
    a limit, a stream of junk bytes containing ``A`` and ``D`` re-read every deferred
    message as soon as the previous scan ended - one deferred message was retried 93
    times in a second - so any user could make the qmgr hammer a destination.  So an
    ``A`` for the deferred scan takes effect at most once per ``FORCED_SCAN_INTERVAL``
    (1 s); a later one within that second is remembered (coalesced with any others) and
    applied - with the scan start it asked for - when the second is up, never lost.  The
    rest of the request (``D`` start, ``F``) takes effect at once, without ignoring
    times.  A forced request therefore makes at most two passes ignore times (the scan
    in progress and its restart, Postfix's semantics) per interval.  The first request
    after a quiet second - an operator's ``qmgr-ctl flush`` - is immediate.  Incoming
    scans are not limited (a file leaves ``incoming`` when it is taken).

Logs (Postfix's lines): ``<id>: from=<s>, size=N, nrcpt=N (queue active)``,
``<id>: removed``, ``<id>: from=<s>, status=expired, returned to sender``,
``<id>: skipped, still being delivered``, ``status=deferred`` lines for mail the qmgr
defers itself, clog warnings, warnings for corrupt files, ``transport <name>: suspended
for <n>s: <reason>``, ``qmgr task failed: <exc>``; the deliveries' lines (unreachable
transports, feedback debug) are qmgrd.qmgr.dispatch's. A bad transport parameter is fatal.

Public API
    Scheduler(cfg, spool, client, clock=time.time, process_limits={}, resolver=None,
              master_gone=None)
        master_gone: () -> bool, True once the master is gone, stopping or reloading
        (the skeleton's ServerContext.status_closed; None: never)
    .startup()                 move active/ back to incoming/, start both scans (once;
                               an unreadable queue directory is fatal)
    .trigger(data: bytes)      handle one read of trigger bytes
    .flush_dead()              forget dead transports and destinations (trigger F)
    .step(feeds=1) -> bool     one round (timers, feed up to ``feeds``, dispatch); True when
                               it did work (run() takes FEED_BATCH messages per round)
    .transport(name) -> Transport   (created on first use; fatal on a bad parameter)
    .snapshot() -> dict        the state for ``private/qmgr-status`` (qmgrd.qmgr.status)
    .entry_purged(entry)       a todo entry leaves without delivery (qmgrd.qmgr.control)
    async run(stopping, drain_timeout)   the loop; waits (bounded) for in-flight work
    .going_away() -> bool      the qmgr stops (stop event, or master_gone); sets stopping
    .left: int                 messages left in active/ for the next qmgr
    attributes: active (ActiveQueue), transports, incoming, deferred, timers, tasks,
        suspended (qmgrd.qmgr.suspend.Suspensions: operator suspensions),
        dispatcher (qmgrd.qmgr.dispatch.Dispatcher: .dispatch() is step 3)
    for the Dispatcher (qmgrd.qmgr.dispatch.Owner): leave, spawn, throttle_transport,
        unthrottle_transport, queue_dead, unthrottle_queue, entry_done
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from master import log
from master.config import Config, ConfigError
from qmgrd.flow import flow_put, flow_topup
from qmgrd.qmgr.active import ActiveQueue, suspended_reason
from qmgrd.qmgr.client import AgentClient
from qmgrd.qmgr.completion import Completion
from qmgrd.qmgr.destqueue import DestQueue
from qmgrd.qmgr.dispatch import Dispatcher
from qmgrd.qmgr.entry import Entry
from qmgrd.qmgr.message import Message
from qmgrd.qmgr.resolve import Resolver
from qmgrd.qmgr.scan import BogusEntries, Scan, scan_failed
from qmgrd.qmgr.status import snapshot
from qmgrd.qmgr.suspend import Suspensions
from qmgrd.qmgr.timers import Timers
from qmgrd.qmgr.transport import Transport, TransportParams
from qmgrd.spool.queue import Spool

__all__ = ["Scheduler"]

_TRIGGER_CODES = frozenset(b"IWDAF\0")
SKIP_BATCH = 100  # names a scan may pass over in one step (feed_one) without taking one
# Messages the running loop takes into the active queue per round (run(): step(FEED_BATCH)).
# Postfix's qmgr_loop() imports one message per event loop round, its rounds being cheap
# C; here a round is a pass of the Python loop, and one message per round made the qmgr
# and the smtp agent run in lock step: a wakeup of each per message (voluntary context
# switches per message in bench scenario C: qmgr 1.0, smtp 0.74-0.9; with 8 per round,
# smtp 0.03-0.14), and C's CPU per message went from 0.70-0.81 to 0.52-0.60 ms (H's did
# not change). The incoming/deferred alternation and the active queue limit hold within
# the batch (feed_one); the round's I/O waits for at most 8 messages' reading.
FEED_BATCH = 8
FORCED_SCAN_INTERVAL = 1.0  # s: at most one forced (ignore-time) deferred request per interval


def _soft(status: str) -> str:
    """A DSN status made temporary (dead destinations defer, they never bounce)."""
    return "4" + status[1:] if status[:1] in ("2", "4", "5") and len(status) > 1 else "4.0.0"


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
        master_gone: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.client = client
        self.clock = clock
        self.process_limits = process_limits or {}
        self.resolver = resolver if resolver is not None else Resolver(cfg)
        self.min_backoff = cfg.get_time("minimal_backoff_time")
        self.transport_retry_time = cfg.get_time("transport_retry_time")
        self.queue_run_delay = cfg.get_time("queue_run_delay")
        self.feedback_debug = cfg.get_bool("destination_concurrency_feedback_debug")
        self.flow_limit = cfg.get_int("default_process_limit")  # qmgrd.flow tokens
        # in_flow_delay: above this many messages in the active queue the qmgr is
        # "behind" (arrival rate > delivery rate) and withholds tokens (flow_behind)
        self.flow_backlog = 2 * self.flow_limit
        self._flow_owed = 0  # tokens withheld while behind, paid when caught up
        cfg.get_int("qmgr_fudge_factor")  # oqmgr only; checked like Postfix's qmgr does
        # names only: the feed stats each file itself (mode, mtime), as Postfix's does,
        # at the path where the scan found it (a file in another hashing's directory)
        # entries that are no queue file are skipped with one warning each (BogusEntries)
        bogus_in = BogusEntries(spool.queue_directory)
        bogus_def = BogusEntries(spool.queue_directory)
        self.incoming = Scan("incoming", lambda: bogus_in.walk(
            lambda bogus: spool.scan_paths("incoming", bogus)))
        self.deferred = Scan("deferred", lambda: bogus_def.walk(
            lambda bogus: spool.scan_paths("deferred", bogus)))
        self._incoming_first = True
        self.transports: dict[str, Transport] = {}
        self.timers = Timers()
        self.active = ActiveQueue(cfg, spool, self.resolver, clock, self)
        self.suspended = Suspensions()  # qmgr-ctl suspend (qmgrd.qmgr.control)
        self.active.suspended = self.suspended
        self.completion = Completion(
            spool, client, clock,
            min_backoff=self.min_backoff,
            max_backoff=cfg.get_time("maximal_backoff_time"),
            max_lifetime=cfg.get_time("maximal_queue_lifetime"),
            bounce_lifetime=cfg.get_time("bounce_queue_lifetime"),
            refill=self.active.refill, release=self._release,
            to_corrupt=self.active.to_corrupt,
        )
        self.dead_queues: set[DestQueue] = set()
        self.dead_transports: set[Transport] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.wakeup = asyncio.Event()
        self.dispatcher = Dispatcher(spool, client, clock, self.timers, self.wakeup,
                                     self.transports, self.active.refill, self,
                                     feedback_debug=self.feedback_debug)
        self._warned_unknown = False
        self._forced_next = float("-inf")  # when the next forced deferred scan may start
        self._forced_pending: tuple[bool, bool] | None = None  # (start, flush) waiting
        self._next_deferred_scan = 0.0
        self.start_time = clock()  # epoch seconds (qmgr-ctl status: "started")
        self.stopping = False
        self.master_gone = master_gone
        self._stop_event: asyncio.Event | None = None
        self.left = 0  # messages left in active/ for the next qmgr (going_away)
        self.started = False  # startup() done

    # ---------------------------------------------------------------- triggers
    def trigger(self, data: bytes) -> None:
        """Handle one read of trigger bytes (untrusted: unknown bytes are ignored)."""
        codes = set(data)
        if not self._warned_unknown and not codes <= _TRIGGER_CODES:
            self._warned_unknown = True
            bad = bytes(b for b in data if b not in _TRIGGER_CODES)
            more = "..." if len(bad) > 16 else ""
            log.warning(f"ignoring {len(bad)} unknown trigger request byte(s) "
                        f"(hex {bad[:16].hex(' ')}{more}; "
                        "further unknown requests are ignored silently)")
        start_in = ord("I") in codes or ord("W") in codes
        start_def = ord("D") in codes
        scan_all = ord("A") in codes
        flush = ord("F") in codes
        if flush:
            self.flush_dead()
        if start_in or scan_all or flush:
            self.incoming.request(start_in, scan_all, flush)
        if start_def or scan_all or flush:
            self._request_deferred(start_def, scan_all, flush)
        self.wakeup.set()

    def _request_deferred(self, start: bool, scan_all: bool, flush: bool) -> None:
        """A deferred scan request from a trigger; an ignore-time (``scan_all``) one is
        rate limited to one per FORCED_SCAN_INTERVAL (module docstring)."""
        if self.completion.unmoved:
            self.completion.retry_unmoved()
        if scan_all:
            now = self.clock()
            if now >= self._forced_next:
                self._forced_next = now + FORCED_SCAN_INTERVAL
            else:
                old_start, old_flush = self._forced_pending or (False, False)
                self._forced_pending = (old_start or start, old_flush or flush)
                self.timers.request(("forced-scan",), self._forced_next, self._forced_due)
                scan_all = False
        if start or scan_all or flush:
            self.deferred.request(start, scan_all, flush)

    def _forced_due(self) -> None:
        """The rate limit's interval is up: apply the remembered forced request."""
        pending, self._forced_pending = self._forced_pending, None
        if pending is not None:
            start, flush = pending
            self._forced_next = self.clock() + FORCED_SCAN_INTERVAL
            self.deferred.request(start, True, flush)
            self.wakeup.set()

    def flush_dead(self) -> None:
        """Forget every dead transport and destination (trigger F); O(dead ones)."""
        for t in list(self.dead_transports):
            self.unthrottle_transport(t)
        for q in list(self.dead_queues):
            self.unthrottle_queue(q)

    # ---------------------------------------------------------------- start-up
    def startup(self) -> None:
        """Move leftovers from active/ to incoming/ (mtime now) and start both scans.
        A queue directory that cannot be read is fatal here, before the first trigger
        is read (as Postfix's qmgr_post_init), so the master throttles such a qmgr
        (qmgrd.qmgr.scan.scan_failed). Done once; run() calls it if nobody did."""
        if self.started:
            return
        self.started = True
        self.active.recover()
        for queue in ("incoming", "deferred"):
            try:
                with os.scandir(self.spool.queue_path(queue)):
                    pass
            except FileNotFoundError:
                pass  # as Spool's scans: a missing queue is an empty one
            except OSError as exc:
                scan_failed(exc, self.spool.queue_directory)
        self.incoming.request()
        self.deferred.request()
        self._next_deferred_scan = self.clock() + self.queue_run_delay

    # ---------------------------------------------------------------- transports
    def transport(self, name: str) -> Transport:
        """Find or create the in-memory transport ``name`` with its parameters."""
        t = self.transports.get(name)
        if t is None:
            try:
                params = TransportParams.from_config(self.cfg, name,
                                                     self.process_limits.get(name, 0))
            except ConfigError as exc:
                log.fatal(str(exc))
            t = Transport(name, params)
            self.transports[name] = t
        return t

    def throttle_transport(self, t: Transport, status: str, reason: str) -> None:
        """The agent cannot be reached: dead for transport_retry_time, todo deferred."""
        if not t.dead:
            log.warning(f"transport {t.name}: suspended for {self.transport_retry_time}s: "
                        f"{reason}")
            t.dead = True
            t.dead_until = self.clock() + self.transport_retry_time
            t.dead_status, t.dead_reason = status, reason
            self.dead_transports.add(t)
            self.timers.request(("transport", t), t.dead_until,
                                lambda: self.unthrottle_transport(t))
        for q in list(t.queues.values()):
            self._defer_todo(q, status, reason)

    def unthrottle_transport(self, t: Transport) -> None:
        """Forget that ``t`` is dead (timer, flush, or a reply from its agent)."""
        self.timers.cancel(("transport", t))
        self.dead_transports.discard(t)
        t.dead = False
        t.dead_until = 0.0
        t.dead_status = t.dead_reason = ""
        self.wakeup.set()

    # ---------------------------------------------------------------- destinations
    def queue_dead(self, q: DestQueue, status: str, reason: str) -> None:
        """A failed cohort: remember the reason, defer the todo entries, revive later."""
        q.refresh()
        q.dead_until = self.clock() + self.min_backoff
        q.dead_status, q.dead_reason = _soft(status or "4.4.1"), reason
        self.dead_queues.add(q)
        self.timers.request(("queue", q), q.dead_until, lambda: self.unthrottle_queue(q))
        self._defer_todo(q, q.dead_status, suspended_reason(reason))

    def unthrottle_queue(self, q: DestQueue) -> None:
        """Forget that ``q`` is dead: window = busy deliveries, else the initial one."""
        self.timers.cancel(("queue", q))
        self.dead_queues.discard(q)
        w = q.window
        if w.window == 0:
            w.window = len(q.busy) or q.transport.params.initial_concurrency
            w.success = w.failure = w.fail_cohorts = 0.0
        q.refresh()
        q.dead_until = 0.0
        q.dead_status = q.dead_reason = ""
        q.transport.jobs.queue_unblocked(q)
        if q.empty and q.ready:
            self._queue_done(q)
        self.wakeup.set()

    def _suspend_queue(self, q: DestQueue, delay: int) -> None:
        q.window.window = -1
        q.refresh()
        q.suspended_until = self.clock() + delay
        self.timers.request(("resume", q), q.suspended_until, lambda: self._resume_queue(q))

    def _resume_queue(self, q: DestQueue) -> None:
        if q.suspended:
            q.window.window = 1
            q.refresh()
            q.suspended_until = 0.0
            q.transport.jobs.queue_unblocked(q)
            if q.empty:
                self._queue_done(q)
        self.wakeup.set()

    def _queue_done(self, q: DestQueue) -> None:
        """Forget an empty, ready queue (dead ones stay: the dead-destination cache)."""
        t = q.transport
        if t.queues.get(q.name) is q:
            del t.queues[q.name]

    def _queue_count(self) -> int:
        return sum(len(t.queues) for t in self.transports.values())

    def _defer_todo(self, q: DestQueue, status: str, reason: str) -> None:
        """Defer every entry waiting in ``q`` (no delivery attempt)."""
        now = self.clock()
        link = q.todo.head
        while link is not None:
            entry = link.owner
            link = link.next
            entry.message.defer_recipients(self.spool, entry.recipients, status, reason, now)
            self.entry_done(entry, busy=False)

    # ---------------------------------------------------------------- feeding
    def feed_one(self) -> bool:
        """Take at most one file into the active queue. True if a name was taken."""
        took = False
        if not self.active.full():
            order = ((self.incoming, self.deferred) if self._incoming_first
                     else (self.deferred, self.incoming))
            last = order[-1]
            taken = False
            for scan in order:
                last = scan
                # names the feed passes over (not yet due, not ready, already active)
                # cost no delivery work: up to SKIP_BATCH of them in one step, instead
                # of one event loop round each (a deferred scan over 100,000 files
                # that are not due is a walk of the directory, as in Postfix)
                for _ in range(SKIP_BATCH):
                    try:
                        qid = scan.next()
                    except OSError as exc:
                        scan_failed(exc, self.spool.queue_directory)
                    if qid is None:
                        break
                    took = True
                    if self.active.feed(qid, scan.name, scan.scan_all, scan.flush,
                                        scan.path):
                        if scan is self.incoming:
                            self._flow_token()  # one per message taken in from incoming
                        taken = True
                        break
                if taken:
                    break
            if not self.active.full():
                self._incoming_first = last is self.deferred
                return took
        self._incoming_first = True
        return took

    # ---------------------------------------------------------------- flow control
    def flow_behind(self) -> bool:
        """True while the qmgr has a backlog of its own: a deferred scan is in progress
        (mail already queued is being retried) or the active queue holds more than
        ``flow_backlog`` (twice ``default_process_limit``) messages (mail arrives faster
        than it is delivered). Tokens are then withheld, so that producers wait up to
        ``in_flow_delay`` per message (qmgr(8) BUGS; goes beyond Postfix, whose qmgr
        puts one token per message taken in whatever its backlog)."""
        return self.deferred.busy or len(self.active) > self.flow_backlog

    def _flow_token(self) -> None:
        """One message was taken from incoming: its in_flow_delay token (qmgrd.flow),
        withheld while behind and paid, with those owed, once caught up."""
        if self.flow_behind():
            self._flow_owed = min(self._flow_owed + 1, self.flow_limit)
            return
        flow_put(1 + self._flow_owed)
        self._flow_owed = 0

    # ---------------------------------------------------------------- deliveries
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(f"qmgr task failed: {task.exception()!r}")
        self.wakeup.set()

    def going_away(self) -> bool:
        """True once the qmgr stops (module docstring, "Going away"): the loop has
        ended, its stop event is set, or ``master_gone`` says so - then ``stopping``
        is set, and the loop ends at its next round."""
        if not self.stopping:
            event = self._stop_event
            if (event is not None and event.is_set()) or (
                    self.master_gone is not None and self.master_gone()):
                self.stopping = True
                self.wakeup.set()
        return self.stopping

    def leave(self, entry: Entry) -> None:
        """The qmgr is going away and ``entry`` was not delivered: its message stays in
        active/ untouched for the next qmgr (no defer log, no completion)."""
        msg = entry.message
        if not msg.left:
            msg.left = True
            self.left += 1
        self.entry_done(entry, busy=True)

    def entry_done(self, entry: Entry, busy: bool) -> None:
        """An entry's delivery ended (busy) or it left the todo list (qmgr_entry_done)."""
        q = entry.queue
        t = q.transport
        msg = entry.message
        if busy:
            t.inflight -= 1
            if t.params.dest_rate_delay > 0 and q.ready:
                self._suspend_queue(q, t.params.dest_rate_delay)
        t.jobs.entry_done(entry, busy)
        self.active.rcpt_count -= len(entry.recipients)
        if q.empty:
            if q.dead and self._queue_count() > 2 * self.active.recipient_limit:
                self.unthrottle_queue(q)
            elif q.ready:
                self._queue_done(q)
        msg.refcount -= 1
        if msg.refcount == 0:
            self.start_completion(msg)
        self.wakeup.set()

    # ---------------------------------------------------------------- completion
    def entry_purged(self, entry: Entry) -> None:
        """Take a waiting entry out without a delivery (qmgrd.qmgr.control: an operator's
        hold/delete/requeue, or a suspension whose recipients were deferred)."""
        self.entry_done(entry, busy=False)

    def start_completion(self, msg: Message) -> None:
        """Finish ``msg`` asynchronously (its last entry is done); a message left for the
        next qmgr (going away) is not finished: it stays in active/ - unless an
        operator's hold/delete/requeue of it is pending, which is carried out now
        (``_admin_now``)."""
        if msg.completing:
            return
        if msg.left:
            self._admin_now(msg)  # a pending operator change only; else nothing
            return
        msg.completing = True
        self.spawn(self.completion.run(msg))

    def _admin_now(self, msg: Message) -> None:
        """Carry out the operator's pending change of ``msg`` (``msg.admin``: qmgr-ctl
        hold, delete, requeue, which the operator was told would follow the delivery in
        progress) although the qmgr is going away: with nothing but local file
        operations (qmgrd.qmgr.admin.AdminAction.finish: unlink, or rename to hold/ or
        incoming/). No completion step that needs another service runs: recipients
        bounced in the last attempt keep their ``bounce/<id>`` log, which the qmgr that
        later finishes the message (after a release, or the requeue) turns into the
        notice. The recipients of the deliveries cut off count as undelivered, so a hold
        or requeue is never taken for moot. Logs qmgrd.qmgr.admin's lines (``<id>:
        removed``, ``placed on hold``, ``requeued``) or its warnings; never raises.

        Called for a message left with no entry in flight; and by ``run`` for a message
        whose deliveries outlast the drain timeout (Postfix's postsuper changes an active
        file under its qmgr and agents in the same way: a rename keeps the agent's open
        file, whose recipients it still marks done)."""
        admin = msg.admin
        if admin is None or admin.outcome:
            return
        if msg.left:
            self.left -= 1  # not left in active/ for the next qmgr any more
        msg.left = True  # no completion for it after this (a late reply changes nothing)
        msg.deferred = True
        admin.finish(msg)
        if msg.refcount == 0 and not msg.completing:
            self._release(msg)

    def _release(self, msg: Message) -> None:
        self.active.release(msg)
        self.wakeup.set()

    # ---------------------------------------------------------------- loop
    def snapshot(self) -> dict[str, Any]:
        """The scheduler's state as plain data (see qmgrd.qmgr.status)."""
        return snapshot(self)

    def next_deferred_scan(self) -> float:
        """When the next periodic deferred scan starts (epoch s)."""
        return self._next_deferred_scan

    def step(self, feeds: int = 1) -> bool:
        """One round: timers, feed at most ``feeds`` messages (feed_one; the running
        loop takes FEED_BATCH), dispatch. True if work was done."""
        now = self.clock()
        ran = self.timers.run_due(now)
        if now >= self._next_deferred_scan:
            self._next_deferred_scan = now + self.queue_run_delay
            if self.completion.unmoved:
                self.completion.retry_unmoved()
            self.deferred.request()
        fed = False
        if not self.stopping:
            for _ in range(feeds):
                if not self.feed_one():
                    break
                fed = True
        started = self.dispatcher.dispatch()
        return fed or started or ran > 0

    async def run(self, stopping: asyncio.Event, drain_timeout: float = 30.0) -> None:
        """Run until ``stopping`` is set (or a failed delivery finds the master gone:
        going_away), then wait up to ``drain_timeout`` s for the deliveries in flight;
        an operator's hold/delete/requeue still waiting for a delivery then is carried
        out at once (``_admin_now``; warning ``<id>: <action> of a message still in
        delivery done now: the queue manager stops``), so that it is never lost with
        the process; logs how many messages were left in active/ for the next qmgr, if
        any."""
        self.startup()
        self._stop_event = stopping
        stop_task = asyncio.ensure_future(stopping.wait())
        try:
            while not stopping.is_set() and not self.stopping:
                if self.step(FEED_BATCH):
                    await asyncio.sleep(0)
                    continue
                if not self.incoming.busy and not self.flow_behind():
                    flow_topup(self.flow_limit)  # idle: tokens to default_process_limit
                    self._flow_owed = 0
                self.wakeup.clear()
                due = self._next_deferred_scan
                timer = self.timers.next_due()
                if timer is not None:
                    due = min(due, timer)
                timeout = min(max(0.01, due - self.clock()), 60.0)
                wake = asyncio.ensure_future(self.wakeup.wait())
                await asyncio.wait({wake, stop_task}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
        finally:
            stop_task.cancel()
            self.incoming.close()
            self.deferred.close()
        self.stopping = True
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=drain_timeout)
        for msg in list(self.active.messages.values()):
            admin = msg.admin
            if admin is not None and not admin.outcome:  # still in delivery: not lost
                log.warning(f"{msg.qid}: {admin.action} of a message still in delivery "
                            "done now: the queue manager stops")
                self._admin_now(msg)
        if self.left:
            log.info(f"stopping: {self.left} message(s) left in the active queue "
                     "for the next queue manager")
