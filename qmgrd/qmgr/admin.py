"""admin — hold, release, delete and requeue queue files safely (Postfix's postsuper).

Summary
    Postfix's postsuper renames or removes queue files and leaves it to the qmgr to cope
    when a file in ``active/`` vanishes under it. qmgrd goes one better for the active
    queue: the qmgr, which owns ``active/``, does the change itself (qmgrd.qmgr.control
    passes it the request), so that no delivery agent is handed a removed file and the
    qmgr never loses count:

    * entries of the message still waiting for delivery are taken out of the scheduler
      (no attempt, no defer log), unread recipients are not read any more;
    * deliveries already in flight are left to finish;
    * when the last one has ended, the completion step (qmgrd.qmgr.completion) calls
      :meth:`AdminAction.finish` instead of deferring or removing the file: ``delete``
      removes the file and its bounce/defer/trace logs (no notice is sent); ``hold``
      moves it to ``hold/`` and ``requeue`` to ``incoming/`` with mtime now (the qmgr
      takes it in again at once and resolves every recipient anew, so a changed
      transport map applies). Bounced recipients of the last attempt get their
      non-delivery notice first (hold, requeue). A message whose recipients were all
      delivered meanwhile is removed as usual, and the moot change is logged
      (``<id>: hold not done: every recipient was delivered meanwhile``; delete:
      ``<id>: delete moot: every recipient was delivered meanwhile``).

    Files outside ``active/`` — and active files the qmgr does not hold in memory (no
    qmgr running; a file an old qmgr left) — are changed directly with the functions
    below, as postsuper does: ``rename(2)`` is atomic, so a file the qmgr moves at the
    same moment is either moved by us (the qmgr's rename then fails with ENOENT, which
    it ignores) or by the qmgr (ours fails and the caller looks in the next queue). An
    active file is only touched under an exclusive non-blocking lock: a delivery agent
    holding its shared lock means "still being delivered" (:data:`BUSY`).

    Queue moves (postfix.md §1.7): hold: incoming/active/deferred -> hold; release
    (``postsuper -H``): hold -> deferred, time stamps unchanged; requeue: -> incoming,
    atime = mtime = now, the stale defer log removed; delete: the file, then its logs.

Public API
    ACTIONS = ("hold", "release", "delete", "requeue")
    DONE, ABSENT, BUSY (result strings)
    apply_file(spool, queue, qid, action, now=None) -> str    DONE / ABSENT / BUSY;
        raises ValueError (bad queue, id or action), OSError (other than ENOENT)
    remove_logs(spool, qid) -> None
    AdminAction(action, spool, on_requeue)     the object a Message carries while an
        operator's change waits for its in-flight deliveries (``msg.admin``)
        .flush_bounces -> bool; .finish(msg) -> None (never raises; logs warnings)
        .outcome -> str   "" until finish: DONE, "delivered" (hold/requeue of a message
                          whose recipients were all delivered: removed as usual),
                          ABSENT (the file vanished), "error: <text>"
        .moot -> bool     True once finish found every recipient delivered (or bounced)
                          meanwhile: the change was moot (a delete's outcome stays DONE)

Logs (as postsuper does): ``<id>: removed``, ``<id>: placed on hold``, ``<id>: released
from hold``, ``<id>: requeued``; warnings for file-system failures.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from master import log
from qmgrd.spool.queue import LOG_QUEUES, Spool

if TYPE_CHECKING:
    from qmgrd.qmgr.message import Message

__all__ = ["ABSENT", "ACTIONS", "BUSY", "DONE", "AdminAction", "apply_file", "remove_logs"]

ACTIONS = ("hold", "release", "delete", "requeue")
DONE = "done"
ABSENT = "absent"
BUSY = "busy"
_TARGET = {"hold": "hold", "release": "deferred", "requeue": "incoming"}
_LOGGED = {"hold": "placed on hold", "release": "released from hold", "delete": "removed",
           "requeue": "requeued"}


def remove_logs(spool: Spool, qid: str) -> None:
    """Remove the bounce, defer and trace logs of ``qid`` (missing ones are fine)."""
    for queue in LOG_QUEUES:
        try:
            os.unlink(spool.path(queue, qid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning(f"{qid}: remove {queue} log: {exc}")


def _change(spool: Spool, queue: str, qid: str, action: str, now: float) -> None:
    """Do ``action`` on ``queue/qid`` (OSError, FileNotFoundError when it is gone)."""
    if action == "delete":
        os.unlink(spool.path(queue, qid))
        remove_logs(spool, qid)
    else:
        target = _TARGET[action]
        path = spool.move(qid, queue, target) if queue != target else spool.path(queue, qid)
        if action == "requeue":
            os.utime(path, (now, now), follow_symlinks=False)
            try:
                os.unlink(spool.path("defer", qid))
            except FileNotFoundError:
                pass
    log.info(f"{qid}: {_LOGGED[action]}")


def apply_file(spool: Spool, queue: str, qid: str, action: str,
               now: float | None = None) -> str:
    """Apply ``action`` to the file ``qid`` in ``queue`` directly (see module docstring).

    Returns:
        DONE, ABSENT (no such file in ``queue``) or BUSY (an active file locked by a
        delivery agent).

    Raises:
        ValueError: unknown action, queue or invalid id.
        OSError: the change failed for another reason than a missing file.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    path = spool.path(queue, qid)
    when = time.time() if now is None else now
    if queue != "active":
        return _changed(spool, queue, qid, action, when)
    try:  # never through a symbolic link, nor blocked by a FIFO (queue files are
        # regular files): a link is renamed or removed itself, no one delivers from it
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return ABSENT
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        return _changed(spool, queue, qid, action, when)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return BUSY
            raise
        return _changed(spool, queue, qid, action, when)
    finally:
        os.close(fd)


def _changed(spool: Spool, queue: str, qid: str, action: str, when: float) -> str:
    """_change, as apply_file's result: DONE, or ABSENT when the file is gone."""
    try:
        _change(spool, queue, qid, action, when)
    except FileNotFoundError:
        return ABSENT
    return DONE


class AdminAction:
    """An operator's change waiting for a message's in-flight deliveries to end.

    Args:
        action: "hold", "delete" or "requeue".
        spool: the queue directory (the qmgr's, relative to its chroot).
        on_requeue: called after a requeued file reached incoming/ (the qmgr starts an
            incoming scan).
    """

    def __init__(self, action: str, spool: Spool, on_requeue: Callable[[], None]) -> None:
        if action not in ("hold", "delete", "requeue"):
            raise ValueError(f"not an active-queue action: {action!r}")
        self.action = action
        self.spool = spool
        self.on_requeue = on_requeue
        self.outcome = ""
        self.moot = False

    @property
    def flush_bounces(self) -> bool:
        """True when recipients bounced in the last attempt still get their notice."""
        return self.action != "delete"

    def finish(self, msg: Message) -> None:
        """Do the change now that nothing of ``msg`` is in delivery (never raises).
        Done once: a second call (the qmgr stopped with ``msg`` in delivery, and its
        completion ran later) does nothing."""
        if self.outcome:
            return
        qid = msg.qid
        action = self.action
        try:
            if action != "delete" and not msg.deferred:
                # Every recipient was delivered meanwhile: the usual removal.
                for queue in ("defer", "trace", "active"):
                    try:
                        os.unlink(self.spool.path(queue, qid))
                    except FileNotFoundError:
                        pass
                log.info(f"{qid}: removed")
                log.info(f"{qid}: {action} not done: every recipient was delivered "
                         "(or bounced) meanwhile")
                self.moot = True
                self.outcome = "delivered"
                return
            if action == "delete" and not msg.deferred:
                self.moot = True
                log.info(f"{qid}: delete moot: every recipient was delivered "
                         "(or bounced) meanwhile")
            _change(self.spool, "active", qid, action, time.time())
        except FileNotFoundError:
            log.warning(f"{qid}: active queue file vanished before {action}")
            self.outcome = ABSENT
            return
        except OSError as exc:
            log.warning(f"{qid}: cannot {action} active queue file: {exc}")
            self.outcome = f"error: {exc}"
            return
        self.outcome = DONE
        if action == "requeue":
            self.on_requeue()
