"""The preemptive job scheduler of one transport (nqmgr, postfix.md §4.5-§4.6), without
files or processes: which entry is selected next, preemption with its slot arithmetic,
blockers, recipient-slot pools and refill decisions."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from master.log import Panic
from qmgrd.qmgr.entry import Entry
from qmgrd.qmgr.job import Job
from qmgrd.qmgr.message import Message
from qmgrd.qmgr.transport import Transport, TransportParams
from qmgrd.spool.envelope import Recipient

NOW = 1000.0


def transport(**kw: int) -> Transport:
    base: dict[str, int] = {"initial_concurrency": 1000, "concurrency_limit": 0}
    base.update(kw)
    return Transport("smtp", TransportParams(**base))  # type: ignore[arg-type]


def message(qid: str, queued: int, unread: int = 0, offset: int = 0) -> Message:
    m = Message(qid=qid, sender="s@x.example", arrival=queued, create_time=queued,
                active_arrival=queued, size=10, data_offset=100, queued_time=queued)
    m.rcpt_limit = 10
    m.rcpt_unread = unread
    m.rcpt_offset = offset
    return m


def add(t: Transport, msg: Message, qname: str, entries: int, per_entry: int = 1) -> Job:
    """What ActiveQueue._assign does for ``entries`` entries of ``msg`` to ``qname``."""
    job = t.jobs.obtain(msg)
    q = t.queue_obtain(qname, qname)
    peer = job.peer_obtain(q)
    for _ in range(entries):
        e = t.jobs.new_entry(peer)
        e.recipients.extend(Recipient(f"r@{qname}", offset=1) for _ in range(per_entry))
        job.rcpt_count += per_entry
        msg.rcpt_count += per_entry
    return job


def no_refill(msg: Message) -> None:
    raise AssertionError(f"unexpected refill of {msg.qid}")


def select(t: Transport, now: float = NOW,
           refill: Callable[[Message], None] = no_refill) -> Entry | None:
    return t.jobs.select_entry(now, refill)


def done(t: Transport, e: Entry) -> None:
    t.jobs.entry_done(e, busy=True)
    e.message.refcount -= 1


class Refills:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, msg: Message) -> None:
        self.calls += 1


def order(t: Transport, n: int) -> list[str]:
    out = []
    for _ in range(n):
        e = select(t)
        out.append("-" if e is None else e.message.qid)
    return out


def test_jobs_run_in_queue_time_order() -> None:
    t = transport()
    for qid, queued in (("A", 1), ("B", 2), ("C", 0)):
        add(t, message(qid, queued), qid.lower(), 1)
    assert [j.message.qid for j in t.jobs.sched] == ["C", "A", "B"]
    assert [j.message.qid for j in t.jobs.bytime] == ["C", "A", "B"]
    assert order(t, 4) == ["C", "A", "B", "-"]
    assert t.jobs.current is None  # nothing left: the next call costs O(1)


def test_round_robin_over_a_jobs_destinations() -> None:
    t = transport()
    msg = message("M", 1)
    for d in ("d1", "d2", "d3"):
        add(t, msg, d, 2)
    names = [e.queue.name for e in (select(t) for _ in range(6)) if e is not None]
    assert names == ["d1", "d2", "d3", "d1", "d2", "d3"]


def test_full_window_makes_a_blocker_until_the_queue_has_room() -> None:
    t = transport(initial_concurrency=1)
    a, b = message("A", 1), message("B", 2)
    job_a = add(t, a, "q1", 2)
    add(t, b, "q2", 1)
    first = select(t)
    assert first is not None and (first.message.qid, first.queue.name) == ("A", "q1")
    assert order(t, 2) == ["B", "-"]  # A waits for q1's window; B goes by
    q1 = t.queues["q1"]
    assert job_a.blocker_tag == t.jobs.blocker_tag == q1.blocker_tag
    assert t.jobs.current is None
    done(t, first)  # q1 has room again: the blockers are re-examined
    assert q1.blocker_tag == 0 and job_a.blocker_tag != t.jobs.blocker_tag
    assert order(t, 2) == ["A", "-"]


def test_new_recipients_unblock_a_blocker_job() -> None:
    t = transport(initial_concurrency=1)
    a = message("A", 1)
    job = add(t, a, "q1", 2)
    assert order(t, 2) == ["A", "-"]
    assert job.blocker_tag == t.jobs.blocker_tag
    add(t, a, "q2", 1)  # qmgr_job_obtain: no longer a blocker, current job reset
    assert job.blocker_tag == 0 and t.jobs.current is job
    assert select(t).queue.name == "q2"  # type: ignore[union-attr]


def test_small_message_preempts_a_big_one_with_slot_loan() -> None:
    t = transport()
    big = add(t, message("BIG", 0), "big", 100)
    add(t, message("S1", 1), "small", 1)
    # 1st: no slots yet; 2nd: 1 slot // 5 + loan 3 >= 1 entry * 50% -> S1 preempts
    assert order(t, 2) == ["BIG", "S1"]
    # BIG paid 1 * slot_cost: 1 - 5 = -4; S1 used exactly its one expected slot
    assert big.slots_available == -4 and big.slots_used == 1
    assert t.jobs.current is big and big.stack_level == 0 and not big.children
    assert order(t, 1) == ["BIG"]
    add(t, message("S2", 2), "small", 1)
    # BIG must earn a positive balance again: -3, -2, -1, 0, 1 ... then S2 goes
    assert order(t, 5) == ["BIG"] * 4 + ["S2"]
    assert big.slots_available == 1 - 5


def test_preemption_without_loan_or_discount_waits_for_full_slot_cost() -> None:
    t = transport(slot_loan=0, slot_discount=0)
    add(t, message("BIG", 0), "big", 100)
    add(t, message("S1", 1), "small", 1)
    # needs slots_available // 5 >= 1: five deliveries of BIG first
    assert order(t, 6) == ["BIG"] * 5 + ["S1"]


def test_no_preemption_below_minimum_slots_or_with_slot_cost_1() -> None:
    t = transport()
    add(t, message("BIG", 0), "big", 14)  # 14 < minimum_delivery_slots 3 * cost 5
    add(t, message("S1", 1), "small", 1)
    assert order(t, 15) == ["BIG"] * 14 + ["S1"]
    t = transport(slot_cost=1)
    add(t, message("BIG", 0), "big", 30)
    add(t, message("S1", 1), "small", 1)
    assert order(t, 31) == ["BIG"] * 30 + ["S1"]


def test_candidate_score_prefers_few_entries_and_long_wait() -> None:
    t = transport()
    add(t, message("BIG", 0), "big", 100)
    add(t, message("X", 1), "x", 3)
    add(t, message("Y", 1), "y", 1)
    # same wait: (now - 1 + 1) / 1 beats (now - 1 + 1) / 3
    assert order(t, 2) == ["BIG", "Y"]
    t = transport()
    add(t, message("BIG", 0), "big", 100)
    add(t, message("X", 0), "x", 2)
    add(t, message("Y", int(NOW) - 1), "y", 1)
    # X waited 1001 s for 2 entries (500.5), Y 2 s for 1 entry (2.0): X goes first
    assert order(t, 3) == ["BIG", "X", "X"]


def test_candidate_must_fit_the_slots_the_current_job_can_still_earn() -> None:
    t = transport()
    add(t, message("BIG", 0), "big", 20)
    add(t, message("HUGE", 1), "huge", 10)
    # BIG can earn at most (20 - 1 + 1) // 5 = 4 slots: a 10-entry job never fits
    assert order(t, 21) == ["BIG"] * 20 + ["HUGE"]


def test_preempting_job_with_unread_recipients_gets_extra_slots() -> None:
    t = transport(rcpt_pool=100, extra_rcpt_pool=40)
    big_msg = message("BIG", 0)
    big = add(t, big_msg, "big", 100)
    assert (big.rcpt_limit, big_msg.rcpt_limit, t.jobs.rcpt_unused) == (100, 110, 0)
    small_msg = message("S1", 1, unread=3, offset=500)
    small = add(t, small_msg, "small", 1)
    assert small.rcpt_limit == 0  # the pool went to BIG
    refill = Refills()
    assert select(t, NOW, refill).message.qid == "BIG"  # type: ignore[union-attr]
    assert select(t, NOW, refill).message.qid == "S1"  # type: ignore[union-attr]
    assert refill.calls == 1  # S1 has free slots and unread recipients: it reads more
    # (extra 40 + pool 0 + 1) // 2 = 20 slots lent from the extra pool
    assert small.rcpt_limit == 20 and small_msg.rcpt_limit == 30
    assert t.jobs.rcpt_unused == -20


def test_recipient_pool_moves_to_the_next_unread_job() -> None:
    t = transport(rcpt_pool=100)
    a_msg = message("A", 1, unread=50, offset=123)
    a = add(t, a_msg, "qa", 5)
    b_msg = message("B", 2, unread=10, offset=456)
    b = add(t, b_msg, "qb", 1)
    assert (a.rcpt_limit, a_msg.rcpt_limit) == (100, 110)
    assert (b.rcpt_limit, t.jobs.next_unread) == (0, a)
    a_msg.rcpt_offset = 0  # A was read to the end: it keeps what it uses
    t.jobs.move_limits(a)
    assert (a.rcpt_limit, a_msg.rcpt_limit) == (5, 15)
    assert t.jobs.next_unread is b
    assert (b.rcpt_limit, b_msg.rcpt_limit, t.jobs.rcpt_unused) == (95, 105, 0)


def test_free_returns_every_slot_to_the_pool() -> None:
    t = transport(rcpt_pool=100)
    msg = message("A", 1)
    job = add(t, msg, "qa", 3)
    t.jobs.move_limits(job)  # read to the end: keeps 3 of 100
    assert (job.rcpt_limit, t.jobs.rcpt_unused) == (3, 97)
    entries = [select(t) for _ in range(3)]
    for e in entries:
        assert e is not None
        done(t, e)
    assert (job.rcpt_count, job.rcpt_limit, t.jobs.rcpt_unused) == (0, 0, 100)
    t.jobs.free(job)
    assert not msg.jobs and not t.jobs.sched and t.jobs.rcpt_unused == 100


def test_free_with_slots_still_held_is_a_panic() -> None:
    t = transport(rcpt_pool=100)
    msg = message("A", 1)
    job = add(t, msg, "qa", 1)
    msg.rcpt_limit -= 20  # break the invariant: the message holds less than its job
    with pytest.raises(Panic):
        t.jobs.free(job)


def test_purging_todo_entries_undoes_read_entries() -> None:
    t = transport()
    msg = message("A", 1)
    job = add(t, msg, "qa", 3)
    q = t.queues["qa"]
    for link_entry in list(q.todo):
        t.jobs.entry_done(link_entry, busy=False)
    assert (job.read_entries, job.selected_entries, job.rcpt_count) == (0, 0, 0)
    assert not job.peers and not q.todo
    assert select(t) is None


def test_refill_decisions() -> None:
    t = transport(refill_limit=100, refill_delay=5)
    msg = message("A", 1, unread=1000, offset=777)
    msg.refcount = 0
    add(t, msg, "qa", 3)
    msg.rcpt_limit = 30  # 27 free slots: below the refill limit
    refill = Refills()
    msg.refill_time = NOW - 1
    assert select(t, NOW, refill) is not None and refill.calls == 0  # too soon
    msg.refill_time = NOW - 5
    assert select(t, NOW, refill) is not None and refill.calls == 1  # delay passed
    msg.refill_time = NOW
    msg.rcpt_limit = msg.rcpt_count + 100  # enough free slots for a batch
    assert select(t, NOW, refill) is not None and refill.calls == 2
    msg.rcpt_limit = msg.rcpt_count + 1
    # nothing selectable is left: one free slot is reason enough (last chance)
    assert select(t, NOW, refill) is None and refill.calls == 3
    msg.rcpt_limit = msg.rcpt_count  # no free slot: no refill
    add(t, msg, "qa", 1)
    assert select(t, NOW, refill) is not None and refill.calls == 3


def test_no_refill_while_the_message_is_being_completed() -> None:
    t = transport(refill_limit=1)
    msg = message("A", 1, unread=10, offset=777)
    job = add(t, msg, "qa", 1)
    msg.refcount = 0  # qmgr_active_done in progress
    msg.rcpt_limit = 100
    job.read_entries = job.selected_entries  # nothing selectable
    refill = Refills()
    assert select(t, NOW, refill) is None and refill.calls == 0


def test_refill_adds_entries_that_are_selected_at_once() -> None:
    t = transport(refill_limit=1)
    msg = message("A", 1, unread=1, offset=777)
    msg.refcount = 1
    add(t, msg, "qa", 0)

    def refill(m: Message) -> None:
        m.rcpt_offset = 0
        m.rcpt_unread = 0
        add(t, m, "qb", 1)

    e = select(t, NOW, refill)
    assert e is not None and e.queue.name == "qb"
    assert not msg.jobs["smtp"].sched_link.linked  # last entry of a fully read job: retired


def test_transport_counts_startable_queues_exactly() -> None:
    t = transport(initial_concurrency=2)
    msg = message("A", 1)
    add(t, msg, "q1", 3)
    add(t, msg, "q2", 1)
    assert t.startable == 2 and t.can_start(NOW)
    e1, e2, e3 = select(t), select(t), select(t)
    assert e1 is not None and e2 is not None and e3 is not None
    # q1: 2 busy = window 2 (1 waiting, no room); q2: nothing waiting
    assert t.startable == 0 and not t.can_start(NOW)
    done(t, e1)
    assert t.startable == 1 and t.queues["q1"].startable
    t.queues["q1"].window.window = 0  # dead
    t.queues["q1"].refresh()
    assert t.startable == 0
