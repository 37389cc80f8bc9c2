"""dispatch — the qmgr's deliveries: entries handed to the agents, their replies handled.

Summary
    One Dispatcher belongs to the Scheduler (qmgrd.qmgr.scheduler) and does step 3 of
    its loop round and everything up to the agent's reply, as Postfix's qmgr_loop
    (transport selection) and qmgr_deliver.c (qmgr_deliver, qmgr_deliver_update) do:

    Dispatch (``dispatch``): round robin over the transports that are alive, not rate
    locked and below their process limit (Transport.can_start); each hands out its next
    entry (preemptive job scheduling, round robin over a job's destinations,
    concurrency windows: qmgrd.qmgr.joblist); a ``<transport>_transport_rate_delay``
    locks the transport after each hand-out (a timer wakes the loop when it ends). The
    round robin starts one transport further each round.

    A delivery (qmgr_deliver): one task per entry sends a request to
    ``private/<transport>`` (qmgrd.qmgr.client) with the message's envelope and the
    entry's recipients. Connection cache flags as Postfix's qmgr_entry_select: the agent
    may always reuse a cached connection, and keeps its own while more mail for the
    destination waits or is in delivery.

    Agent replies (qmgr_deliver_update): a reply clears a dead transport; a reply with a
    hop status (the site had trouble) is negative concurrency feedback — a destination
    that fails ``<transport>_destination_concurrency_failed_cohort_limit`` pseudo-cohorts
    is dead: its todo entries and later mail for it are deferred with the saved reason,
    without attempts; a reply without one is positive feedback (and revives a dead
    destination). After a delivery a ``<transport>_destination_rate_delay`` suspends the
    queue. An agent that cannot be reached makes its transport dead (every todo entry of
    the transport is deferred, ``4.3.0 mail transport unavailable``). An agent that died
    or replied garbage (``agent_failed``): the recipients it did not finish (still an
    ``R`` record in the file) are deferred with its reason, as Postfix does.

    Going away (qmgrd.qmgr.scheduler, "Going away"): a delivery that finds no agent or
    no proper reply while the owner is going away is not the transport's fault: its
    entry is *left* (Owner.leave) - no defer log, no ``status=deferred`` line, no dead
    transport - for the next qmgr.

    The dead transports and destinations, the entry bookkeeping and the tasks belong to
    the owner (the Owner protocol below); the dispatcher keeps only its round robin
    position.

Logs
    ``warning: connect to transport private/<name>: <error>`` (agent unreachable; the
    owner then logs the transport's suspension), ``error: <id>: delivery via <name>
    failed: <exception>`` (a bug: the delivery counts as an agent failure),
    ``status=deferred`` lines (qmgrd.qmgr.message.Message.defer_recipients) for
    recipients deferred here; with ``destination_concurrency_feedback_debug``
    ``<positive|negative> feedback <value> for <transport>:<queue>: window <n> success
    <s> failure <f> fail_cohorts <c>`` after each feedback. Raises nothing.

Public API
    Dispatcher(spool, client, clock, timers, wakeup, transports, refill, owner,
               feedback_debug=False)
        transports: the owner's dict name -> Transport (shared, not copied); refill:
        ActiveQueue.refill; wakeup: the owner loop's asyncio.Event
    .dispatch() -> bool        start every delivery the limits allow; True if any
    Owner protocol: stopping, going_away(), leave(entry), throttle_transport(t, status,
        reason), unthrottle_transport(t), queue_dead(q, status, reason),
        unthrottle_queue(q), entry_done(entry, busy), spawn(coro)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from master import log
from qmgrd.delivery import (
    DEL_REQ_FLAG_CONN_LOAD,
    DEL_REQ_FLAG_CONN_STORE,
    DEL_REQ_FLAG_DEFLT,
    DeliverRequest,
    DeliverStatus,
    RecipientInfo,
)
from qmgrd.qmgr.client import AgentClient, TransportUnavailable
from qmgrd.qmgr.destqueue import DestQueue
from qmgrd.qmgr.entry import Entry
from qmgrd.qmgr.feedback import feedback_value, negative, positive
from qmgrd.qmgr.message import Message
from qmgrd.qmgr.timers import Timers
from qmgrd.qmgr.transport import Transport
from qmgrd.spool.queue import Spool

__all__ = ["Dispatcher", "Owner"]


class Owner(Protocol):
    """What the dispatcher needs from the scheduler that owns it."""

    stopping: bool

    def going_away(self) -> bool: ...

    def leave(self, entry: Entry) -> None: ...

    def throttle_transport(self, t: Transport, status: str, reason: str) -> None: ...

    def unthrottle_transport(self, t: Transport) -> None: ...

    def queue_dead(self, q: DestQueue, status: str, reason: str) -> None: ...

    def unthrottle_queue(self, q: DestQueue) -> None: ...

    def entry_done(self, entry: Entry, busy: bool) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class Dispatcher:
    """Deliveries started and their replies handled (see module docstring)."""

    def __init__(
        self,
        spool: Spool,
        client: AgentClient,
        clock: Callable[[], float],
        timers: Timers,
        wakeup: asyncio.Event,
        transports: dict[str, Transport],
        refill: Callable[[Message], None],
        owner: Owner,
        feedback_debug: bool = False,
    ) -> None:
        self.spool = spool
        self.client = client
        self.clock = clock
        self.timers = timers
        self.wakeup = wakeup
        self.transports = transports
        self.refill = refill
        self.owner = owner
        self.feedback_debug = feedback_debug
        self._rr = 0

    def dispatch(self) -> bool:
        """Start every delivery the limits allow, round robin over transports."""
        if self.owner.stopping or not self.transports:
            return False
        now = self.clock()
        ring = list(self.transports.values())
        start = self._rr % len(ring)
        ring = ring[start:] + ring[:start]
        self._rr = start + 1
        started = False
        progress = True
        while progress:
            progress = False
            for t in ring:
                if not t.can_start(now):
                    continue
                entry = t.jobs.select_entry(now, self.refill)
                if entry is None:
                    continue
                progress = started = True
                t.inflight += 1
                delay = t.params.transport_rate_delay
                if delay > 0:
                    t.rate_locked_until = now + delay
                    self.timers.request(("rate", t), t.rate_locked_until, self.wakeup.set)
                self.owner.spawn(self._deliver(entry))
        return started

    def _request(self, entry: Entry) -> DeliverRequest:
        m = entry.message
        q = entry.queue
        # Connection cache (Postfix qmgr_entry_select): an agent may always reuse a cached
        # connection, and keeps its own while more mail for the destination waits or is
        # in delivery (``entry`` is on q.busy already).
        flags = DEL_REQ_FLAG_DEFLT | DEL_REQ_FLAG_CONN_LOAD
        if len(q.todo) or len(q.busy) > 1:
            flags |= DEL_REQ_FLAG_CONN_STORE
        return DeliverRequest(
            flags=flags,
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
            client_port=m.client_port,
            protocol_name=m.protocol_name,
            helo_name=m.helo_name,
            rewrite_context=m.rewrite_context,
        )

    async def _deliver(self, entry: Entry) -> None:
        t = entry.queue.transport
        owner = self.owner
        entry.message.drop_stale_defer_log(self.spool)  # before the agent can append
        try:
            status = await self.client.deliver(t.name, self._request(entry))
        except TransportUnavailable as exc:
            if owner.going_away():
                owner.leave(entry)
                return
            log.warning(f"connect to transport private/{t.name}: {exc}")
            reason = "mail transport unavailable"
            owner.throttle_transport(t, "4.3.0", reason)
            entry.message.defer_recipients(self.spool, entry.recipients, "4.3.0", reason,
                                           self.clock())
            owner.entry_done(entry, busy=True)
            return
        except Exception as exc:  # noqa: BLE001 - keep the queue moving, report the bug
            log.error(f"{entry.message.qid}: delivery via {t.name} failed: {exc!r}")
            status = DeliverStatus(status=1, dsn_status="4.3.0", action="delayed",
                                   reason="unknown mail transport error", agent_failed=True)
        if status.agent_failed:
            if owner.going_away():
                owner.leave(entry)
                return
            self._defer_unfinished(entry, status)
        self._delivery_update(entry, status)

    def _defer_unfinished(self, entry: Entry, status: DeliverStatus) -> None:
        """The agent died or replied garbage: log ``status=deferred`` (and a defer-log
        entry) for each recipient it did not finish, as Postfix does, so that the log
        and ``qmgr-ctl list`` tell why. Finished ones already have their ``D`` record."""
        msg = entry.message
        unfinished = list(entry.recipients)
        try:
            fd = os.open(self.spool.path("active", msg.qid),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            pass
        else:
            try:
                unfinished = [r for r in entry.recipients if os.pread(fd, 1, r.offset) == b"R"]
            except OSError:
                pass
            finally:
                os.close(fd)
        if unfinished:
            msg.defer_recipients(self.spool, unfinished, status.dsn_status or "4.3.0",
                                 status.reason, self.clock())

    def _delivery_update(self, entry: Entry, status: DeliverStatus) -> None:
        """An agent's reply: feedback, dead destinations, then the entry is done."""
        q = entry.queue
        t = q.transport
        p = t.params
        owner = self.owner
        if t.dead:
            owner.unthrottle_transport(t)
        if status.status != 0:
            entry.message.deferred = True
        if status.hop_failed:
            if q.ready:
                f = feedback_value(p.negative, q.window.window)
                dead = negative(q.window, f, p.cohort_limit)
                q.refresh()
                self._debug_feedback(q, "negative", f)
                if dead:
                    owner.queue_dead(q, status.dsn_status, status.reason)
        elif q.dead:
            owner.unthrottle_queue(q)
        elif q.ready:
            g = feedback_value(p.positive, q.window.window)
            positive(q.window, g, len(q.busy), p.initial_concurrency, p.concurrency_limit)
            q.refresh()
            self._debug_feedback(q, "positive", g)
        owner.entry_done(entry, busy=True)

    def _debug_feedback(self, q: DestQueue, kind: str, value: float) -> None:
        if self.feedback_debug:
            w = q.window
            log.info(f"{kind} feedback {value:g} for {q.transport.name}:{q.name}: "
                     f"window {w.window} success {w.success:g} failure {w.failure:g} "
                     f"fail_cohorts {w.fail_cohorts:g}")
