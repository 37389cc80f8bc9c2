"""joblist — one transport's preemptive job scheduler (nqmgr's qmgr_job.c, qmgr_entry.c).

Summary
    Each transport keeps its jobs (one per message with recipients for it) on two
    lists: the **scheduler list**, in the order entries are taken, and the **time list**,
    in the order the messages entered the active queue (postfix.md §4.5, §4.6).

    Entry selection (``select_entry``, qmgr_job_entry_select): start at the current job;
    first try preemption (below); then walk the scheduler list: skip jobs tagged as
    *blockers*; ask each job for a peer by round robin over its destinations
    (``Job.peer_select``), reading more recipients from the queue file when the message
    has room (``<transport>_recipient_refill_limit`` free slots, or any free slot and
    ``<transport>_recipient_refill_delay`` since the last read, or nothing selectable
    left). A job with entries whose queues are all at their concurrency window becomes a
    blocker (as do those queues); a job with nothing left is *retired* from the lists
    (it comes back when more of its recipients are read). Selecting an entry counts one
    delivery slot for the job; the job becomes the current job.

    Preemption (qmgr_job_preempt): only when ``slot_cost >= 2``, the current job has
    available slots and could ever have ``minimum_delivery_slots * slot_cost``
    entries. The candidate is a later job, not a blocker and not a preemption parent,
    whose remaining entries fit into the slots the current job can still accumulate,
    with the best (seconds since queued + 1) / (max entries) score (cached per current
    job and second). It preempts when ``slots_available // slot_cost + slot_loan >=
    needed * (100 - slot_discount) / 100``: it is moved in front of the current job on
    the scheduler list and on top of its preemption stack, the parent pays
    ``needed * slot_cost`` slots, and (when the candidate still has unread recipients)
    it gets half the transport's extra recipient slots (``<transport>_extra_recipient_
    limit``). When the preempting job leaves the stack the parent's balance is
    corrected to the slots really used.

    Recipient memory (qmgr_job_move_limits): the transport's pool of
    ``<transport>_recipient_limit`` recipient slots goes to newly linked jobs; a job or
    message that no longer needs its slots passes them back to the pool and on to the
    oldest job whose message still has unread recipients.

    ``entry_done`` undoes an entry's counts (qmgr_entry_done): recipient counts, slot
    donations back to sponsors, blocker release when its queue gets room again, peer
    freeing.

Public API
    JobList(name, *, recipient_limit, extra_recipient_limit, refill_limit, refill_delay,
            slot_cost, slot_loan, slot_discount, minimum_slots)
        .sched, .bytime (Chain[Job]), .current, .next_unread, .rcpt_unused, .blocker_tag
        .obtain(message) -> Job             job ready to receive recipients
        .new_entry(peer) -> Entry           an empty todo entry for the peer's queue
        .select_entry(now, refill) -> Entry | None   refill: Callable[[Message], None]
        .entry_done(entry, busy: bool)      the entry's delivery ended / it was purged
        .queue_unblocked(queue)             re-examine blockers after a queue got room
        .move_limits(job), .retire(job), .free(job)

Raises
    master.log.Panic when a job still holds recipient slots when it is freed.
"""

from __future__ import annotations

from collections.abc import Callable

from master import log
from qmgrd.qmgr.chain import Chain, Link
from qmgrd.qmgr.destqueue import DestQueue
from qmgrd.qmgr.entry import Entry
from qmgrd.qmgr.job import Job
from qmgrd.qmgr.message import Message
from qmgrd.qmgr.peer import Peer

__all__ = ["JobList", "Refill"]

Refill = Callable[[Message], None]


def _tdiv(a: int, b: int) -> int:
    """Integer division truncating toward zero (as C does)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _owner(link: Link[Job] | None) -> Job | None:
    return link.owner if link is not None else None


class JobList:
    """The job lists and recipient pool of one transport (see module docstring)."""

    def __init__(self, name: str, *, recipient_limit: int, extra_recipient_limit: int,
                 refill_limit: int, refill_delay: float, slot_cost: int, slot_loan: int,
                 slot_discount: int, minimum_slots: int) -> None:
        self.name = name
        self.sched: Chain[Job] = Chain()
        self.bytime: Chain[Job] = Chain()
        self.current: Job | None = None
        self.next_unread: Job | None = None
        self.candidate_cache: Job | None = None
        self.candidate_cache_current: Job | None = None
        self.candidate_cache_time = -1
        self.blocker_tag = 1
        self.rcpt_unused = recipient_limit
        self.rcpt_per_stack = extra_recipient_limit
        self.refill_limit = refill_limit
        self.refill_delay = refill_delay
        self.slot_cost = slot_cost
        self.slot_loan = slot_loan
        self.slot_loan_factor = 100 - slot_discount
        self.min_slots = minimum_slots

    # ------------------------------------------------------------ list membership
    def _reset_cache(self) -> None:
        self.candidate_cache_current = None

    def obtain(self, message: Message) -> Job:
        """Find or create ``message``'s job, (re)link it, make it selectable again."""
        job = message.jobs.get(self.name)
        if job is None:
            job = Job(message, self)
            message.jobs[self.name] = job
        if job.stack_level < 0:
            self._link(job)
        self._reset_cache()
        if job.blocker_tag == self.blocker_tag:
            job.blocker_tag = 0
            self.current = _owner(self.sched.head)
        return job

    def _link(self, job: Job) -> None:
        """Put ``job`` on both lists by queue time; give it the pool's free slots."""
        msg = job.message
        current = self.current
        prev = self.sched.tail
        while prev is not None:
            other = prev.owner
            if other.stack_parent is None and msg.queued_time >= other.message.queued_time:
                break
            if current is other:
                current = None
            prev = prev.prev
        self.sched.insert_before(job.sched_link, prev.next if prev is not None
                                 else self.sched.head)
        unread = self.next_unread
        tprev = self.bytime.tail
        while tprev is not None:
            other = tprev.owner
            if msg.queued_time >= other.message.queued_time:
                break
            if unread is other:
                unread = None
            tprev = tprev.prev
        self.bytime.insert_before(job.time_link, tprev.next if tprev is not None
                                  else self.bytime.head)
        job.stack_level = 0
        if current is None:
            self.current = job
        if unread is None:
            old = self.next_unread
            self.next_unread = job
            if old is not None:
                self.move_limits(old)
        if self.rcpt_unused > 0:
            job.rcpt_limit += self.rcpt_unused
            msg.rcpt_limit += self.rcpt_unused
            self.rcpt_unused = 0

    def move_limits(self, job: Job) -> None:
        """Return ``job``'s unused recipient slots; hand the pool to the next unread job."""
        msg = job.message
        nxt = self.next_unread
        if job is nxt:
            link = job.time_link.next
            while link is not None and link.owner.message.rcpt_offset == 0:
                link = link.next
            nxt = _owner(link)
            self.next_unread = nxt
        unused = min(job.rcpt_limit - job.rcpt_count, msg.rcpt_limit - msg.rcpt_count)
        if unused > 0:
            job.rcpt_limit -= unused
            msg.rcpt_limit -= unused
            self.rcpt_unused += unused
            if nxt is not None and self.rcpt_unused > 0:
                nxt.rcpt_limit += self.rcpt_unused
                nxt.message.rcpt_limit += self.rcpt_unused
                self.rcpt_unused = 0

    @staticmethod
    def _parent_gone(job: Job, parent: Job | None) -> None:
        while job.children:
            head = job.children.head
            assert head is not None
            child = head.owner
            job.children.remove(child.sibling_link)
            if parent is not None:
                parent.children.append(child.sibling_link)
            child.stack_parent = parent

    def _unlink(self, job: Job) -> None:
        self._parent_gone(job, None)
        if self.current is job:
            self.current = _owner(job.sched_link.next)
        if job is self.candidate_cache or job is self.candidate_cache_current:
            self._reset_cache()
        self.sched.remove(job.sched_link)
        self.bytime.remove(job.time_link)
        job.stack_level = -1

    def retire(self, job: Job) -> None:
        """Take a job with nothing selectable off the lists (it stays with its message)."""
        if job.stack_level > 0:
            self._pop(job)
        self.move_limits(job)
        self._unlink(job)

    def free(self, job: Job) -> None:
        """Dispose of a finished message's job; its recipient slots go back to the pool."""
        if job.stack_level > 0:
            self._pop(job)
        self.move_limits(job)
        if job.rcpt_limit:
            log.panic(f"{job.message.qid}: {self.name}: recipient slots leak "
                      f"({job.rcpt_limit})")
        if job.stack_level >= 0:
            self._unlink(job)
        job.message.jobs.pop(self.name, None)

    # ------------------------------------------------------------ preemption
    def _count_slots(self, job: Job) -> None:
        job.slots_available += 1
        job.slots_used += 1
        if job is not self.candidate_cache_current:
            self._reset_cache()

    def _candidate(self, current: Job, now: int) -> Job | None:
        """The best job to preempt ``current`` (qmgr_job_candidate), cached per second."""
        if self.candidate_cache_current is current and (
                self.candidate_cache_time == now or self.candidate_cache is None):
            return self.candidate_cache
        max_slots = _tdiv(current.min_entries - current.selected_entries
                          + current.slots_available, self.slot_cost)
        best: Job | None = None
        best_score = 0.0
        if max_slots > 0:
            link = current.sched_link.next
            while link is not None:
                job = link.owner
                link = link.next
                if job.children or job.blocker_tag == self.blocker_tag:
                    continue
                max_total = job.max_entries
                needed = max_total - job.selected_entries
                delay = now - job.message.queued_time + 1
                if 0 < needed <= max_slots:
                    score = delay / max_total
                    if score > best_score:
                        best_score, best = score, job
                if delay <= best_score and job.stack_level == 0:
                    break
        self.candidate_cache = best
        self.candidate_cache_current = current
        self.candidate_cache_time = now
        return best

    def _preempt(self, current: Job, now: int) -> Job:
        """Let a smaller job go ahead of ``current`` when it has earned the slots."""
        if (current.slots_available <= 0
                or current.max_entries < self.min_slots * self.slot_cost):
            return current
        job = self._candidate(current, now)
        if job is None:
            return current
        if job is current or job.children or job.stack_level < 0:
            log.panic(f"{self.name}: bad preemption candidate {job!r}")
        expected = job.max_entries - job.selected_entries
        if (_tdiv(current.slots_available, self.slot_cost) + self.slot_loan
                < expected * self.slot_loan_factor / 100.0):
            return current
        if job.stack_level > 0:
            self._pop(job)
        self.sched.remove(job.sched_link)
        self.sched.insert_before(job.sched_link, current.sched_link)
        job.stack_parent = current
        current.children.append(job.sibling_link)
        job.stack_level = current.stack_level + 1
        self.current = job
        self._reset_cache()
        current.slots_available -= expected * self.slot_cost
        job.slots_used = -expected
        if job.message.rcpt_offset != 0:
            slots = _tdiv(self.rcpt_per_stack + self.rcpt_unused + 1, 2)
            job.rcpt_limit += slots
            job.message.rcpt_limit += slots
            self.rcpt_unused -= slots
        return job

    def _pop(self, job: Job) -> None:
        """Take ``job`` off its preemption stack; correct the parent's slot balance."""
        parent = job.stack_parent
        if parent is not None and job.stack_level == parent.stack_level + 1:
            parent.slots_available -= job.slots_used * self.slot_cost
        if parent is not None:
            parent.children.remove(job.sibling_link)
            job.stack_parent = None
        self._parent_gone(job, parent)
        job.stack_level = 0
        self._reset_cache()

    # ------------------------------------------------------------ entries
    @staticmethod
    def new_entry(peer: Peer) -> Entry:
        """Create an empty todo entry of ``peer`` (qmgr_entry_create)."""
        msg = peer.job.message
        entry = Entry(msg, peer.queue, peer)
        msg.refcount += 1
        peer.entries.append(entry.peer_link)
        peer.job.read_entries += 1
        peer.refcount += 1
        peer.queue.todo.append(entry.queue_link)
        peer.queue.refresh()
        return entry

    @staticmethod
    def _take(peer: Peer) -> Entry:
        head = peer.entries.head
        assert head is not None
        entry = head.owner
        queue = entry.queue
        queue.todo.remove(entry.queue_link)
        queue.busy.append(entry.queue_link)
        peer.entries.remove(entry.peer_link)
        peer.job.selected_entries += 1
        queue.refresh()
        return entry

    def _peer_select(self, job: Job, now: float, refill: Refill) -> Peer | None:
        msg = job.message
        free = msg.rcpt_limit - msg.rcpt_count
        if msg.rcpt_offset and msg.refcount > 0 and (
                free >= self.refill_limit
                or (free > 0 and now - msg.refill_time >= self.refill_delay)):
            refill(msg)
        if job.has_entries:
            peer = job.peer_select()
            if peer is not None:
                return peer
        if msg.rcpt_offset and msg.refcount > 0 and msg.rcpt_limit > msg.rcpt_count:
            refill(msg)
            if job.has_entries:
                return job.peer_select()
        return None

    def select_entry(self, now: float, refill: Refill) -> Entry | None:
        """The next entry to deliver for this transport, or None (see module docstring)."""
        job = self.current
        if job is None:
            return None
        if self.slot_cost >= 2:
            job = self._preempt(job, int(now))
        while job is not None:
            nxt = _owner(job.sched_link.next)
            if job.blocker_tag == self.blocker_tag:
                job = nxt
                continue
            peer = self._peer_select(job, now, refill)
            if peer is not None:
                entry = self._take(peer)
                self._count_slots(job)
                self.current = job
                if not job.has_entries and job.message.rcpt_offset == 0:
                    self.retire(job)
                return entry
            if job.has_entries:
                job.blocker_tag = self.blocker_tag
                for p in job.peers:
                    if p.entries:
                        p.queue.blocker_tag = self.blocker_tag
            else:
                self.retire(job)
            job = nxt
        self.current = None
        return None

    def entry_done(self, entry: Entry, busy: bool) -> None:
        """Undo ``entry``'s bookkeeping: it was delivered (busy) or purged from todo."""
        queue, msg, peer = entry.queue, entry.message, entry.peer
        job = peer.job
        if busy:
            queue.busy.remove(entry.queue_link)
        else:
            peer.entries.remove(entry.peer_link)
            job.read_entries -= 1
            queue.todo.remove(entry.queue_link)
        queue.refresh()
        n = len(entry.recipients)
        job.rcpt_count -= n
        msg.rcpt_count -= n
        for sponsor in list(msg.jobs.values()):
            if sponsor.rcpt_count >= sponsor.rcpt_limit or sponsor is job:
                continue
            if sponsor.stack_level < 0 or msg.rcpt_offset == 0:
                sponsor.joblist.move_limits(sponsor)
        if msg.rcpt_offset == 0:
            self.move_limits(job)
        self.queue_unblocked(queue)
        peer.refcount -= 1
        if peer.refcount == 0:
            job.peer_free(peer)

    def queue_unblocked(self, queue: DestQueue) -> None:
        """Re-examine the blocker jobs when ``queue`` (a blocker) has room again."""
        if queue.blocker_tag != self.blocker_tag:
            return
        if queue.room > 0 and queue.todo:
            self.blocker_tag += 2
            self.current = _owner(self.sched.head)
            self._reset_cache()
        if queue.room > 0 or queue.dead:
            queue.blocker_tag = 0
