"""A message's life in the qmgr with real queue files, fake agents and a fake clock:
exponential backoff, expiry, delay warnings, recipient batches of a 10,000-recipient
message in bounded memory, and a small message preempting a big one."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from qmgrd.delivery import BOUNCE_CMD_FLUSH, BOUNCE_CMD_WARN, DeliverRequest, DeliverStatus
from qmgrd.qmgr.completion import Completion
from qmgrd.qmgr.qfile import ActiveFile
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from tests.test_qmgr_scheduler import Env, defer_reasons, drain, run
from transports.discard import DiscardAgent


def always_defer(transport: str, req: DeliverRequest, rcpt: object) -> str:
    return "defer"


def test_backoff_is_the_message_age_clamped_to_min_and_max() -> None:
    b = Completion.backoff
    assert b(1000.0, 1000.0, 300, 4000) == 300  # brand new: minimal_backoff_time
    assert b(2000.0, 1000.0, 300, 4000) == 1000  # the age: roughly doubling intervals
    assert b(99999.0, 1000.0, 300, 4000) == 4000  # maximal_backoff_time
    assert b(1000.0, 0.0, 300, 4000) == 300  # no create time


def test_deferred_file_mtime_is_the_next_attempt(tmp_path: Path) -> None:
    env = Env(tmp_path, minimal_backoff_time="300s", maximal_backoff_time="4000s")
    env.agents.decide = always_defer
    ages = {env.submit("a@x.example", [f"r{age}@d.example"], age=age): age
            for age in (0, 1000, 10000)}

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    for qid, age in ages.items():
        mtime = os.stat(env.spool.path("deferred", qid)).st_mtime
        assert mtime == env.clock.now + min(max(age, 300), 4000), age
        assert defer_reasons(env.spool, qid) == [("4.2.0", "try later")]


def test_only_deferred_recipients_stay_undone(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.agents.decide = lambda t, r, x: "defer" if x.address.startswith("later") else "sent"
    qid = env.submit("a@x.example", ["ok@d.example", "later@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    with QueueFile.open(env.spool, "deferred", qid, lock=None, readonly=True) as qf:
        assert [r.address for r in qf.recipients] == ["later@d.example"]
    assert defer_reasons(env.spool, qid) == [("4.2.0", "try later")]
    assert Spool.is_ready(os.stat(env.spool.path("deferred", qid)))


def test_deferred_scan_waits_for_the_mtime_then_retries(tmp_path: Path) -> None:
    env = Env(tmp_path, queue_run_delay="60s")
    env.agents.decide = always_defer
    env.submit("a@x.example", ["r@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert len(env.agents.requests) == 1
        env.clock.now += 240  # periodic deferred scans at +60 .. +240: too early
        for _ in range(4):
            await drain(sched)
        assert len(env.agents.requests) == 1
        env.agents.decide = lambda t, r, x: "sent"
        env.clock.now += 60  # +300: due, and the queue_run_delay scan finds it
        await drain(sched)
        assert len(env.agents.requests) == 2

    run(go())
    assert not env.files("deferred")


def test_expired_message_is_returned_to_sender(tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path, maximal_queue_lifetime="1d")
    env.agents.decide = always_defer
    old = env.submit("a@x.example", ["r@d.example"], age=86400)
    young = env.submit("a@x.example", ["s@d.example"], age=86399)

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert [(s, r.queue_id, r.nrequest) for s, r in env.agents.status_requests] == [
        ("defer", old, BOUNCE_CMD_FLUSH)]
    assert env.files("deferred") == [young]
    assert f"{old}: from=<a@x.example>, status=expired, returned to sender" in (
        capfd.readouterr().err)


def test_null_sender_uses_bounce_queue_lifetime(tmp_path: Path) -> None:
    env = Env(tmp_path, bounce_queue_lifetime="1h")
    env.agents.decide = always_defer
    null = env.submit("", ["r@d.example"], age=3600)
    normal = env.submit("a@x.example", ["s@d.example"], age=3600)

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert [r.queue_id for _, r in env.agents.status_requests] == [null]
    assert env.files("deferred") == [normal]


def test_bounce_lifetime_is_clamped_and_zero_means_try_once(tmp_path: Path) -> None:
    env = Env(tmp_path, maximal_queue_lifetime="0", bounce_queue_lifetime="5d")
    env.agents.decide = always_defer
    a = env.submit("", ["r@d.example"])
    b = env.submit("a@x.example", ["s@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert sorted(r.queue_id for _, r in env.agents.status_requests) == sorted([a, b])
    assert not env.files("deferred") and not env.files("active")


def test_failed_expiry_notice_keeps_the_message_deferred(tmp_path: Path) -> None:
    env = Env(tmp_path, maximal_queue_lifetime="1h")
    env.agents.decide = always_defer
    env.agents.status_ok = False
    qid = env.submit("a@x.example", ["r@d.example"], age=7200)

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert env.files("deferred") == [qid]


def test_failed_bounce_notice_is_not_lost_by_expiry(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """maximal_queue_lifetime = 0 (try once): a recipient bounces while the bounce
    service fails. The message must not expire and be removed with the bounce log left
    behind and no notice sent: it stays deferred, and the next attempt sends the
    notice (and then removes the message)."""
    env = Env(tmp_path, maximal_queue_lifetime="0", minimal_backoff_time="300s")
    env.agents.decide = lambda t, req, r: "bounce"
    env.agents.status_ok = False
    qid = env.submit("a@x.example", ["bad@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert env.files("deferred") == [qid]
        assert os.path.exists(env.spool.path("bounce", qid))
        assert [(s, r.nrequest) for s, r in env.agents.status_requests] == [
            ("bounce", BOUNCE_CMD_FLUSH)]
        env.agents.status_ok = True
        env.clock.now += 300
        sched.trigger(b"ADI")
        await drain(sched)

    run(go())
    assert [(s, r.nrequest) for s, r in env.agents.status_requests] == [
        ("bounce", BOUNCE_CMD_FLUSH), ("bounce", BOUNCE_CMD_FLUSH)]
    assert not env.files("deferred") and not env.files("active")
    assert not os.path.exists(env.spool.path("bounce", qid))
    assert "status=expired" not in capfd.readouterr().err


def test_delay_warning_is_sent_once(tmp_path: Path) -> None:
    env = Env(tmp_path, delay_warning_time="1h")
    env.agents.decide = always_defer
    qid = env.submit("a@x.example", ["r@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert env.agents.status_requests == []  # not yet due
        env.clock.now += 3600 - 1  # warn_time - 1
        sched.trigger(b"ADI")
        await drain(sched)
        assert [(s, r.nrequest) for s, r in env.agents.status_requests] == [
            ("defer", BOUNCE_CMD_WARN)]
        with QueueFile.open(env.spool, "deferred", qid, lock=None, readonly=True) as qf:
            assert qf.warn_time == -1
        env.clock.now += 3600
        sched.trigger(b"ADI")
        await drain(sched)
        assert len(env.agents.requests) == 3 and len(env.agents.status_requests) == 1

    run(go())
    assert env.files("deferred") == [qid]
    assert defer_reasons(env.spool, qid) == [("4.2.0", "try later")]  # the log is kept


def test_forced_expiry_mode_bit(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r@d.example"])
    os.chmod(env.spool.path("incoming", qid), 0o710)  # postsuper -f: group execute

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert env.agents.requests == []
    assert [(s, r.nrequest) for s, r in env.agents.status_requests] == [
        ("defer", BOUNCE_CMD_FLUSH)]
    assert f"{qid}: from=<a@x.example>, status=force-expired, returned to sender" in (
        capfd.readouterr().err)


def test_ten_thousand_recipients_in_bounded_batches(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(tmp_path, qmgr_message_recipient_limit="1000", default_recipient_limit="500",
              smtp_destination_recipient_limit="50")
    qid = env.submit("a@x.example", [f"r{i}@big.example" for i in range(10000)])
    reopened: list[int] = []
    real_reopen = ActiveFile.reopen

    def counting_reopen(*args: object, **kw: object) -> ActiveFile:
        reopened.append(1)
        return real_reopen(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ActiveFile, "reopen", counting_reopen)
    peak = [0]

    async def go() -> None:
        sched = env.sched()
        env.agents.on_deliver = lambda t, r: peak.__setitem__(
            0, max(peak[0], sched.active.rcpt_count))
        sched.startup()
        await drain(sched)
        assert not sched.active.messages and sched.active.rcpt_count == 0
        assert sched.transports["smtp"].jobs.rcpt_unused == 500

    run(go())
    got = env.agents.rcpts()
    assert len(got) == 10000 and len(set(got)) == 10000  # each exactly once
    assert all(len(r.recipients) <= 50 for _, r in env.agents.requests)
    assert 0 < peak[0] <= 1000  # never more than qmgr_message_recipient_limit in memory
    assert len(reopened) >= 9  # the first 1000, then later batches after reopening
    assert not env.files("active") and not os.path.exists(env.spool.path("active", qid))


@pytest.mark.parametrize("slot_cost, small_first", [("5", True), ("1", False)])
def test_small_message_is_not_stuck_behind_a_big_one(tmp_path: Path, slot_cost: str,
                                                    small_first: bool) -> None:
    env = Env(tmp_path, smtp_destination_recipient_limit="10",
              smtp_delivery_slot_cost=slot_cost)
    big = env.submit("a@x.example", [f"r{i}@same.example" for i in range(1000)])
    small = ""

    async def go() -> None:
        nonlocal small
        sched = env.sched()
        sched.startup()
        sched.step()  # the big message is in the active queue, its first entries out
        small = env.submit("a@x.example", ["s@same.example"])
        sched.trigger(b"I")
        await drain(sched)

    run(go())
    order = [r.queue_id for _, r in env.agents.requests]
    assert len(order) == 101 and order.count(big) == 100
    if small_first:
        assert order.index(small) < 15  # preempted the big job almost at once
    else:
        assert order.index(small) == 100  # FIFO: it waited for all 100 entries


def test_refill_waits_for_free_slots_then_reads_the_next_batch(tmp_path: Path) -> None:
    env = Env(tmp_path, qmgr_message_recipient_limit="100", default_recipient_limit="40",
              smtp_destination_recipient_limit="10", default_recipient_refill_limit="20")
    env.submit("a@x.example", [f"r{i}@big.example" for i in range(300)])
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        msg = next(iter(sched.active.messages.values()))
        # first batch: max(10, 100 - 0) = 100 recipients; limit 10 + pool 40 = 50
        assert (msg.rcpt_count, msg.rcpt_limit, msg.rcpt_unread) == (100, 50, 200)
        assert len(env.agents.waiting) == 5
        env.agents.release(5)  # 50 in memory: no free slot yet
        await drain(sched)
        assert msg.rcpt_count == 50 and msg.rcpt_unread == 200
        env.agents.release(len(env.agents.waiting))  # now free >= refill limit: refill
        await drain(sched)
        assert msg.rcpt_unread < 200 and msg.rcpt_count <= 50
        while env.agents.waiting:
            env.agents.release(len(env.agents.waiting))
            await drain(sched)
            await asyncio.sleep(0)

    run(go())
    assert len(set(env.agents.rcpts())) == 300


def test_selection_work_does_not_grow_with_the_queue(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from qmgrd.qmgr.job import Job

    n = 600
    env = Env(tmp_path, smtp_destination_concurrency_limit="5")
    for i in range(n):
        env.submit("a@x.example", [f"r{i}@one.example"])
    calls = [0]
    real = Job.peer_select

    def counting(self: Job) -> object:
        calls[0] += 1
        return real(self)

    monkeypatch.setattr(Job, "peer_select", counting)
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)  # all 600 fed while 5 deliveries are held: a long job list
        assert len(sched.active.messages) == n
        assert len(sched.transports["smtp"].jobs.sched) == n - 5
        assert sched.transports["smtp"].startable == 0
        while env.agents.waiting:
            env.agents.release(len(env.agents.waiting))
            await drain(sched)

    run(go())
    assert len(env.agents.requests) == n
    # one look per delivery, not one walk over the waiting jobs per delivery
    assert calls[0] <= 2 * n


def test_a_failed_move_to_deferred_is_tried_again_at_the_next_scan(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferral whose rename into deferred/ fails (a user's "chown root deferred") is
    not forgotten in active/: the next deferred scan moves it, and it is delivered."""
    env = Env(tmp_path, queue_run_delay="60s", minimal_backoff_time="30s")
    env.agents.decide = always_defer
    qid = env.submit("a@x.example", ["r@d.example"])
    broken = [True]
    move = Spool.move

    def failing_move(self: Spool, qid: str, src: str, dst: str,
                     src_path: str | None = None) -> str:
        if broken[0] and dst == "deferred":
            raise PermissionError(13, "Permission denied")
        return move(self, qid, src, dst, src_path)

    monkeypatch.setattr(Spool, "move", failing_move)

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert env.files("active") and qid in sched.completion.unmoved
        broken[0] = False  # repaired
        env.agents.decide = lambda t, r, x: "sent"
        env.clock.now += 60  # the periodic scan: moved first, then found when due
        await drain(sched)
        assert not env.files("active") and not sched.completion.unmoved
        env.clock.now += 60
        await drain(sched)
        assert len(env.agents.requests) == 2

    run(go())
    assert not env.files("deferred") and not env.files("active")


def test_a_queue_file_the_agent_cannot_update_goes_to_corrupt(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A real delivery agent (transports.discard) delivers, then finds the recipient's
    R record damaged when it marks it done. The file must end in corrupt/ - neither
    removed as if the message were finished (it was, before the agent reported the
    write error) nor deferred and delivered again at every retry - with the agent's
    ``4.3.0 queue file write error`` in its defer log."""
    env = Env(tmp_path, minimal_backoff_time="300s")
    agent = DiscardAgent()
    agent.configure(env.cfg, "smtp")
    delivered: list[str] = []

    def damage(req: DeliverRequest) -> None:
        with open(env.spool.path(req.queue_name, req.queue_id), "r+b") as f:
            f.seek(req.recipients[0].offset)
            f.write(b"Q")  # damaged after the qmgr read it: not R, not D

    async def deliver(transport: str, req: DeliverRequest) -> DeliverStatus:
        env.agents.requests.append((transport, req))
        damage(req)
        reply = agent.handle(req)
        delivered.extend(r.address for r in req.recipients)
        return reply

    env.agents.deliver = deliver  # type: ignore[method-assign]
    qid = env.submit("a@x.example", ["r@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        env.clock.now += 4000
        sched.trigger(b"ADI")
        await drain(sched)

    run(go())
    assert delivered == ["r@d.example"]  # once, not at every retry
    assert os.path.isfile(env.spool.path("corrupt", qid))  # 0400: scan() passes over it
    assert not env.files("active") and not env.files("deferred")
    assert defer_reasons(env.spool, qid) == [("4.3.0", "queue file write error")]
    err = capfd.readouterr().err
    assert f"{qid}: removed" not in err
    assert f"warning: {qid}: queue file marked corrupt: moving to corrupt queue" in err
