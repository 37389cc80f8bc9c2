"""transport — per-transport and per-destination scheduling state (qmgr_transport, qmgr_queue).

Summary
    A **Transport** is one master.cf delivery service (``smtp``, ``local``...). It owns
    its **DestQueue**s, one per destination (nexthop, or ``user@nexthop`` when the
    transport's recipient limit is 1), and a round-robin list of queues that could start
    a delivery now. An **Entry** is one delivery request: one message and up to
    ``<transport>_destination_recipient_limit`` of its recipients for one queue.

    Per-transport parameters follow Postfix's ``<transport>_<name>`` overrides with the
    ``default_<name>`` fallback (postfix.md §4.10).

    Dead state (postfix.md §4.7, §4.8): a transport whose agent cannot be reached is dead
    for ``transport_retry_time``; a destination that failed a whole cohort is dead for
    ``minimal_backoff_time``. Mail for a dead transport or destination is deferred at
    once with the saved reason, without a delivery attempt.

Public API
    Entry(message, queue, recipients)
    DestQueue(name, nexthop, transport, window) — todo (deque[Entry]), busy, window
        (feedback.Window), dead_until, dead_reason, .dead(now), .can_start()
    Transport(name, params...) — queues, ready round robin, inflight, max_inflight,
        dead_until/dead_reason; .queue_for(name, nexthop), .make_ready(q), .next_entry(now)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from qmgrd.qmgr.feedback import Window
from qmgrd.qmgr.message import Message

__all__ = ["DestQueue", "Entry", "Transport"]


@dataclass(eq=False)
class Entry:
    """One delivery request in the making: message + recipients for one queue."""

    message: Message
    queue: DestQueue
    recipients: list[Any]  # qmgrd.spool.envelope.Recipient


@dataclass(eq=False)
class DestQueue:
    """Per-destination queue of a transport."""

    name: str
    nexthop: str
    transport: Transport
    window: Window
    todo: deque[Entry] = field(default_factory=deque)
    busy: int = 0
    dead_until: float = 0.0
    dead_reason: str = ""
    dead_status: str = ""
    in_ready: bool = False

    def dead(self, now: float) -> bool:
        """True while the destination is in the dead-destination cache."""
        if self.dead_until and now >= self.dead_until:
            self.revive()
        return self.dead_until > 0

    def revive(self) -> None:
        """Forget the dead state (timer expiry, or trigger F)."""
        self.dead_until = 0.0
        self.dead_reason = self.dead_status = ""
        if self.window.window <= 0:
            self.window.window = self.transport.initial_concurrency
            self.window.success = self.window.failure = self.window.fail_cohorts = 0.0

    def can_start(self, now: float) -> bool:
        """True when the queue has work and room in its window."""
        return bool(self.todo) and self.busy < self.window.window and not self.dead(now)


class Transport:
    """A delivery transport (master.cf service) and its destinations."""

    def __init__(
        self,
        name: str,
        *,
        recipient_limit: int,
        concurrency_limit: int,
        initial_concurrency: int,
        max_inflight: int,
        positive: tuple[float, bool] = (1.0, False),
        negative: tuple[float, bool] = (1.0, False),
        cohort_limit: int = 1,
    ) -> None:
        self.name = name
        self.recipient_limit = recipient_limit
        self.concurrency_limit = concurrency_limit
        self.initial_concurrency = (
            min(initial_concurrency, concurrency_limit) if concurrency_limit else initial_concurrency
        )
        self.max_inflight = max_inflight
        self.positive = positive
        self.negative = negative
        self.cohort_limit = cohort_limit
        self.queues: dict[str, DestQueue] = {}
        self.ready: deque[DestQueue] = deque()
        self.inflight = 0
        self.dead_until = 0.0
        self.dead_reason = ""

    def dead(self, now: float) -> bool:
        """True while the transport is suspended (its agent could not be reached)."""
        if self.dead_until and now >= self.dead_until:
            self.dead_until = 0.0
            self.dead_reason = ""
        return self.dead_until > 0

    def queue_for(self, name: str, nexthop: str) -> DestQueue:
        """Find or create the destination queue ``name`` (lower-cased)."""
        key = name.lower()
        q = self.queues.get(key)
        if q is None:
            q = DestQueue(key, nexthop, self, Window(self.initial_concurrency))
            self.queues[key] = q
        return q

    def make_ready(self, q: DestQueue, now: float) -> None:
        """Put ``q`` on the round-robin list if it can start a delivery."""
        if not q.in_ready and q.can_start(now):
            q.in_ready = True
            self.ready.append(q)

    def next_entry(self, now: float) -> Entry | None:
        """Take the next entry in round-robin order across destinations, or None."""
        if self.inflight >= self.max_inflight or self.dead(now):
            return None
        while self.ready:
            q = self.ready.popleft()
            q.in_ready = False
            if not q.can_start(now):
                continue
            entry = q.todo.popleft()
            q.busy += 1
            self.inflight += 1
            self.make_ready(q, now)
            return entry
        return None

    def drop_idle_queue(self, q: DestQueue) -> None:
        """Forget a queue with no work that is not dead (keeps memory bounded)."""
        if not q.todo and q.busy == 0 and not q.dead_until and not q.in_ready:
            self.queues.pop(q.name, None)
