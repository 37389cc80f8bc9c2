"""message — one queue file while it is in the active queue (qmgr_message).

Summary
    The in-memory view of a message the qmgr has taken into ``active/``: the envelope
    facts needed to build delivery requests and to finish the message, the bookkeeping
    of its outstanding delivery entries, and its share of the active queue's recipient
    memory (postfix.md §4.3, §4.6):

    * ``rcpt_count``: recipients of this message now in memory (in entries);
    * ``rcpt_limit``: how many it may hold: ``qmgr_message_recipient_minimum`` of its
      own, plus the slots its jobs were given from their transports' pools;
    * ``rcpt_offset``: where the next batch of recipients starts in the queue file
      (0 = every recipient has been read); ``rcpt_unread``: how many are left there;
    * ``refill_time``: when the last batch was read (``<transport>_recipient_refill_delay``).

    ``defer_recipients()`` is how the qmgr itself defers recipients without a delivery
    attempt (dead transport, dead destination, ``defer_transports``): a ``defer/<id>``
    log entry and Postfix's ``status=deferred`` log line each, ``relay=none``.

Public API
    Message (dataclass)
        qid, sender, arrival (epoch s, float), create_time (epoch s), active_arrival,
        queued_time (int epoch s: entered the active queue; the jobs' FIFO order),
        size (content bytes), data_offset, data_size (bytes), encoding, smtputf8, envid,
        ret, client/helo/protocol log attributes, rewrite_context, warn_time, warn_offset,
        single_rcpt (VERP: one recipient per delivery), flush (ignore defer_transports),
        unthrottle (per-message flush: revive dead transports/destinations it needs),
        forced_expire, refcount, deferred, completing, left (the qmgr is going away
        and a delivery of it could not be made: it stays in active/ unfinished, for the
        next qmgr; qmgrd.qmgr.scheduler; an operator's pending change of it
        is still carried out), corrupt, nrcpt, jobs
        (transport name -> Job, in creation order), rcpt_* counters above;
        admin: an operator's hold/delete/requeue waiting for the deliveries in flight
        (qmgrd.qmgr.admin; completion carries it out instead of deferring);
        retry_at: epoch s, 0 = none: retry no later than this (a suspension's end).
    Message.from_queue_file(qf, now) -> Message
    Message.defer_recipients(spool, rcpts, status, reason, now) -> None
        logs a warning (and carries on) when the defer log cannot be written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from master import log
from qmgrd import logfmt
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import Recipient
from qmgrd.spool.queue import Spool

if TYPE_CHECKING:
    from qmgrd.qmgr.admin import AdminAction
    from qmgrd.qmgr.job import Job

__all__ = ["Message"]


@dataclass(eq=False, slots=True)
class Message:
    """A message in the active queue (see module docstring)."""

    qid: str
    sender: str
    arrival: float
    create_time: float
    active_arrival: float
    size: int
    data_offset: int
    data_size: int = 0
    queued_time: int = 0
    encoding: str = ""
    smtputf8: int = 0
    envid: str = ""
    ret: int = 0
    client_name: str = ""
    client_address: str = ""
    client_port: str = ""
    protocol_name: str = ""
    helo_name: str = ""
    rewrite_context: str = "local"
    warn_time: int = 0
    warn_offset: int = 0
    single_rcpt: bool = False
    flush: bool = False
    unthrottle: bool = False
    forced_expire: bool = False
    refcount: int = 0
    deferred: bool = False
    completing: bool = False
    left: bool = False
    corrupt: bool = False
    stale_defer_log: bool = False  # defer/<id> of an earlier attempt may still be there
    nrcpt: int = 0
    rcpt_count: int = 0
    rcpt_limit: int = 0
    rcpt_unread: int = 0
    rcpt_offset: int = 0
    refill_time: float = 0.0
    jobs: dict[str, Job] = field(default_factory=dict)
    admin: AdminAction | None = None
    retry_at: float = 0.0

    @classmethod
    def from_queue_file(cls, qf: Any, now: float) -> Message:
        """Build from an open ``qmgrd.spool.message.QueueFile`` (recipients not counted)."""
        attrs: dict[str, str] = dict(getattr(qf, "attrs", {}) or {})
        arrival = qf.arrival
        if isinstance(arrival, tuple):
            arrival = arrival[0] + arrival[1] / 1e6
        return cls(
            qid=qf.qid,
            sender=qf.sender,
            arrival=float(arrival),
            create_time=float(qf.create_time or arrival),
            active_arrival=now,
            queued_time=int(now),
            size=int(qf.content_size or qf.data_size),
            data_offset=int(qf.data_offset),
            data_size=int(qf.data_size),
            encoding=qf.encoding or "",
            smtputf8=int(qf.smtputf8 or 0),
            envid=qf.envid or "",
            ret=int(qf.ret or 0),
            client_name=attrs.get("log_client_name", attrs.get("client_name", "")),
            client_address=attrs.get("log_client_address", attrs.get("client_address", "")),
            client_port=attrs.get("log_client_port", attrs.get("client_port", "")),
            protocol_name=attrs.get("log_protocol_name", attrs.get("protocol_name", "")),
            helo_name=attrs.get("log_helo_name", attrs.get("helo_name", "")),
            rewrite_context=getattr(qf, "rewrite_context", "") or "local",
            warn_time=int(getattr(qf, "warn_time", 0) or 0),
            warn_offset=int(getattr(qf, "warn_offset", 0) or 0),
            single_rcpt=bool(getattr(qf, "verp", "")),
        )

    def drop_stale_defer_log(self, spool: Spool) -> None:
        """Remove the defer log an earlier attempt left (``stale_defer_log``), once:
        before the first entry of this attempt is written to it (by the qmgr, or by an
        agent: before the first delivery request goes out) and before the message goes
        back to deferred/. Postfix's qmgr removes it when the message enters the active
        queue; here that unlink (a system call that frees the file's blocks: on a file
        system mounted with ``discard``, also their discard) held up the feeding of the
        active queue, the start of every delivery (issue 8, scenario C: 2,000-2,400
        against 2,400-2,700 msgs/s). Logs ``<id>: cannot remove stale defer log: ...``
        when the unlink fails for another reason than a missing file."""
        if not self.stale_defer_log:
            return
        self.stale_defer_log = False
        try:
            os.unlink(spool.path("defer", self.qid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning(f"{self.qid}: cannot remove stale defer log: {exc}")

    def defer_recipients(self, spool: Spool, rcpts: Iterable[Recipient], status: str,
                         reason: str, now: float) -> None:
        """Defer ``rcpts`` without a delivery attempt (defer log + ``status=deferred`` line)."""
        self.drop_stale_defer_log(spool)
        self.deferred = True
        dsn = statuslog.Dsn(status=status, action="delayed", reason=reason)
        for rcpt in rcpts:
            try:
                statuslog.append(spool, "defer", self.qid, rcpt, dsn)
            except OSError as exc:
                log.warning(f"{self.qid}: cannot update defer log: {exc}")
            log.info(logfmt.delivery_line(
                self.qid, rcpt.address, rcpt.orig_rcpt, "none", self.arrival,
                self.active_arrival, now, now, now, status, "deferred", reason))
