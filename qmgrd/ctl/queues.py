"""queues — the queue names qmgr-ctl's commands know, in a module that imports nothing.

qmgr-ctl declares its click options (``--queue``, shape's QUEUE arguments, the help text of
hold/release/delete/requeue) when qmgrd.ctl.cli is imported; these names live here so that
the declarations do not load the modules doing the work (qmgrd.ctl.showq, qmgrd.ctl.shape,
qmgrd.ctl.admin), which import only when their command runs. Those modules re-export them.

Public API
    QUEUE_ORDER = ("maildrop", "active", "incoming", "deferred", "hold")
        the queues ``list`` (postqueue -p / showq) reads, in showq's order
    QUEUE_NAMES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
        the queues ``shape`` (qshape) accepts
    QUEUES_FOR: dict[str, tuple[str, ...]]
        action (delete, hold, release, requeue) -> the queues searched, postsuper's
        defaults

Logs and raises nothing.
"""

from __future__ import annotations

__all__ = ["QUEUES_FOR", "QUEUE_NAMES", "QUEUE_ORDER"]

QUEUE_ORDER = ("maildrop", "active", "incoming", "deferred", "hold")
QUEUE_NAMES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
QUEUES_FOR = {
    "delete": ("hold", "incoming", "active", "deferred"),
    "hold": ("incoming", "active", "deferred"),
    "release": ("hold",),
    "requeue": ("hold", "incoming", "active", "deferred"),
}
