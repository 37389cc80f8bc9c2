"""status — a window onto the scheduler: ``private/qmgr-status`` and its readers.

Summary
    The qmgr answers every connection to the UNIX socket ``private/qmgr-status`` (under
    the queue directory, so it works in the chroot; mode 0600, created by the qmgr
    itself) with one JSON document describing the scheduler, then closes. Nothing is
    read from the client. ``qmgr-ctl status [--json]`` prints it.

    The document (``snapshot``)::

        {"pid", "time", "started" (when this qmgr started),
         "active": {"messages", "recipients", "message_limit", "recipient_limit"},
         "scans": {"incoming"|"deferred": {"busy", "restart_pending", "scan_all",
                   "flush"}},
         "next_deferred_scan", "timers",
         "suspended": [{"domain", "until" (0 = until resumed), "reason", "since"}]
             (operator suspensions, qmgr-ctl suspend; qmgrd.qmgr.suspend),
         "transports": [{"name", "dead", "dead_until", "dead_status", "dead_reason",
             "inflight", "max_inflight", "concurrency_limit", "initial_concurrency",
             "recipient_limit", "rate_delay": {"destination", "transport",
             "locked_until"},
             "active": {"jobs" (on the job lists), "messages", "recipients" (in
             entries, waiting or in delivery)}, "recipient_pool", "current_job",
             "destinations": [{"name", "nexthop", "state" (ready|dead|suspended),
                 "window", "busy", "todo" (entries), "recipients", "success",
                 "failure", "fail_cohorts",
                 "dead_until", "dead_status", "dead_reason", "suspended_until"}]}]}

    Times are epoch seconds (0 = not set). Building it is O(transports + destinations +
    entries); it happens only when asked.

Public API
    snapshot(sched) -> dict            (the scheduler's state as plain data)
    StatusServer(path, provider)       async start() -> bool / async close(); start logs a
                                       warning and returns False when the socket cannot
                                       be made (the qmgr runs on without it); close leaves
                                       a socket alone that a newer qmgr made meanwhile
    fetch(path, timeout=5.0) -> dict   client; raises OSError, ValueError, TypeError
    format_text(snap, now=None) -> str the readable form (qmgr-ctl status)
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qmgrd.qmgr.jsonsock import JsonServer, exchange

if TYPE_CHECKING:
    from qmgrd.qmgr.scheduler import Scheduler

__all__ = ["StatusServer", "fetch", "format_text", "snapshot"]

MAX_REPLY = 64 << 20


def _state(window: int) -> str:
    return "ready" if window > 0 else ("dead" if window == 0 else "suspended")


def snapshot(sched: Scheduler) -> dict[str, Any]:
    """The scheduler's state as a JSON-ready dict (see module docstring)."""
    transports: list[dict[str, Any]] = []
    for t in sched.transports.values():
        p = t.params
        dests = []
        messages: set[str] = set()
        recipients = 0
        for q in t.queues.values():
            nrcpt = 0
            for chain in (q.todo, q.busy):
                for e in chain:
                    messages.add(e.message.qid)
                    nrcpt += len(e.recipients)
            recipients += nrcpt
            dests.append({
                "name": q.name, "nexthop": q.nexthop, "state": _state(q.window.window),
                "window": q.window.window, "busy": len(q.busy), "todo": len(q.todo),
                "recipients": nrcpt, "success": q.window.success,
                "failure": q.window.failure, "fail_cohorts": q.window.fail_cohorts,
                "dead_until": q.dead_until, "dead_status": q.dead_status,
                "dead_reason": q.dead_reason, "suspended_until": q.suspended_until,
            })
        current = t.jobs.current
        transports.append({
            "name": t.name, "dead": t.dead, "dead_until": t.dead_until,
            "dead_status": t.dead_status, "dead_reason": t.dead_reason,
            "inflight": t.inflight, "max_inflight": p.max_inflight,
            "concurrency_limit": p.concurrency_limit,
            "initial_concurrency": p.initial_concurrency,
            "recipient_limit": p.recipient_limit,
            "rate_delay": {"destination": p.dest_rate_delay,
                           "transport": p.transport_rate_delay,
                           "locked_until": t.rate_locked_until},
            "active": {"jobs": len(t.jobs.sched), "messages": len(messages),
                       "recipients": recipients},
            "recipient_pool": t.jobs.rcpt_unused,
            "current_job": current.message.qid if current is not None else "",
            "destinations": dests,
        })
    return {
        "pid": os.getpid(),
        "time": sched.clock(),
        "started": sched.start_time,
        "active": {"messages": len(sched.active.messages),
                   "recipients": sched.active.rcpt_count,
                   "message_limit": sched.active.message_limit,
                   "recipient_limit": sched.active.recipient_limit},
        "scans": {s.name: {"busy": s.busy, "restart_pending": s.restart_pending,
                           "scan_all": s.scan_all, "flush": s.flush}
                  for s in (sched.incoming, sched.deferred)},
        "next_deferred_scan": sched.next_deferred_scan(),
        "timers": len(sched.timers),
        "transports": transports,
        "suspended": sched.suspended.describe(),
    }


class StatusServer(JsonServer):
    """Serves :func:`snapshot` documents on a UNIX socket (see module docstring)."""

    def __init__(self, path: str, provider: Callable[[], dict[str, Any]]) -> None:
        super().__init__(path, "status")
        self.provider = provider

    async def reply(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        return self.provider()


def fetch(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Read one status document from ``path``.

    Raises:
        OSError: no qmgr listens (or timeout); ValueError: bad JSON or too large;
        TypeError: JSON, but not an object.
    """
    return exchange(path, None, MAX_REPLY, "status", timeout)


def _when(value: float, now: float) -> str:
    if not value:
        return "-"
    return f"{time.strftime('%H:%M:%S', time.localtime(value))} (in {max(0, value - now):.0f}s)"


def format_text(snap: dict[str, Any], now: float | None = None) -> str:
    """The status document as readable text."""
    now = snap.get("time", time.time()) if now is None else now
    a = snap["active"]
    out = [(f"qmgr pid {snap['pid']}: {a['messages']} messages, {a['recipients']} "
            f"recipients in the active queue (limits {a['message_limit']} messages, "
            f"{a['recipient_limit']} recipients)")]
    scans = []
    for name, s in snap["scans"].items():
        flags = [f for f in ("restart_pending", "scan_all", "flush") if s[f]]
        scans.append(f"{name} {'running' if s['busy'] else 'idle'}"
                     + (f" ({', '.join(flags)})" if flags else ""))
    out.append(f"scans: {'; '.join(scans)}; next deferred scan "
               f"{_when(snap['next_deferred_scan'], now)}")
    for s in snap.get("suspended", []):
        until = _when(s["until"], now) if s["until"] else "resumed"
        out.append(f"suspended: {s['domain']} until {until}"
                   + (f": {s['reason']}" if s["reason"] else ""))
    for t in snap["transports"]:
        act = t["active"]
        rate = t["rate_delay"]
        head = (f"transport {t['name']}: {t['inflight']} in flight (max {t['max_inflight']}), "
                f"concurrency limit {t['concurrency_limit'] or 'none'}, "
                f"{act['messages']} messages, {act['recipients']} recipients, "
                f"recipient pool {t['recipient_pool']}")
        if rate["destination"] or rate["transport"]:
            head += (f", rate delay destination {rate['destination']}s "
                     f"transport {rate['transport']}s")
            if rate["locked_until"] > now:
                head += f" (locked until {_when(rate['locked_until'], now)})"
        out.append("")
        out.append(head)
        if t["dead"]:
            out.append(f"  DEAD until {_when(t['dead_until'], now)}: "
                       f"{t['dead_status']} {t['dead_reason']}")
        if t["destinations"]:
            out.append(f"  {'destination':<40} {'state':<9} {'window':>6} {'busy':>5} "
                       f"{'todo':>6}")
        for d in t["destinations"]:
            line = (f"  {d['name'][:40]:<40} {d['state']:<9} {d['window']:>6} "
                    f"{d['busy']:>5} {d['todo']:>6}")
            if d["state"] == "dead":
                line += (f"  until {_when(d['dead_until'], now)}: "
                         f"{d['dead_status']} {d['dead_reason']}")
            elif d["state"] == "suspended":
                line += f"  until {_when(d['suspended_until'], now)}"
            out.append(line)
    return "\n".join(out) + "\n"
