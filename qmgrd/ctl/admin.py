"""admin — the queue-changing half of qmgr-ctl: hold, release, delete, requeue, flush by
id or site, suspend and resume (Postfix's postsuper -h/-H/-d/-r, postqueue -i/-s).

Summary
    Who: only root and the queue's owner (mail_owner) may change the queue. As root the
    work is done with the *effective* ids of the owner of ``active/`` (postsuper also
    runs as mail_owner), so that every directory and file made belongs to it; anyone
    else gets :class:`NotPrivileged`.

    Which messages: queue ids (validated with qmgrd.spool.queueid.valid_id before any
    path is built: ``../../etc/passwd``, NUL or newline never get near the file system),
    ``-`` for ids on standard input (whitespace separated; mailq's ``*``/``!``/``#``
    markers are stripped), ``ALL``, or the selectors of ``list`` (qmgrd.ctl.select).
    An id is looked for in the action's queues in Postfix's order.

    How (qmgrd.qmgr.admin): files outside ``active/`` are renamed or removed directly;
    messages in ``active/`` are handed to the running qmgr over ``private/qmgr-control``
    (qmgrd.qmgr.control), which takes them out of scheduling, lets deliveries in flight
    finish and then makes the change — so no agent reads a removed file and the qmgr
    keeps its counts. The request waits up to ``wait`` seconds for in-flight deliveries;
    later ones are reported ``pending`` ("in delivery; will be held when the delivery in
    progress ends"), not as done: the qmgr does the change after that delivery, and logs
    it, or logs that it was moot when every recipient was delivered meanwhile. A change
    the qmgr reports as moot within the wait (``"verdict": true`` in the request: a
    delete too) is not counted as done: ``<id>: not removed: delivered meanwhile``
    (``not placed on hold``, ``not requeued``). With no qmgr answering, active files are
    changed directly under an exclusive lock (an agent's lock: "still being delivered").
    When the qmgr took the request but stopped before it answered
    (qmgrd.qmgr.jsonsock.ReplyLost: it closed the connection, i.e. it died), what it
    did is read from the queue directory: a file still in ``active/`` is changed
    directly as above; one now on hold (hold) is counted as done (the qmgr held it);
    one gone from every queue is :data:`UNKNOWN` (the qmgr removed it, or it was
    delivered meanwhile: only the maillog tells); ``Admin.lost_reason`` then says why
    the answer was lost.

    Time: the whole run talks to the qmgr for at most ``wait`` + ANSWER_GRACE (2 s)
    seconds - requeue's table check and restart wait included - and the qmgr is asked
    to wait for deliveries in flight for what is left of ``wait``.  A qmgr that is
    alive but does not answer in that time (stopped with SIGSTOP, hung, overloaded:
    jsonsock.ReplyTimedOut) still has the request and makes the change when it runs
    again, so its active files are NOT changed here (that would move a file the qmgr
    holds in memory: a delivery of it would find no file - "queue file read error" -
    and a requeued copy could be taken in while the old one is still scheduled);
    each such message still in ``active/`` is :data:`UNKNOWN` ("outcome unknown: the
    qmgr did not answer within <n>s; it has the request ..."); one that left
    ``active/`` meanwhile is handled as after a lost answer.  A qmgr that did not even
    take the request in time (its listen queue full; or no time was left, e.g. after
    requeue's table check timed out) was asked nothing: its active messages are
    :data:`~qmgrd.qmgr.admin.BUSY` ("not placed on hold: the qmgr did not answer
    (...); nothing was changed; try again").  ``Admin.timed_out`` is True then, and
    ``lost_reason`` says what timed out.
    A message that moves between queues while we work is looked for again (3 rounds).

    ``requeue`` first makes sure the qmgr routes with the current transport maps: when
    a map has changed the qmgr restarts, and the requeue waits (up to 30 s) for the new
    one. Requeued files go to ``incoming/`` with mtime now; the qmgr resolves every
    recipient again when it takes them in. ``release`` sends ``D`` and ``requeue`` ``I``
    to the qmgr afterwards, so the change shows at once.

    ``flush --id`` moves deferred files to ``incoming/`` with mtime now and the g+r
    "unthrottle" bit (postqueue -i); ``flush --site`` moves a site's deferred mail
    after an ``F`` (forget dead destinations) in batches of ``batch`` files with
    ``pace`` seconds between batches and an ``I`` after each, so a big backlog does not
    reach one destination all at once.

    ``suspend KEY`` / ``resume KEY`` edit ``private/qmgr-suspend`` (qmgrd.qmgr.suspend)
    and tell the qmgr; ``resume`` then flushes the mail deferred by that suspension.

Public API
    NotPrivileged(Exception); BadIds(ValueError)           (from qmgrd.ctl.guard)
    QUEUES_FOR: dict action -> queues searched (postsuper's defaults; qmgrd.ctl.queues)
    privileged(spool, what) -> ContextManager[None]        NotPrivileged (guard)
    parse_ids(args, stdin) -> list[str]                    BadIds, nothing done (guard)
    Report(qid, queue, result, text)                       one line of output ("" = none)
    NOOP                                                   result: nothing to do, silent
    UNKNOWN                                                result: outcome unknown (above)
    ANSWER_GRACE = 2.0   seconds beyond ``wait`` for the qmgr's answer
    Admin(spool, action, *, dry_run=False, wait=10.0)   wait: seconds (see Time above)
        .run(targets: list[tuple[str, str | None]]) -> list[Report]
        .lost_reason -> str     "" or why the qmgr's answer was lost (e.g. "control:
                                connection closed before the reply", "control reply
                                timed out after 12s")
        .timed_out -> bool      the qmgr was alive but did not answer in time
        .tables_unconfirmed -> str  requeue: "" or why its table check (sync_tables)
                                got no answer: not known whether the qmgr uses the
                                current transport maps
        .left_to_qmgr -> int    active messages left to (or not asked of) a qmgr that
                                did not answer in time
    sync_tables(path, deadline) -> str    requeue's table check: "" or why the qmgr
                                          did not answer (deadline: time.monotonic())
    select_targets(spool, action, ids | None, everything, selector) -> list[(qid, queue|None)]
    flush_ids(spool, ids) -> list[Report]; flush_site(spool, key, batch, pace,
        match=None) -> int
    suspend(spool, key, until, reason, now) -> str; resume(spool, key, batch, pace) -> str

Logs (maillog, when the caller set it up) postsuper's lines for files changed here.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from qmgrd.ctl.guard import BadIds, NotPrivileged, parse_ids, privileged
from qmgrd.ctl.queues import QUEUES_FOR
from qmgrd.ctl.select import Selector, domain_matches, recipient_domain
from qmgrd.ctl.showq import QueueEntry, scan
from qmgrd.qmgr import control
from qmgrd.qmgr.admin import ABSENT, BUSY, DONE, apply_file
from qmgrd.qmgr.jsonsock import ReplyLost, ReplyTimedOut
from qmgrd.qmgr.suspend import Suspension, suspend_path, update
from qmgrd.spool.queue import Spool
from qmgrd.trigger import (
    QMGR_REQ_FLUSH_DEAD,
    QMGR_REQ_SCAN_DEFERRED,
    QMGR_REQ_SCAN_INCOMING,
    send_trigger,
)

__all__ = ["NOOP", "QUEUES_FOR", "UNKNOWN", "Admin", "BadIds", "NotPrivileged", "Report", "flush_ids",
           "flush_site", "parse_ids", "privileged", "resume", "select_targets", "suspend"]

DONE_TEXT = {"delete": "removed", "hold": "placed on hold", "release": "released from hold",
             "requeue": "requeued"}
PENDING_TEXT = {"delete": "deleted", "hold": "held", "requeue": "requeued",
                "release": "released"}
SUMMARY = {"delete": "Deleted", "hold": "Placed on hold", "release": "Released from hold",
           "requeue": "Requeued"}
NOOP = "noop"
UNKNOWN = "unknown"
_ROUNDS = 3
_BATCH = 5000
ANSWER_GRACE = 2.0  # s: beyond --wait, for the qmgr's answer to come back
_SILENT = "silent"  # asked, no answer in time, still in active/: the qmgr's to change
_UNASKED = "unasked"  # not asked (the qmgr took no request in time), still in active/


@dataclass
class Report:
    """The outcome for one message: result is DONE, ABSENT, BUSY, "pending",
    "delivered" (moot: every recipient was delivered meanwhile; not done), "would" (dry
    run), NOOP (hold of a message already on hold: nothing
    shown, as postsuper), UNKNOWN (asked of a qmgr that stopped before it answered,
    and gone from the queue since: removed by it, or delivered) or "error"."""

    qid: str
    queue: str
    result: str
    text: str


def select_targets(spool: Spool, action: str, ids: list[str] | None, everything: bool,
                   selector: Selector) -> list[tuple[str, str | None]]:
    """The messages to work on: ids (queue unknown yet), or ALL / the selector's matches
    among the action's queues (with the queue they were found in). ``ids`` None: not
    restricted by ids (ALL, or selectors alone); a list - even an empty one, as ``-``
    with nothing on standard input gives - restricts to those ids (postsuper: no id
    read, nothing done; never "every message")."""
    queues = QUEUES_FOR[action]
    if ids is not None and not ids:
        return []
    if ids and not selector.active:
        return [(qid, None) for qid in ids]
    wanted = set(ids or ())
    scan_queues = [q for q in queues if not selector.queues or q in selector.queues]
    if action == "delete" and "maildrop" in selector.queues:
        scan_queues.append("maildrop")
    out: list[tuple[str, str | None]] = []
    for entry in scan(spool, queues=scan_queues):
        if (ids is None or entry.queue_id in wanted) and selector.match(entry):
            out.append((entry.queue_id, entry.queue_name))
    return out


class Admin:
    """One hold/release/delete/requeue run (see module docstring)."""

    def __init__(self, spool: Spool, action: str, *, dry_run: bool = False,
                 wait: float = 10.0, queues: tuple[str, ...] | None = None) -> None:
        self.spool = spool
        self.action = action
        self.dry_run = dry_run
        self.wait = wait
        self.queues = queues or QUEUES_FOR[action]
        self.control_path = os.path.join(spool.queue_path("private"),
                                         control.CONTROL_SOCKET)
        self.lost_reason = ""
        self.timed_out = False
        self.tables_unconfirmed = ""  # requeue: why the table check got no answer
        self.left_to_qmgr = 0  # active messages left to a silent qmgr (or not asked)

    def _exists(self, queue: str, qid: str) -> bool:
        return os.path.lexists(self.spool.path(queue, qid))

    def locate(self, qid: str, first: str | None = None) -> str | None:
        """The queue (of this action's) that holds ``qid`` now, ``first`` tried first."""
        order = ([first] if first else []) + [q for q in self.queues if q != first]
        for queue in order:
            if self._exists(queue, qid):
                return queue
        return None

    def run(self, targets: list[tuple[str, str | None]]) -> list[Report]:
        """Do the action on every target; one Report each, in order."""
        if self.dry_run:
            return [self._dry(qid, hint) for qid, hint in targets]
        deadline = time.monotonic() + self.wait + ANSWER_GRACE
        silent = ""
        if self.action == "requeue":
            silent = sync_tables(self.control_path, deadline)
            if silent:
                self.timed_out = True
                self.lost_reason = silent
                self.tables_unconfirmed = silent
        reports: dict[str, Report] = {}
        active: list[str] = []
        for qid, hint in targets:
            rep = self._direct(qid, hint)
            if rep is None:
                active.append(qid)
            else:
                reports[qid] = rep
        for qid, rep in self._active(active, deadline, bool(silent)).items():
            reports[qid] = rep
        return [reports[qid] for qid, _ in targets if qid in reports]

    def _dry(self, qid: str, hint: str | None) -> Report:
        queue = self.locate(qid, hint)
        if queue is None:
            return self._absent(qid)
        return Report(qid, queue, "would",
                      f"{qid}: would be {DONE_TEXT[self.action]} (queue {queue})")

    def _absent_text(self, qid: str) -> str:
        return f"{qid}: no such message in {', '.join(self.queues)}"

    def _absent(self, qid: str) -> Report:
        """Not in this action's queues: ABSENT, or (hold of a message already on hold)
        NOOP — postsuper -h is silent about it."""
        if self.action == "hold" and self._exists("hold", qid):
            return Report(qid, "hold", NOOP, "")
        return Report(qid, "", ABSENT, self._absent_text(qid))

    def _direct(self, qid: str, hint: str | None) -> Report | None:
        """Change a file outside active/; None when it is in active/ (the qmgr's)."""
        for _ in range(_ROUNDS):
            queue = self.locate(qid, hint)
            if queue is None:
                return self._absent(qid)
            if queue == "active":
                return None
            try:
                result = apply_file(self.spool, queue, qid, self.action)
            except OSError as exc:
                return Report(qid, queue, "error", f"{qid}: {self.action}: {exc}")
            if result == DONE:
                return Report(qid, queue, DONE, f"{qid}: {DONE_TEXT[self.action]}")
            hint = None  # moved meanwhile: look again
        return Report(qid, "", ABSENT, self._absent_text(qid))

    def _active(self, ids: list[str], deadline: float, silent: bool) -> dict[str, Report]:
        """Have the qmgr change ``ids`` (files in active/), answering by ``deadline``
        (time.monotonic()); ``silent``: it did not answer before, do not ask."""
        out: dict[str, Report] = {}
        if not ids:
            return out
        results: dict[str, str] = {}
        lost: set[str] = set()  # asked, but the qmgr's answer never came
        for start in range(0, len(ids), _BATCH):
            batch = ids[start:start + _BATCH]
            if silent:  # the qmgr is alive but does not answer: ask nothing more
                results.update(self._left_to_qmgr(batch, _UNASKED))
                continue
            left = deadline - time.monotonic()
            try:
                reply = control.request(self.control_path, {
                    "cmd": "act", "action": self.action, "ids": batch,
                    "wait": round(max(0.0, left - ANSWER_GRACE), 3), "verdict": True},
                    timeout=left)
                got = reply.get("results")
                if not isinstance(got, dict):
                    raise TypeError(str(reply.get("error", "bad reply"))[:200])
                results.update({k: str(v) for k, v in got.items() if k in batch})
                continue
            except ReplyTimedOut as exc:
                # alive but silent: it has the request and acts when it runs again, so
                # the files it holds are not ours to change
                self._silent(str(exc))
                silent = True
                lost.update(batch)
                results.update(self._left_to_qmgr(batch, _SILENT))
                continue
            except TimeoutError as exc:  # it took no request in time: nothing asked
                self._silent(str(exc))
                silent = True
                results.update(self._left_to_qmgr(batch, _UNASKED))
                continue
            except ReplyLost as exc:
                # the qmgr had the request and went away (closed the connection) before
                # it answered: it may have changed some of them; where each file is now
                # tells
                if not self.lost_reason:
                    self.lost_reason = str(exc)
                lost.update(batch)
            except (OSError, ValueError, TypeError):
                pass
            # no qmgr (or it went away): the files are ours to change, under a lock
            for qid in batch:
                try:
                    results[qid] = apply_file(self.spool, "active", qid, self.action)
                except OSError as exc:
                    results[qid] = f"error: {exc}"
        for qid in ids:
            result = results.get(qid, ABSENT)
            if result in (_SILENT, _UNASKED):
                self.left_to_qmgr += 1
            if result == DONE:
                out[qid] = Report(qid, "active", DONE, f"{qid}: {DONE_TEXT[self.action]}")
            elif result == "pending":
                out[qid] = Report(qid, "active", "pending",
                                  f"{qid}: in delivery; will be {PENDING_TEXT[self.action]}"
                                  " when the delivery in progress ends (recipients "
                                  "delivered meanwhile stay delivered)")
            elif result == "delivered":
                out[qid] = Report(qid, "active", "delivered",
                                  f"{qid}: not {DONE_TEXT[self.action]}: delivered "
                                  "meanwhile")
            elif result == BUSY:
                out[qid] = Report(qid, "active", BUSY,
                                  f"{qid}: still being delivered; try again later")
            elif result == _SILENT:
                out[qid] = Report(qid, "active", UNKNOWN,
                                  f"{qid}: outcome unknown: the qmgr did not answer "
                                  f"({self.lost_reason}); it has the request and makes "
                                  "the change when it runs again (see the maillog)")
            elif result == _UNASKED:
                out[qid] = Report(qid, "active", BUSY,
                                  f"{qid}: not {DONE_TEXT[self.action]}: the qmgr did not "
                                  f"answer ({self.lost_reason}); nothing was changed; try "
                                  "again")
            elif result == ABSENT:
                rep = self._direct(qid, None)  # it left the active queue meanwhile
                if qid in lost and rep is not None:
                    rep = self._after_lost(rep)
                out[qid] = rep if rep is not None else Report(
                    qid, "active", BUSY, f"{qid}: in the active queue; try again later")
            else:
                out[qid] = Report(qid, "active", "error", f"{qid}: {self.action}: {result}")
        return out

    def _silent(self, reason: str) -> None:
        """Note that the qmgr is alive but did not answer in time (``reason``)."""
        self.timed_out = True
        if not self.lost_reason:
            self.lost_reason = reason

    def _left_to_qmgr(self, batch: list[str], result: str) -> dict[str, str]:
        """``result`` for each id still in active/ (the silent qmgr's to change);
        ABSENT for one that left it meanwhile (looked for elsewhere, as usual)."""
        return {qid: result if self._exists("active", qid) else ABSENT for qid in batch}

    def _after_lost(self, rep: Report) -> Report:
        """A message asked of a qmgr that never answered, no longer in active/: on
        hold now (hold: the qmgr did it, DONE), or gone from every queue (UNKNOWN:
        removed by the qmgr, or delivered meanwhile - only its maillog says which)."""
        qid = rep.qid
        if rep.result == NOOP:
            return Report(qid, "hold", DONE, f"{qid}: {DONE_TEXT[self.action]}")
        if rep.result == ABSENT:
            how = ("did not answer in time" if self.timed_out
                   else "stopped before it answered")
            return Report(qid, "", UNKNOWN,
                          f"{qid}: outcome unknown: the qmgr {how} and the message has "
                          "left the queue (removed, or delivered meanwhile; see the "
                          "maillog)")
        return rep


def sync_tables(path: str, deadline: float) -> str:
    """Make sure the running qmgr (if any) routes with the current transport maps: ask
    it to restart when a map changed, and wait for its successor, all by ``deadline``
    (time.monotonic()).  Returns "" - also when no qmgr runs, or the successor is not
    up by then - or, when the qmgr is alive but did not answer in time, why
    (``control reply timed out after <n>s``): the caller asks it nothing more."""
    try:
        reply = control.request(path, {"cmd": "tables"},
                                timeout=deadline - time.monotonic())
    except (ReplyTimedOut, TimeoutError) as exc:
        return str(exc)
    except (OSError, ValueError, TypeError):
        return ""
    if not reply.get("restarting"):
        return ""
    old = reply.get("pid")
    while (left := deadline - time.monotonic()) > 0:
        try:
            if control.request(path, {"cmd": "ping"}, timeout=min(5.0, left)).get(
                    "pid") != old:
                return ""
        except (OSError, ValueError, TypeError):
            pass
        time.sleep(0.1)
    return ""


def trigger(spool: Spool, data: bytes) -> bool:
    """Send ``data`` to public/qmgr (a hint: False when nobody listens)."""
    return send_trigger(os.path.join(spool.queue_path("public"), "qmgr"), data)


def _flush_one(spool: Spool, qid: str, unthrottle: bool, now: float) -> str:
    """deferred -> incoming, mtime now (g+r for a single-message flush): DONE/ABSENT."""
    try:
        path = spool.move(qid, "deferred", "incoming")
    except FileNotFoundError:
        return ABSENT
    os.utime(path, (now, now))
    if unthrottle:
        st = os.stat(path)
        os.chmod(path, (st.st_mode & 0o7777) | 0o040)
    return DONE


def flush_ids(spool: Spool, ids: list[str]) -> list[Report]:
    """``postqueue -i`` for each id (see module docstring); triggers ``I`` after."""
    out: list[Report] = []
    now = time.time()
    for qid in ids:
        try:
            if _flush_one(spool, qid, True, now) == DONE:
                out.append(Report(qid, "deferred", DONE, f"{qid}: flushed"))
                continue
        except OSError as exc:
            out.append(Report(qid, "deferred", "error", f"{qid}: flush: {exc}"))
            continue
        if any(os.path.lexists(spool.path(q, qid)) for q in ("incoming", "active")):
            out.append(Report(qid, "active", DONE, f"{qid}: already on its way"))
        elif os.path.lexists(spool.path("hold", qid)):
            # not "error" (75, try again): retrying cannot help until it is released;
            # 66 as for any message not in deferred (postqueue -i: silent, exit 0)
            out.append(Report(qid, "hold", ABSENT, f"{qid}: on hold; release it first"))
        else:
            out.append(Report(qid, "", ABSENT, f"{qid}: no such message in deferred"))
    trigger(spool, QMGR_REQ_SCAN_INCOMING)
    return out


def flush_site(spool: Spool, key: str, batch: int, pace: float,
               match: Callable[[QueueEntry], bool] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> int:
    """``postqueue -s``, paced: returns how many deferred messages were moved.

    ``match`` replaces the default test (an undone recipient in domain ``key``)."""
    test = match or (lambda e: any(domain_matches(recipient_domain(r), key)
                                   for r in e.raw_recipients))
    ids = [e.queue_id for e in scan(spool, queues=("deferred",)) if test(e)]
    trigger(spool, QMGR_REQ_FLUSH_DEAD)
    moved = 0
    for start in range(0, len(ids), max(batch, 1)):
        if start and pace > 0:
            sleep(pace)
        now = time.time()
        for qid in ids[start:start + max(batch, 1)]:
            if _flush_one(spool, qid, False, now) == DONE:
                moved += 1
        trigger(spool, QMGR_REQ_SCAN_INCOMING)
    return moved


def _notify_suspend(spool: Spool) -> bool:
    path = os.path.join(spool.queue_path("private"), control.CONTROL_SOCKET)
    try:
        return "suspended" in control.request(path, {"cmd": "suspend"}, timeout=10)
    except (OSError, ValueError, TypeError):
        return False


def _damaged(text: str) -> None:
    """A damaged suspension file: one warning on stderr (it is replaced)."""
    sys.stderr.write(f"qmgr-ctl: warning: {text}\n")


def suspend(spool: Spool, key: str, until: float, reason: str, now: float) -> str:
    """Add (or replace) the suspension of ``key``; tell the qmgr. Returns a status line.

    Raises:
        OSError, ValueError: the suspension file cannot be updated.
    """
    new = Suspension(key, until, reason, now)
    update(suspend_path(spool.queue_directory),
           lambda items: [s for s in items if s.domain != key] + [new], now, _damaged)
    told = _notify_suspend(spool)
    return new.text + ("" if told else " (the qmgr is not running; it reads this at start)")


def resume(spool: Spool, key: str, batch: int, pace: float) -> str:
    """Lift the suspension of ``key``, tell the qmgr, flush the mail it deferred.

    Raises:
        OSError, ValueError: the suspension file cannot be updated.
    """
    now = time.time()
    found: list[Suspension] = []

    def drop(items: list[Suspension]) -> list[Suspension]:
        found.extend(s for s in items if s.domain == key)
        return [s for s in items if s.domain != key]

    update(suspend_path(spool.queue_directory), drop, now, _damaged)
    _notify_suspend(spool)
    phrase = f"delivery to {key} suspended"
    moved = flush_site(spool, key, batch, pace,
                       match=lambda e: any(phrase in r.reason for r in e.recipients))
    state = "resumed" if found else "was not suspended"
    return f"delivery to {key} {state}; {moved} deferred message(s) flushed"


def release_trigger(spool: Spool, action: str) -> None:
    """After release/requeue: wake the qmgr (D / I); nothing for the others."""
    if action == "release":
        trigger(spool, QMGR_REQ_SCAN_DEFERRED)
    elif action == "requeue":
        trigger(spool, QMGR_REQ_SCAN_INCOMING)
