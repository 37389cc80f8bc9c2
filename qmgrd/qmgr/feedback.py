"""feedback — destination concurrency feedback ("slow start"), as pure functions.

Summary
    Postfix's qmgr_queue_throttle / qmgr_queue_unthrottle (postfix.md §4.7). A queue
    (destination) has a concurrency ``window``; each delivery's outcome feeds back:

    positive (the agent's reply carried no hop status): ``fail_cohorts = 0``; while the
        window is below the destination limit and below ``busy + initial``,
        ``success += g`` and the window grows by one for each whole unit.
    negative (hop status: the site had a connection/handshake-level problem):
        ``fail_cohorts += 1/window``; at ``failed_cohort_limit`` the destination is dead
        (window 0); otherwise ``failure -= f`` and the window shrinks, never below 1.

    Feedback values ``g`` and ``f`` come from ``<transport>_destination_concurrency_
    {positive,negative}_feedback``: ``number``, ``number/number`` or
    ``number/concurrency`` (divided by the current window).

Public API
    Window (dataclass: window, success, failure, fail_cohorts)
    parse_feedback(text) -> (numerator: float, per_concurrency: bool)   raises ValueError
    feedback_value(spec, window) -> float
    positive(w, g, busy, initial, limit) -> None
    negative(w, f, cohort_limit) -> bool   (True: the destination is now dead)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Window", "feedback_value", "negative", "parse_feedback", "positive"]


@dataclass
class Window:
    """Concurrency state of one destination queue."""

    window: int
    success: float = 0.0
    failure: float = 0.0
    fail_cohorts: float = 0.0


def parse_feedback(text: str) -> tuple[float, bool]:
    """Parse a feedback setting.

    Returns:
        (value, per_concurrency): ``"1"`` -> (1.0, False); ``"1/4"`` -> (0.25, False);
        ``"1/concurrency"`` -> (1.0, True).

    Raises:
        ValueError: not one of the three forms, or a value outside 0..1.
    """
    num, slash, den = text.strip().partition("/")
    value = float(num)
    per_conc = False
    if slash:
        if den.strip() == "concurrency":
            per_conc = True
        else:
            d = float(den)
            if d <= 0:
                raise ValueError(f"bad feedback denominator in {text!r}")
            value /= d
    if not 0 <= value <= 1:
        raise ValueError(f"feedback {text!r} out of range 0..1")
    return value, per_conc


def feedback_value(spec: tuple[float, bool], window: int) -> float:
    """The feedback amount for the current window."""
    value, per_conc = spec
    return value / max(window, 1) if per_conc else value


def positive(w: Window, g: float, busy: int, initial: int, limit: int) -> None:
    """Apply positive feedback (``limit`` 0 = unlimited). Revives a dead window."""
    w.fail_cohorts = 0.0
    if w.window <= 0:
        w.window = busy if busy > 0 else initial
        w.success = w.failure = 0.0
        return
    if (limit == 0 or w.window < limit) and w.window < busy + initial:
        w.success += g
        while w.success + g / 2 >= 1:
            w.window += 1
            w.success -= 1
            w.failure = 0.0
    if limit and w.window > limit:
        w.window = limit


def negative(w: Window, f: float, cohort_limit: int) -> bool:
    """Apply negative feedback. Returns True when the destination became dead."""
    if w.window <= 0:
        return True
    w.fail_cohorts += 1.0 / w.window
    if cohort_limit > 0 and w.fail_cohorts >= cohort_limit:
        w.window = 0
        return True
    w.failure -= f
    while w.failure - f / 2 < 0:
        w.window -= 1
        w.failure += 1
        w.success = 0.0
    w.window = max(w.window, 1)
    return False
