"""Concurrency feedback ("slow start", postfix.md §4.7): exact windows after given feedback
sequences, the feedback forms, and the per-transport parameters that feed them."""

from __future__ import annotations

from pathlib import Path

import pytest

from master.config import Config
from qmgrd.qmgr.feedback import Window, feedback_value, negative, parse_feedback, positive
from qmgrd.qmgr.transport import TransportParams


def cfg_with(tmp_path: Path, **params: str) -> Config:
    text = "".join(f"{k} = {v}\n" for k, v in params.items())
    return Config.from_text(text, str(tmp_path))


def run_positive(w: Window, times: int, busy: int, initial: int = 5, limit: int = 20,
                 spec: tuple[float, bool] = (1.0, False)) -> list[int]:
    out = []
    for _ in range(times):
        positive(w, feedback_value(spec, w.window), busy, initial, limit)
        out.append(w.window)
    return out


def run_negative(w: Window, times: int, cohort_limit: int = 1,
                 spec: tuple[float, bool] = (1.0, False)) -> list[tuple[int, bool]]:
    out = []
    for _ in range(times):
        dead = negative(w, feedback_value(spec, w.window), cohort_limit)
        out.append((w.window, dead))
    return out


def test_parse_feedback_forms() -> None:
    assert parse_feedback("1") == (1.0, False)
    assert parse_feedback("1/4") == (0.25, False)
    assert parse_feedback(" 1/concurrency ") == (1.0, True)
    assert parse_feedback("0") == (0.0, False)
    for bad in ("2", "-1", "1/0", "x", "1/x", "3/2"):
        with pytest.raises(ValueError):
            parse_feedback(bad)
    assert feedback_value((1.0, True), 4) == 0.25
    assert feedback_value((0.5, False), 4) == 0.5


def test_positive_grows_one_per_success_while_below_busy_plus_initial() -> None:
    # busy 5, initial 5: the window may grow up to 9 (window < busy + initial)
    w = Window(5)
    assert run_positive(w, 6, busy=5) == [6, 7, 8, 9, 10, 10]
    # an idle destination (busy 0) does not grow at all
    w = Window(5)
    assert run_positive(w, 3, busy=0) == [5, 5, 5]
    assert w.success == 0


def test_positive_stops_at_destination_limit_and_zero_means_unlimited() -> None:
    w = Window(5)
    assert run_positive(w, 5, busy=10, limit=7) == [6, 7, 7, 7, 7]
    w = Window(18)
    assert run_positive(w, 4, busy=30, limit=0) == [19, 20, 21, 22]


def test_positive_fractional_and_per_concurrency_feedback() -> None:
    w = Window(5)  # 1/4: one increment per 4 successes (success + g/2 >= 1)
    assert run_positive(w, 8, busy=10, spec=(0.25, False)) == [5, 5, 5, 6, 6, 6, 6, 7]
    w = Window(2)  # 1/concurrency: g = 1/window, so each step needs ~window successes
    assert run_positive(w, 8, busy=10, spec=(1.0, True)) == [2, 3, 3, 3, 4, 4, 4, 4]


def test_negative_default_worked_example_5_3_2_dead() -> None:
    w = Window(5)
    assert run_negative(w, 3) == [(3, False), (2, False), (0, True)]
    assert w.fail_cohorts == pytest.approx(1 / 5 + 1 / 3 + 1 / 2)


def test_success_between_failures_resets_fail_cohorts() -> None:
    w = Window(5)
    run_negative(w, 2)
    positive(w, 1.0, 3, 5, 20)
    assert w.fail_cohorts == 0
    assert w.window == 3  # 2 -> 3 (window < busy + initial)
    # the increment also restarted the negative hysteresis cycle (failure = 0): the next
    # failure takes two steps at once again, as the very first one did
    assert run_negative(w, 1) == [(1, False)]


def test_negative_without_cohort_limit_never_dies_and_keeps_window_1() -> None:
    w = Window(5)
    assert run_negative(w, 6, cohort_limit=0) == [
        (3, False), (2, False), (1, False), (1, False), (1, False), (1, False)]


def test_negative_cohort_limit_2_and_half_feedback() -> None:
    w = Window(5)
    got = run_negative(w, 6, cohort_limit=2, spec=(0.5, False))
    # f = 1/2: one step down per two failures after the first (hysteresis 1), and the
    # pseudo-cohorts 1/5+1/4+1/3+1/3+1/2+1/2 >= 2 kill it at the sixth
    assert got == [(4, False), (3, False), (3, False), (2, False), (2, False), (0, True)]


def test_positive_revives_a_dead_window() -> None:
    w = Window(0, success=0.5, failure=0.25, fail_cohorts=1.0)
    positive(w, 1.0, 3, 5, 20)
    assert (w.window, w.success, w.failure, w.fail_cohorts) == (3, 0, 0, 0)
    w = Window(0)
    positive(w, 1.0, 0, 5, 20)
    assert w.window == 5


def test_transport_params_per_transport_overrides(tmp_path: Path) -> None:
    cfg = cfg_with(
        tmp_path,
        initial_destination_concurrency="4",
        smtp_destination_concurrency_limit="3",
        smtp_destination_concurrency_positive_feedback="1/concurrency",
        smtp_destination_concurrency_negative_feedback="1/2",
        smtp_destination_concurrency_failed_cohort_limit="0",
        relay_destination_rate_delay="10s",
        relay_initial_destination_concurrency="7",
        default_destination_recipient_limit="20",
        lmtp_transport_rate_delay="2s",
        smtp_delivery_slot_cost="7",
        default_delivery_slot_loan="1",
        smtp_recipient_refill_limit="40",
        smtp_recipient_refill_delay="2s",
        smtp_recipient_limit="500",
        smtp_extra_recipient_limit="50",
    )
    smtp = TransportParams.from_config(cfg, "smtp", 0)
    assert smtp.concurrency_limit == 3
    assert smtp.initial_concurrency == 3  # clamped to the destination limit
    assert smtp.positive == (1.0, True)
    assert smtp.negative == (0.5, False)
    assert smtp.cohort_limit == 0
    assert smtp.recipient_limit == 20
    assert (smtp.slot_cost, smtp.slot_loan, smtp.slot_discount, smtp.minimum_slots) == (
        7, 1, 50, 3)
    assert (smtp.refill_limit, smtp.refill_delay) == (40, 2)
    assert (smtp.rcpt_pool, smtp.extra_rcpt_pool) == (500, 50)
    assert smtp.max_inflight == 100  # master.cf "-" -> default_process_limit
    relay = TransportParams.from_config(cfg, "relay", 4)
    # a destination rate delay forces destination concurrency 1
    assert (relay.dest_rate_delay, relay.concurrency_limit, relay.initial_concurrency) == (
        10, 1, 1)
    assert relay.max_inflight == 4
    local = TransportParams.from_config(cfg, "local", 0)
    assert (local.recipient_limit, local.concurrency_limit) == (1, 2)
    assert TransportParams.from_config(cfg, "lmtp", 0).transport_rate_delay == 2


def test_bad_feedback_setting_falls_back_to_1(tmp_path: Path) -> None:
    cfg = cfg_with(tmp_path, smtp_destination_concurrency_negative_feedback="lots")
    assert TransportParams.from_config(cfg, "smtp", 0).negative == (1.0, False)
