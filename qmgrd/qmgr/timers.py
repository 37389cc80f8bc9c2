"""timers — one-shot timers on an injected clock (Postfix's event_request_timer).

Summary
    The qmgr's timed state changes — a dead destination comes back after
    ``minimal_backoff_time``, a dead transport after ``transport_retry_time``, a rate
    delay ends — are timers keyed by what they act on. Requesting a timer for a key that
    already has one replaces it (as Postfix does); cancelling is O(1) (a heap entry is
    dropped lazily). Timers run from ``run_due(now)``, called by the scheduler's loop,
    so tests drive them with a fake clock and no real waiting.

Public API
    Timers()
        .request(key, when, callback) -> None    key: any hashable; when: epoch s
        .cancel(key) -> bool                     True when a timer was pending
        .when(key) -> float | None
        .run_due(now) -> int                     callbacks run (in time order)
        .next_due() -> float | None              the earliest pending time
        len(timers)                              pending timers
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable

__all__ = ["Timers"]


class Timers:
    """Keyed one-shot timers (see module docstring)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._live: dict[Hashable, tuple[float, int, Callable[[], None]]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def request(self, key: Hashable, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at ``when``, replacing any timer ``key`` already has."""
        seq = next(self._seq)
        self._live[key] = (when, seq, callback)
        heapq.heappush(self._heap, (when, seq, key))

    def cancel(self, key: Hashable) -> bool:
        """Forget the timer for ``key``."""
        return self._live.pop(key, None) is not None

    def when(self, key: Hashable) -> float | None:
        """The time the timer for ``key`` fires, or None."""
        live = self._live.get(key)
        return live[0] if live is not None else None

    def _prune(self) -> None:
        heap = self._heap
        while heap:
            _, seq, key = heap[0]
            live = self._live.get(key)
            if live is not None and live[1] == seq:
                return
            heapq.heappop(heap)

    def next_due(self) -> float | None:
        """The earliest time a timer fires, or None when none is pending."""
        self._prune()
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float) -> int:
        """Run every timer due at ``now``; returns how many ran."""
        ran = 0
        while True:
            self._prune()
            if not self._heap or self._heap[0][0] > now:
                return ran
            _, _, key = heapq.heappop(self._heap)
            _, _, callback = self._live.pop(key)
            callback()
            ran += 1
