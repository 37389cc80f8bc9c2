"""peer — one job's share of one destination queue (qmgr_peer).

Summary
    The preemptive scheduler (postfix.md §4.5, §4.6) keeps, per job (message and
    transport), one Peer per destination queue the job has recipients for. The peer
    holds the job's not yet selected entries for that queue in FIFO order; a job picks
    its next entry by round robin over its peers whose queue has room in its
    concurrency window. ``refcount`` counts all of the peer's entries, selected or not;
    at zero the peer is freed.

Public API
    Peer(job, queue)    .entries (Chain[Entry], todo only), .refcount, .link (on Job.peers)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmgrd.qmgr.chain import Chain, Link

if TYPE_CHECKING:
    from qmgrd.qmgr.destqueue import DestQueue
    from qmgrd.qmgr.entry import Entry
    from qmgrd.qmgr.job import Job

__all__ = ["Peer"]


class Peer:
    """A job's entries for one destination queue."""

    __slots__ = ("entries", "job", "link", "queue", "refcount")

    def __init__(self, job: Job, queue: DestQueue) -> None:
        self.job = job
        self.queue = queue
        self.entries: Chain[Entry] = Chain()
        self.refcount = 0
        self.link: Link[Peer] = Link(self)

    def __repr__(self) -> str:
        return f"Peer({self.job.message.qid}, {self.queue.name}, {len(self.entries)} todo)"
