"""completion — finishing a message whose in-memory entries are all done (qmgr_active_done).

Summary
    When a message's last entry is done (postfix.md §4.9), in this order:

    1. ``bounce/<id>``: empty -> removed; otherwise the ``bounce`` service is asked for
       one non-delivery notice (BOUNCE_CMD_FLUSH); failure keeps the message deferred.
    2. A file no longer mode 0700 (an agent marked it corrupt), or one whose recipients
       could not be read -> ``corrupt/``.
    3. Unread recipients left -> the next batch is read and the message goes on (when
       every new recipient was settled at once, the steps start over).
    3a. ``trace/<id>`` (recipients delivered with NOTIFY=SUCCESS): empty -> removed;
       otherwise the ``trace`` service is asked for the success notice
       (BOUNCE_CMD_TRACE; it removes the log); failure keeps the message deferred, so
       the notice is asked for again at the next attempt.
    4. Some recipient deferred (or a notice of step 1 or 3a failed):
       * no expiry while a bounce or success notice of this attempt failed: the message
         is deferred, the notice asked for again at the next attempt (removing the
         file would lose it and orphan its log);
       * expired when forced (``status=force-expired``) or when ``now >= create_time +
         lifetime`` (``maximal_queue_lifetime``; ``bounce_queue_lifetime`` for the null
         sender, clamped to the former): ``<id>: from=<s>, status=expired, returned to
         sender`` and the ``defer`` service turns ``defer/<id>`` into a non-delivery
         notice (BOUNCE_CMD_FLUSH); on success the message is finished;
       * else when ``warn_time > 0`` and ``now >= warn_time - 1``: the ``defer`` service
         sends a delay warning (BOUNCE_CMD_WARN); on success the ``W`` record is
         rewritten to -1 so it is sent once.
    5. Still deferred: backoff ``delay = now - create_time`` clamped to
       [``minimal_backoff_time``, ``maximal_backoff_time``]; atime = mtime = now + delay;
       moved to ``deferred/`` (the deferred scan skips it until then).
    6. Otherwise the file and its defer and trace logs are removed: ``<id>: removed``.

    An operator's change (``msg.admin``, qmgrd.qmgr.admin: qmgr-ctl hold, delete,
    requeue of an active message) replaces steps 2-6: ``delete`` before step 1 (no
    notice), hold and requeue right after it. A deferred message's retry time is
    brought forward to ``msg.retry_at`` when that is earlier (a suspension's end).

Public API
    Completion(spool, client, clock, *, min_backoff, max_backoff, max_lifetime,
               bounce_lifetime, refill, release, to_corrupt)
        async run(msg) -> None      never raises for file-system trouble (logs warnings);
                                    calls ``release(msg)`` unless the message goes on.
        retry_unmoved() -> None     step 5's move once more for messages it failed for
                                    (``unmoved``: qid -> retry time); the scheduler calls
                                    it before each deferred scan.
    Completion.backoff(now, create_time, min_backoff, max_backoff) -> float  (static)

Logs the lines above and warnings for file-system failures.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from master import log
from qmgrd.delivery import BOUNCE_CMD_FLUSH, BOUNCE_CMD_TRACE, BOUNCE_CMD_WARN, StatusRequest
from qmgrd.qmgr.message import Message
from qmgrd.spool.message import QueueFile, QueueFileError
from qmgrd.spool.queue import Spool
from qmgrd.spool.statuslog import quote_822_local

__all__ = ["Completion"]


class StatusClient(Protocol):
    """The part of qmgrd.qmgr.client.AgentClient that completion uses."""

    async def status_request(self, service: str, request: StatusRequest) -> bool: ...


class Completion:
    """Finishes messages (see module docstring)."""

    def __init__(self, spool: Spool, client: StatusClient, clock: Callable[[], float], *,
                 min_backoff: int, max_backoff: int, max_lifetime: int, bounce_lifetime: int,
                 refill: Callable[[Message], None], release: Callable[[Message], None],
                 to_corrupt: Callable[[str], None]) -> None:
        self.spool = spool
        self.client = client
        self.clock = clock
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_lifetime = max_lifetime
        self.bounce_lifetime = min(bounce_lifetime, max_lifetime)
        self.refill = refill
        self.release = release
        self.to_corrupt = to_corrupt
        self.unmoved: dict[str, float] = {}  # qid -> next attempt: stuck in active/

    @staticmethod
    def backoff(now: float, create_time: float, min_backoff: int, max_backoff: int) -> float:
        """Seconds until the next attempt: the message age, clamped to [min, max]."""
        delay = now - create_time if create_time > 0 else min_backoff
        return float(min(max(delay, min_backoff), max_backoff))

    def _request(self, msg: Message, nrequest: int) -> StatusRequest:
        return StatusRequest(
            nrequest=nrequest, queue_name="active", queue_id=msg.qid, sender=msg.sender,
            encoding=msg.encoding, smtputf8=msg.smtputf8, envelope_id=msg.envid,
            ret_flags=msg.ret,
        )

    async def run(self, msg: Message) -> None:
        """Finish ``msg`` (its refcount is 0 and ``completing`` is set)."""
        goes_on = False
        try:
            goes_on = await self._run(msg)
        finally:
            msg.completing = False
            if not goes_on:
                self.release(msg)

    async def _run(self, msg: Message) -> bool:
        qid = msg.qid
        path = self.spool.path("active", qid)
        notice_kept = False  # the bounce or trace service failed: a notice is still owed
        while True:
            if msg.admin is not None and not msg.admin.flush_bounces:  # qmgr-ctl delete
                msg.admin.finish(msg)
                return False
            if not await self._flush_bounces(msg):
                notice_kept = True
            if msg.admin is not None:  # qmgr-ctl hold/requeue (qmgrd.qmgr.admin)
                msg.admin.finish(msg)
                return False
            try:
                st = os.lstat(path)  # a symbolic link is no queue file: not ready
            except OSError as exc:
                log.warning(f"{qid}: active queue file vanished: {exc}")
                return False
            if not Spool.is_ready(st) or msg.corrupt:
                log.warning(f"{qid}: queue file marked corrupt: moving to corrupt queue")
                self.to_corrupt(qid)
                return False
            if msg.rcpt_offset > 0:
                before = msg.rcpt_offset
                self.refill(msg)
                if msg.refcount > 0:
                    return True
                if msg.rcpt_offset == before:  # no progress: keep the rest for later
                    log.warning(f"{qid}: cannot read more recipients now; will retry")
                    msg.deferred = True
                    break
                continue
            break
        if not await self._flush_log(msg, "trace", BOUNCE_CMD_TRACE):
            notice_kept = True
        if msg.admin is not None:
            msg.admin.finish(msg)
            return False
        now = self.clock()
        if msg.deferred:
            lifetime = self.max_lifetime if msg.sender else self.bounce_lifetime
            expired = msg.forced_expire or now >= msg.create_time + lifetime
            if expired and notice_kept:
                # Not now: expiry ends with the file's removal, and the bounce (or
                # success) notice the service failed to send would be lost with it, its
                # log orphaned. Deferred, the notice is asked for again at the next
                # attempt, and the message expires then.
                pass
            elif expired:
                how = "force-expired" if msg.forced_expire else "expired"
                log.info(f"{qid}: from=<{quote_822_local(msg.sender)}>, status={how}, returned to sender")
                if await self.client.status_request(
                        "defer", self._request(msg, BOUNCE_CMD_FLUSH)):
                    msg.deferred = False
            elif msg.warn_time > 0 and now >= msg.warn_time - 1 and (
                    await self.client.status_request(
                        "defer", self._request(msg, BOUNCE_CMD_WARN))):
                self._warn_done(msg)
        if msg.deferred:
            msg.drop_stale_defer_log(self.spool)  # no attempt wrote one: none is left
            self._defer(msg, path)
        else:
            self._remove(qid)
        return False

    async def _flush_bounces(self, msg: Message) -> bool:
        return await self._flush_log(msg, "bounce", BOUNCE_CMD_FLUSH)

    async def _flush_log(self, msg: Message, name: str, nrequest: int) -> bool:
        """Ask service ``name`` to turn ``<name>/<id>`` into a notice (an empty log is
        removed); failure keeps the message deferred. False when the service failed."""
        path = self.spool.path(name, msg.qid)
        try:
            size = os.stat(path).st_size
        except OSError:
            return True
        if size == 0:
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning(f"{msg.qid}: cannot remove empty {name} log: {exc}")
        elif not await self.client.status_request(name, self._request(msg, nrequest)):
            msg.deferred = True
            return False
        return True

    def _warn_done(self, msg: Message) -> None:
        """Rewrite the W record to -1: the delay warning went out."""
        try:
            with QueueFile.open(self.spool, "active", msg.qid, lock=None) as qf:
                qf.set_warn_done()
            msg.warn_time = -1
        except (QueueFileError, OSError) as exc:
            log.warning(f"{msg.qid}: cannot update the warning time record: {exc}")

    def _defer(self, msg: Message, path: str) -> None:
        now = self.clock()
        when = now + self.backoff(now, msg.create_time, self.min_backoff, self.max_backoff)
        if msg.retry_at > 0:  # a suspension ends earlier (qmgrd.qmgr.suspend)
            when = min(when, max(now, msg.retry_at))
        try:
            os.utime(path, (when, when))
            self.spool.move(msg.qid, "active", "deferred")
        except OSError as exc:
            self.unmoved[msg.qid] = when
            log.warning(f"{msg.qid}: cannot move to deferred: {exc} (tried again at each "
                        "deferred queue scan)")

    def retry_unmoved(self) -> None:
        """Move the messages whose move to deferred/ failed (permissions, a full disk)
        once more: called before each deferred scan, so that a repaired queue picks them
        up instead of leaving them in active/ until the qmgr restarts (Postfix's qmgr
        exits on that failure and its successor moves active/ back to incoming/)."""
        for qid, when in list(self.unmoved.items()):
            try:
                os.utime(self.spool.path("active", qid), (when, when))
                self.spool.move(qid, "active", "deferred")
            except FileNotFoundError:
                del self.unmoved[qid]  # gone (an operator's delete, a restart's recovery)
            except OSError as exc:
                log.warning(f"{qid}: cannot move to deferred: {exc}")
            else:
                del self.unmoved[qid]
                log.info(f"{qid}: moved to deferred after an earlier failure")

    def _remove(self, qid: str) -> None:
        for queue in ("defer", "trace", "active"):
            try:
                os.unlink(self.spool.path(queue, qid))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning(f"{qid}: remove {queue} file: {exc}")
                return
        log.info(f"{qid}: removed")
