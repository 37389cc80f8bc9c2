"""control — the qmgr's control socket ``private/qmgr-control`` (qmgr-ctl's requests).

Summary
    ``qmgr-ctl`` asks the running qmgr to do what only the owner of the active queue can
    do safely. One JSON object per connection, one line each way, both bounded::

        {"cmd": "ping"}                       -> {"pid": N, "tables_changed": bool}
        {"cmd": "tables"}                     -> {"pid": N, "restarting": bool}
            a transport map changed: the qmgr restarts now (as its 5 s watcher would),
            so that mail requeued next is routed by the new map
        {"cmd": "act", "action": "hold"|"delete"|"requeue", "ids": [...], "wait": s,
         "verdict": bool (optional)}          -> {"results": {id: result}}
        {"cmd": "suspend"}                    -> {"suspended": [...]}
            re-read ``private/qmgr-suspend`` (qmgrd.qmgr.suspend)

    Errors: ``{"error": "<text>"}``. The socket is created by the qmgr (mode 0600,
    mail_owner), so only root and mail_owner can connect — the same people who may
    change the queue.

    ``act`` on a message in the active queue (qmgrd.qmgr.admin): its waiting entries are
    taken out of the scheduler, the change is made when the deliveries in flight have
    ended. The reply waits up to ``wait`` seconds (at most 60) for that. Results:
    ``done``; ``delivered`` (hold/requeue: every recipient was delivered meanwhile, the
    file was removed as usual; with ``"verdict": true`` also a delete that was moot for
    that reason — without it such a delete is ``done``, as before); ``pending`` (still in delivery when the wait ended; the
    change follows); ``a delete of it is pending`` (hold/requeue of a message whose
    delete waits for its deliveries); ``absent`` (not in the active queue: look elsewhere); ``busy`` (a
    file in active/ the qmgr does not hold, locked by a delivery agent); ``error: ...``.

    Suspensions: at start and on ``suspend`` the file is read and the set replaced. A new
    suspension defers the matching recipients still waiting in the scheduler at once
    (``4.3.2 ... suspended by the administrator``, no attempt) and later ones when they
    are resolved (qmgrd.qmgr.active); deliveries in flight finish. When a suspension
    ends by its time, or is lifted, the qmgr logs it and scans the deferred queue
    (again 5 s later, for mail deferred while the first scan ran).

Public API
    CONTROL_SOCKET = "qmgr-control"
    Control(sched, queue_directory, on_tables_changed)
        .load_suspensions() -> None     (logs a warning for a broken file)
        async .handle(request: dict) -> dict
        .act(ids, action, verdict=False) -> dict[str, str]   immediate results (no
                                                 waiting; verdict: see ``act`` above)
    ControlServer(path, control)   async start() -> bool / async close()
    request(path, doc, timeout=10.0) -> dict     the client; OSError, ValueError,
                                                 TypeError

Logs ``delivery to <key> suspended ...``, ``... resumed``, the admin lines of
qmgrd.qmgr.admin, ``<id>: <action> not done: no such message in the queue`` for an
``act`` on a message in no queue at all (e.g. delivered while the qmgr was stopped and
the request waited), warnings for bad requests.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from master import log
from qmgrd.qmgr.admin import ABSENT, DONE, AdminAction, apply_file
from qmgrd.qmgr.jsonsock import IO_TIMEOUT, JsonServer, exchange
from qmgrd.qmgr.suspend import Suspension, load, suspend_path
from qmgrd.spool.queue import MESSAGE_QUEUES
from qmgrd.spool.queueid import valid_id

if TYPE_CHECKING:
    from qmgrd.qmgr.message import Message
    from qmgrd.qmgr.scheduler import Scheduler

__all__ = ["CONTROL_SOCKET", "Control", "ControlServer", "request"]

CONTROL_SOCKET = "qmgr-control"
MAX_REQUEST = 4 << 20
MAX_IDS = 20000
MAX_WAIT = 60.0
RESCAN_DELAY = 5.0
_ACT = ("hold", "delete", "requeue")


class Control:
    """The request handlers, bound to one Scheduler (see module docstring)."""

    def __init__(self, sched: Scheduler, queue_directory: str,
                 on_tables_changed: Callable[[], None]) -> None:
        self.sched = sched
        self.suspend_file = suspend_path(queue_directory)
        self.on_tables_changed = on_tables_changed
        self.pending: dict[str, AdminAction] = {}

    # ------------------------------------------------------------------ requests
    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """Answer one request (see module docstring); never raises for bad input."""
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"pid": os.getpid(), "tables_changed": self.sched.resolver.tables_changed()}
        if cmd == "tables":
            table = self.sched.resolver.changed_table()
            if table is not None:
                log.info(f"table {table} has changed -- restarting")
                self.on_tables_changed()
            return {"pid": os.getpid(), "restarting": table is not None}
        if cmd == "suspend":
            self.load_suspensions()
            return {"suspended": self.sched.suspended.describe()}
        if cmd == "act":
            action, ids, wait = req.get("action"), req.get("ids"), req.get("wait", 0)
            verdict = req.get("verdict", False)
            if (action not in _ACT or not isinstance(ids, list) or len(ids) > MAX_IDS
                    or not all(isinstance(i, str) and valid_id(i) for i in ids)
                    or not isinstance(wait, int | float) or not isinstance(verdict, bool)):
                return {"error": "bad act request"}
            results = self.act(ids, action, verdict)
            waiting = [i for i, r in results.items() if r == "pending"]
            if waiting and wait > 0:
                await self._wait(waiting, min(float(wait), MAX_WAIT))
                for qid in waiting:
                    results[qid] = self._result(qid, verdict)
            return {"results": results}
        return {"error": f"unknown command {str(cmd)[:40]!r}"}

    def act(self, ids: list[str], action: str, verdict: bool = False) -> dict[str, str]:
        """Start ``action`` on each active-queue message; immediate results (``verdict``:
        a moot delete is ``delivered``, not ``done``)."""
        out: dict[str, str] = {}
        for qid in ids:
            msg = self.sched.active.messages.get(qid)
            if msg is None:
                try:
                    out[qid] = apply_file(self.sched.spool, "active", qid, action)
                except (OSError, ValueError) as exc:
                    out[qid] = f"error: {exc}"
                if out[qid] == ABSENT and not self._queued(qid):
                    # e.g. delivered and removed while the qmgr was stopped and the
                    # request waited in the socket: the maillog says what became of it
                    log.info(f"{qid}: {action} not done: no such message in the queue")
                continue
            old = msg.admin
            if isinstance(old, AdminAction) and old.action == "delete" and action != "delete":
                out[qid] = "a delete of it is pending"  # not "done": it will be removed
                continue
            self._take(msg, action)
            out[qid] = self._result(qid, verdict)
        return out

    def _queued(self, qid: str) -> bool:
        """``qid`` has a file in some message queue (maildrop ... corrupt)."""
        spool = self.sched.spool
        return any(os.path.lexists(spool.path(queue, qid)) for queue in MESSAGE_QUEUES)

    def _take(self, msg: Message, action: str) -> None:
        """Take ``msg`` out of scheduling; ``action`` follows its in-flight deliveries."""
        sched = self.sched
        old = msg.admin
        if not (isinstance(old, AdminAction) and old.action == "delete"):
            msg.admin = AdminAction(action, sched.spool, self._requeued)
        if isinstance(msg.admin, AdminAction):
            self.pending[msg.qid] = msg.admin
        purged = False
        for job in list(msg.jobs.values()):
            for peer in list(job.peers):
                for entry in list(peer.entries):
                    sched.entry_purged(entry)
                    purged = True
        if msg.rcpt_offset > 0:  # recipients not read yet stay in the file
            msg.rcpt_offset = 0
            msg.rcpt_unread = 0
            purged = True
            for job in list(msg.jobs.values()):
                job.joblist.move_limits(job)
        if purged:
            msg.deferred = True  # recipients are left: keep the file
        if msg.refcount == 0:
            sched.start_completion(msg)
        sched.wakeup.set()

    def _requeued(self) -> None:
        self.sched.incoming.request()
        self.sched.wakeup.set()

    def _result(self, qid: str, verdict: bool = False) -> str:
        admin = self.pending.get(qid)
        msg = self.sched.active.messages.get(qid)
        if admin is not None and admin.outcome:
            self.pending.pop(qid, None)
            if verdict and admin.moot and admin.outcome == DONE:
                return "delivered"  # a moot delete: every recipient was delivered
            return admin.outcome
        if msg is not None and msg.admin is admin and admin is not None:
            return "pending"
        self.pending.pop(qid, None)
        return ABSENT

    async def _wait(self, ids: list[str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(self._settled(qid) for qid in ids):
                return
            await asyncio.sleep(0.02)

    def _settled(self, qid: str) -> bool:
        admin = self.pending.get(qid)
        return admin is None or bool(admin.outcome) or qid not in self.sched.active.messages

    # ------------------------------------------------------------------ suspensions
    def load_suspensions(self) -> None:
        """Read the suspension file and make it the qmgr's set (see module docstring)."""
        sched = self.sched
        now = sched.clock()
        try:
            items = load(self.suspend_file, now)
        except (OSError, ValueError) as exc:
            log.warning(f"cannot read {self.suspend_file}: {exc}: suspensions unchanged")
            return
        added, removed = sched.suspended.replace(items, now)
        for s in removed:
            sched.timers.cancel(("suspend", s.domain))
            log.info(f"delivery to {s.domain} resumed")
        for s in added:
            log.info(f"{s.text} (qmgr-ctl suspend)")
            if s.until:
                sched.timers.request(("suspend", s.domain), s.until, self._expire)
        if added:
            self._sweep()
        if removed:
            self._rescan()

    def _expire(self) -> None:
        for s in self.sched.suspended.expire(self.sched.clock()):
            log.info(f"delivery to {s.domain} resumed: suspension ended")
        self._rescan()

    def _rescan(self) -> None:
        sched = self.sched
        sched.deferred.request()
        sched.timers.request(("suspend-rescan",), sched.clock() + RESCAN_DELAY,
                             sched.deferred.request)
        sched.wakeup.set()

    def _sweep(self) -> None:
        """Defer recipients waiting in the scheduler that a suspension now covers."""
        sched = self.sched
        now = sched.clock()
        for t in list(sched.transports.values()):
            for q in list(t.queues.values()):
                for entry in list(q.todo):
                    hits = [(r, sched.suspended.match(r.address, q.nexthop))
                            for r in entry.recipients]
                    matched = [(r, s) for r, s in hits if s is not None]
                    if not matched:
                        continue
                    msg = entry.message
                    for r, s in matched:
                        note_suspended(msg, s)
                        msg.defer_recipients(sched.spool, [r], "4.3.2", s.text, now)
                    if len(matched) == len(entry.recipients):
                        sched.entry_purged(entry)
                        continue
                    gone = {id(r) for r, _ in matched}
                    entry.recipients = [r for r in entry.recipients if id(r) not in gone]
                    n = len(matched)
                    entry.peer.job.rcpt_count -= n
                    msg.rcpt_count -= n
                    sched.active.rcpt_count -= n
        sched.wakeup.set()


def note_suspended(msg: Message, hit: Suspension) -> None:
    """Remember when ``msg`` should be retried because of ``hit`` (its end, if any)."""
    msg.deferred = True
    if hit.until and (not msg.retry_at or hit.until < msg.retry_at):
        msg.retry_at = hit.until


class ControlServer(JsonServer):
    """Serves :class:`Control` on a UNIX socket (mode 0600; see module docstring)."""

    def __init__(self, path: str, control: Control) -> None:
        super().__init__(path, "control", MAX_REQUEST)
        self.control = control

    async def reply(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
            req = json.loads(line)
            if not isinstance(req, dict):
                raise TypeError("not a JSON object")
            return await self.control.handle(req)
        except (ValueError, TypeError, TimeoutError, asyncio.LimitOverrunError) as exc:
            log.warning(f"bad control request: {str(exc)[:100]}")
            return {"error": "bad request"}
        except OSError:
            return {"error": "read error"}


def request(path: str, doc: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the qmgr at ``path`` and return its reply.

    Raises:
        OSError: no qmgr listens, or it timed out; ValueError: a reply that is not
        JSON; TypeError: JSON, but not an object.
    """
    return exchange(path, doc, MAX_REQUEST, "control", timeout)
