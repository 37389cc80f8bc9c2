"""transport — one delivery transport and its destinations (qmgr_transport).

Summary
    A Transport is one master.cf delivery service (``smtp``, ``local``...). It owns its
    destination queues (qmgrd.qmgr.destqueue), its job lists and recipient pool
    (qmgrd.qmgr.joblist) and its parameters, read once from main.cf with Postfix's
    ``<transport><suffix>`` override and ``default<suffix>`` fallback (postfix.md §4.10):

    ===================================  ==========================================
    TransportParams field                parameter (suffix)
    ===================================  ==========================================
    recipient_limit                      ``_destination_recipient_limit`` (0 = none)
    concurrency_limit                    ``_destination_concurrency_limit`` (0 = none;
                                         1 when a destination rate delay is set)
    initial_concurrency                  ``_initial_destination_concurrency`` (clamped)
    positive, negative                   ``_destination_concurrency_{positive,negative}
                                         _feedback`` (``N``, ``N/M``, ``N/concurrency``)
    cohort_limit                         ``_destination_concurrency_failed_cohort_limit``
    dest_rate_delay, transport_rate_delay  ``_destination_rate_delay``,
                                         ``_transport_rate_delay`` (seconds)
    rcpt_pool, extra_rcpt_pool           ``_recipient_limit``, ``_extra_recipient_limit``
    refill_limit, refill_delay           ``_recipient_refill_limit``, ``_refill_delay``
    slot_cost, slot_loan, slot_discount, ``_delivery_slot_cost``, ``_delivery_slot_loan``,
    minimum_slots                        ``_delivery_slot_discount``, ``_minimum_delivery_
                                         slots``
    max_inflight                         the master.cf process limit (0 = default)
    ===================================  ==========================================

    State: ``inflight`` deliveries; ``startable`` (queues with entries waiting and room in
    their window, kept up to date by DestQueue.refresh); ``dead`` (its agent could not be reached: every
    recipient for it is deferred without an attempt until ``dead_until``,
    ``transport_retry_time`` later, postfix.md §4.8); ``rate_locked_until`` (the
    transport rate delay between two deliveries).

Public API
    TransportParams (dataclass); TransportParams.from_config(cfg, name, process_limit)
        logs a warning and uses 1 for a malformed feedback setting; raises
        master.config.ConfigError for a bad numeric value.
    Transport(name, params)
        .queues (dict name -> DestQueue), .jobs (JobList), .inflight, .startable, .dead,
        .dead_until, .dead_status, .dead_reason, .rate_locked_until
        .queue_obtain(name, nexthop) -> DestQueue; .queue_find(name) -> DestQueue | None
        .can_start(now) -> bool
"""

from __future__ import annotations

from dataclasses import dataclass

from master import log
from master.config import Config
from qmgrd.qmgr.destqueue import DestQueue
from qmgrd.qmgr.feedback import Window, parse_feedback
from qmgrd.qmgr.joblist import JobList

__all__ = ["Transport", "TransportParams"]


@dataclass(frozen=True)
class TransportParams:
    """A transport's scheduling parameters (see module docstring)."""

    recipient_limit: int = 50
    concurrency_limit: int = 20
    initial_concurrency: int = 5
    positive: tuple[float, bool] = (1.0, False)
    negative: tuple[float, bool] = (1.0, False)
    cohort_limit: int = 1
    dest_rate_delay: int = 0
    transport_rate_delay: int = 0
    rcpt_pool: int = 20000
    extra_rcpt_pool: int = 1000
    refill_limit: int = 100
    refill_delay: int = 5
    slot_cost: int = 5
    slot_loan: int = 3
    slot_discount: int = 50
    minimum_slots: int = 3
    max_inflight: int = 100

    @classmethod
    def from_config(cls, cfg: Config, name: str, process_limit: int) -> TransportParams:
        """Read ``name``'s parameters; ``process_limit`` from master.cf (0 = default)."""

        def feedback(suffix: str) -> tuple[float, bool]:
            text = cfg.transport_param(name, suffix)
            try:
                return parse_feedback(text)
            except ValueError:
                log.warning(f"{name}{suffix}: bad value {text!r}; using 1")
                return (1.0, False)

        rate_delay = cfg.transport_time(name, "_destination_rate_delay")
        limit = 1 if rate_delay > 0 else cfg.transport_int(
            name, "_destination_concurrency_limit")
        initial = cfg.transport_int(name, "_initial_destination_concurrency")
        if limit > 0:
            initial = min(initial, limit)
        default_procs = cfg.get_int("default_process_limit")
        return cls(
            recipient_limit=cfg.transport_int(name, "_destination_recipient_limit"),
            concurrency_limit=limit,
            initial_concurrency=max(initial, 1),
            positive=feedback("_destination_concurrency_positive_feedback"),
            negative=feedback("_destination_concurrency_negative_feedback"),
            cohort_limit=cfg.transport_int(
                name, "_destination_concurrency_failed_cohort_limit"),
            dest_rate_delay=rate_delay,
            transport_rate_delay=cfg.transport_time(name, "_transport_rate_delay"),
            rcpt_pool=cfg.transport_int(name, "_recipient_limit"),
            extra_rcpt_pool=cfg.transport_int(name, "_extra_recipient_limit"),
            refill_limit=cfg.transport_int(name, "_recipient_refill_limit"),
            refill_delay=cfg.transport_time(name, "_recipient_refill_delay"),
            slot_cost=cfg.transport_int(name, "_delivery_slot_cost"),
            slot_loan=cfg.transport_int(name, "_delivery_slot_loan"),
            slot_discount=cfg.transport_int(name, "_delivery_slot_discount"),
            minimum_slots=cfg.transport_int(name, "_minimum_delivery_slots"),
            max_inflight=process_limit if process_limit > 0 else default_procs,
        )


class Transport:
    """A delivery transport (master.cf service) and its destinations."""

    def __init__(self, name: str, params: TransportParams) -> None:
        self.name = name
        self.params = params
        self.queues: dict[str, DestQueue] = {}
        self.jobs = JobList(
            name,
            recipient_limit=params.rcpt_pool,
            extra_recipient_limit=params.extra_rcpt_pool,
            refill_limit=params.refill_limit,
            refill_delay=params.refill_delay,
            slot_cost=params.slot_cost,
            slot_loan=params.slot_loan,
            slot_discount=params.slot_discount,
            minimum_slots=params.minimum_slots,
        )
        self.inflight = 0
        self.startable = 0
        self.dead = False
        self.dead_until = 0.0
        self.dead_status = ""
        self.dead_reason = ""
        self.rate_locked_until = 0.0

    def __repr__(self) -> str:
        return (f"Transport({self.name}, queues={len(self.queues)}, inflight={self.inflight}"
                f"{', dead' if self.dead else ''})")

    def queue_find(self, name: str) -> DestQueue | None:
        """The destination queue ``name`` (lower case), if it exists."""
        return self.queues.get(name)

    def queue_obtain(self, name: str, nexthop: str) -> DestQueue:
        """Find or create the destination queue ``name`` (lower-cased)."""
        key = name.lower()
        q = self.queues.get(key)
        if q is None:
            q = DestQueue(key, nexthop, self, Window(self.params.initial_concurrency))
            self.queues[key] = q
        return q

    def can_start(self, now: float) -> bool:
        """True when the transport may and can hand out another delivery now: alive, not
        rate locked, below its process limit, and some queue has entries and room (the
        job lists are not even looked at otherwise, qmgr_transport_select)."""
        return (self.startable > 0 and not self.dead
                and self.inflight < self.params.max_inflight
                and now >= self.rate_locked_until)
