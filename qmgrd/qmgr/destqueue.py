"""destqueue — one destination of one transport (qmgr_queue).

Summary
    A DestQueue collects the entries for one (transport, destination): the nexthop, or
    ``localpart@nexthop`` when the transport takes one recipient per delivery
    (postfix.md §4.4 step 10). It has a ``todo`` and a ``busy`` chain of entries and a
    concurrency window (qmgrd.qmgr.feedback.Window) whose value is also its state, as
    in Postfix:

    * ``window > 0``: ready, at most ``window`` deliveries at once;
    * ``window == 0``: dead (throttled) — the destination failed a whole cohort; it
      keeps its saved DSN status and reason, mail for it is deferred without a delivery
      attempt (the dead-destination cache), until ``dead_until``
      (``minimal_backoff_time`` later) or a flush (trigger ``F``);
    * ``window == -1``: suspended by ``<transport>_destination_rate_delay`` until
      ``suspended_until``; it resumes with window 1.

    ``blocker_tag`` marks a queue whose full window holds up jobs of the scheduler's job
    list (qmgrd.qmgr.joblist). ``clog_check()`` gives Postfix's warning when one
    destination takes a large share of the active queue (``qmgr_clog_warn_time``).

Public API
    DestQueue(name, nexthop, transport, window)
        .todo, .busy (Chain[Entry]), .window (Window), .ready / .dead / .suspended,
        .dead_until, .dead_status, .dead_reason, .suspended_until, .blocker_tag,
        .empty, .room -> int (window - busy; 0 unless ready)
        .startable / .refresh(): counted in Transport.startable while it has entries
            waiting and room in its window; call refresh() after every change
        .clog_check(now, active_limit, message_count, warn_time, concurrency_limit,
                    shared) -> None     logs the warnings (at most once per warn_time)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from master import log
from qmgrd.qmgr.chain import Chain
from qmgrd.qmgr.feedback import Window

if TYPE_CHECKING:
    from qmgrd.qmgr.entry import Entry
    from qmgrd.qmgr.transport import Transport

__all__ = ["DestQueue"]

SUSPENDED = -1


class DestQueue:
    """Per-destination queue of a transport (see module docstring)."""

    def __init__(self, name: str, nexthop: str, transport: Transport, window: Window) -> None:
        self.name = name
        self.nexthop = nexthop
        self.transport = transport
        self.window = window
        self.todo: Chain[Entry] = Chain()
        self.busy: Chain[Entry] = Chain()
        self.dead_until = 0.0
        self.dead_status = ""
        self.dead_reason = ""
        self.suspended_until = 0.0
        self.blocker_tag = 0
        self.clog_time_to_warn = 0.0
        self.startable = False

    def __repr__(self) -> str:
        return (f"DestQueue({self.transport.name}:{self.name}, window={self.window.window}, "
                f"todo={len(self.todo)}, busy={len(self.busy)})")

    @property
    def ready(self) -> bool:
        """True when deliveries may start (neither dead nor suspended)."""
        return self.window.window > 0

    @property
    def dead(self) -> bool:
        """True while the destination is in the dead-destination cache."""
        return self.window.window == 0

    @property
    def suspended(self) -> bool:
        """True while a destination rate delay holds the queue."""
        return self.window.window == SUSPENDED

    @property
    def empty(self) -> bool:
        """True when no entry is waiting or in delivery."""
        return not self.todo and not self.busy

    def refresh(self) -> None:
        """Re-count this queue in ``transport.startable`` after a change of its todo,
        busy or window (so the transport knows in O(1) whether any queue can start)."""
        ok = bool(self.todo) and self.window.window > len(self.busy)
        if ok != self.startable:
            self.startable = ok
            self.transport.startable += 1 if ok else -1

    @property
    def room(self) -> int:
        """How many more deliveries the window allows now (0 unless ready)."""
        return max(0, self.window.window - len(self.busy)) if self.ready else 0

    def clog_check(self, now: float, active_limit: int, message_count: int, warn_time: int,
                   concurrency_limit: int, shared: bool) -> None:
        """Warn when this destination uses more than a fifth of the active queue.

        Args:
            now: the time (epoch s); warn_time: ``qmgr_clog_warn_time`` (0 = never).
            active_limit: ``qmgr_message_active_limit``; message_count: messages in it.
            concurrency_limit: the transport's destination concurrency limit (0 = none).
            shared: other destinations of this transport have entries too.
        """
        if warn_time <= 0:
            return
        length = len(self.todo) + len(self.busy)
        if length <= active_limit // 5 or now < self.clog_time_to_warn:
            return
        count = max(message_count, 1)
        share = length / count
        tname = self.transport.name
        log.warning(f"mail for {self.name} is using up {length} of {count} active queue entries")
        if share < 0.9:
            log.warning("this may slow down other mail deliveries")
        busy = len(self.busy)
        if concurrency_limit > 0 and concurrency_limit <= busy + 1:
            log.warning(f"you may need to increase the main.cf "
                        f"{tname}_destination_concurrency_limit from {concurrency_limit}")
        elif self.window.window > active_limit * share:
            log.warning(f"you may need to increase the main.cf qmgr_message_active_limit "
                        f"from {active_limit}")
        elif shared:
            log.warning(f"you may need a separate master.cf transport for {self.name}")
        elif concurrency_limit // 2 > busy:
            log.warning(f"you may need to increase the master.cf {tname} process limit")
        log.warning("to turn off these warnings specify: qmgr_clog_warn_time = 0")
        self.clog_time_to_warn = now + warn_time
