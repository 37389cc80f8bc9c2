"""job — one message's work for one transport (qmgr_job), the unit of preemption.

Summary
    The preemptive scheduler (nqmgr, postfix.md §4.5, §4.6) gives each message one Job
    per transport it has recipients for. A job owns one Peer per destination queue and
    the counters the scheduler works with:

    * ``read_entries`` / ``selected_entries``: entries created from recipients in memory
      and entries already handed to a delivery agent; the job *has entries* while the
      first exceeds the second. ``min_entries`` = read entries; ``max_entries`` = read
      entries + the message's unread recipients (an upper bound: each could become an
      entry);
    * ``slots_used`` / ``slots_available``: delivery slots counted for each selected
      entry; a job that accumulated ``slot_cost`` slots per entry of a smaller job can
      let that job go first (preemption, qmgrd.qmgr.joblist);
    * ``rcpt_count`` / ``rcpt_limit``: recipients in memory and the recipient slots
      the job holds from its transport's pool;
    * its place on the transport's two job lists (scheduler order, arrival order) and
      on the preemption stack (``stack_parent``, ``children``, ``stack_level``: -1 when
      not on the lists, 0 on the list, > 0 when it preempted another job);
    * ``blocker_tag``: equal to the job list's tag while every entry of the job waits
      for a full concurrency window.

    ``peer_select()`` is Postfix's qmgr_peer_select: round robin over the job's peers,
    taking the first whose queue has room in its window and that has entries.

Public API
    Job(message, joblist)
        .message, .joblist, .peers (Chain[Peer]), .peer_by_queue, .has_entries,
        .min_entries, .max_entries, counters and links above
        .peer_obtain(queue) -> Peer; .peer_free(peer); .peer_select() -> Peer | None
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmgrd.qmgr.chain import Chain, Link
from qmgrd.qmgr.peer import Peer

if TYPE_CHECKING:
    from qmgrd.qmgr.destqueue import DestQueue
    from qmgrd.qmgr.joblist import JobList
    from qmgrd.qmgr.message import Message

__all__ = ["Job"]


class Job:
    """A message's deliveries over one transport (see module docstring)."""

    __slots__ = ("blocker_tag", "children", "joblist", "message", "peer_by_queue", "peers",
                 "rcpt_count", "rcpt_limit", "read_entries", "sched_link", "selected_entries",
                 "sibling_link", "slots_available", "slots_used", "stack_level", "stack_parent",
                 "time_link")

    def __init__(self, message: Message, joblist: JobList) -> None:
        self.message = message
        self.joblist = joblist
        self.peers: Chain[Peer] = Chain()
        self.peer_by_queue: dict[DestQueue, Peer] = {}
        self.stack_parent: Job | None = None
        self.children: Chain[Job] = Chain()
        self.stack_level = -1
        self.blocker_tag = 0
        self.slots_used = 0
        self.slots_available = 0
        self.selected_entries = 0
        self.read_entries = 0
        self.rcpt_count = 0
        self.rcpt_limit = 0
        self.sched_link: Link[Job] = Link(self)
        self.time_link: Link[Job] = Link(self)
        self.sibling_link: Link[Job] = Link(self)

    def __repr__(self) -> str:
        return (f"Job({self.message.qid}, level={self.stack_level}, "
                f"entries={self.selected_entries}/{self.read_entries}, "
                f"slots={self.slots_available}, rcpt={self.rcpt_count}/{self.rcpt_limit})")

    @property
    def has_entries(self) -> bool:
        """True while some entry in memory has not been selected yet."""
        return self.selected_entries < self.read_entries

    @property
    def min_entries(self) -> int:
        """Entries the job certainly has (those read so far)."""
        return self.read_entries

    @property
    def max_entries(self) -> int:
        """Entries the job may have at most (read + every unread recipient)."""
        return self.read_entries + self.message.rcpt_unread

    def peer_obtain(self, queue: DestQueue) -> Peer:
        """Find or create this job's peer for ``queue`` (appended to the round robin)."""
        peer = self.peer_by_queue.get(queue)
        if peer is None:
            peer = Peer(self, queue)
            self.peer_by_queue[queue] = peer
            self.peers.append(peer.link)
        return peer

    def peer_free(self, peer: Peer) -> None:
        """Forget a peer whose entries are all done."""
        self.peers.remove(peer.link)
        del self.peer_by_queue[peer.queue]

    def peer_select(self) -> Peer | None:
        """Round robin: the first peer whose queue has room and that has entries."""
        link = self.peers.head
        while link is not None:
            peer = link.owner
            queue = peer.queue
            if peer.entries and queue.ready and len(queue.busy) < queue.window.window:
                self.peers.rotate(link)
                return peer
            link = link.next
        return None
