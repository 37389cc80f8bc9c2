"""The qmgr scheduler without processes: real spool files, fake agents, a fake clock.

Also the shared helpers of the other test_qmgr_* files (Clock, FakeAgents, Env, drain)."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from master import log
from master.config import Config
from qmgrd.delivery import (
    BOUNCE_CMD_WARN,
    DeliverRequest,
    DeliverStatus,
    StatusRequest,
    encode,
    protocol_greeting,
)
from qmgrd.qmgr.client import AgentClient, TransportUnavailable
from qmgrd.qmgr.resolve import Resolver
from qmgrd.qmgr.scheduler import Scheduler
from qmgrd.spool import records as R
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.queue import Spool
from tests.services.procs import child_env


class Clock:
    """A fake clock: whole seconds, starting a little after the real time (so that files
    written meanwhile never look as if their mtime were in the future)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()) + 2)

    def __call__(self) -> float:
        return self.now


class FakeAgents:
    """Plays every delivery agent and the bounce/defer services.

    Outcome per recipient from ``decide`` ("sent", "bounce", "defer"); nexthops in
    ``hop_fail`` fail as a whole (hop status: negative feedback); transports in
    ``unavailable`` cannot be reached. With ``hold`` set, each delivery waits until the
    test releases it (``release``), optionally with a different outcome."""

    def __init__(self, spool: Spool, decide: Callable[[str, DeliverRequest, Any], str]
                 | None = None) -> None:
        self.spool = spool
        self.decide = decide or (lambda transport, req, rcpt: "sent")
        self.requests: list[tuple[str, DeliverRequest]] = []
        self.status_requests: list[tuple[str, StatusRequest]] = []
        self.unavailable: set[str] = set()
        self.hop_fail: set[str] = set()
        self.status_ok = True
        self.hold = False
        self.waiting: list[tuple[asyncio.Event, list[str]]] = []
        self.inflight = 0
        self.max_inflight = 0
        self.per_dest: Counter[str] = Counter()
        self.max_per_dest: Counter[str] = Counter()
        self.on_deliver: Callable[[str, DeliverRequest], None] | None = None

    def release(self, n: int = 1, outcome: str = "") -> None:
        for _ in range(n):
            event, box = self.waiting.pop(0)
            box.append(outcome)
            event.set()

    async def deliver(self, transport: str, req: DeliverRequest) -> DeliverStatus:
        if transport in self.unavailable:
            raise TransportUnavailable("connection refused")
        self.requests.append((transport, req))
        if self.on_deliver is not None:
            self.on_deliver(transport, req)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        self.per_dest[req.nexthop] += 1
        self.max_per_dest[req.nexthop] = max(self.max_per_dest[req.nexthop],
                                             self.per_dest[req.nexthop])
        override = ""
        if self.hold:
            event, box = asyncio.Event(), []
            self.waiting.append((event, box))
            await event.wait()
            override = box[0]
        else:
            await asyncio.sleep(0)
        self.inflight -= 1
        self.per_dest[req.nexthop] -= 1
        if req.nexthop in self.hop_fail or override == "hopfail":
            for r in req.recipients:
                statuslog.append(self.spool, "defer", req.queue_id,
                                 Recipient(r.address, offset=r.offset),
                                 statuslog.Dsn("4.4.1", "delayed", "connect refused"))
            return DeliverStatus(1, "4.4.1", "", "", "", "", "delayed", "connect refused")
        return self._outcomes(transport, req, override)

    def _outcomes(self, transport: str, req: DeliverRequest, override: str) -> DeliverStatus:
        failed = 0
        with open(self.spool.path(req.queue_name, req.queue_id), "r+b") as f:
            for r in req.recipients:
                outcome = override or self.decide(transport, req, r)
                rcpt = Recipient(r.address, offset=r.offset)
                if outcome in ("sent", "bounce"):
                    f.seek(r.offset)
                    assert f.read(1) == R.REC_RCPT, "recipient delivered twice"
                    f.seek(r.offset)
                    f.write(R.REC_DONE)
                if outcome == "bounce":
                    statuslog.append(self.spool, "bounce", req.queue_id, rcpt,
                                     statuslog.Dsn("5.1.1", "failed", "user unknown"))
                elif outcome == "defer":
                    statuslog.append(self.spool, "defer", req.queue_id, rcpt,
                                     statuslog.Dsn("4.2.0", "delayed", "try later"))
                    failed = 1
        return DeliverStatus(status=failed)

    async def status_request(self, service: str, req: StatusRequest) -> bool:
        self.status_requests.append((service, req))
        if not self.status_ok:
            return False
        if req.nrequest != BOUNCE_CMD_WARN:
            log = "bounce" if service == "bounce" else "defer"
            os.unlink(self.spool.path(log, req.queue_id))
        return True

    def rcpts(self, transport: str | None = None) -> list[str]:
        return [r.address for t, req in self.requests for r in req.recipients
                if transport is None or t == transport]


def make_cfg(tmp_path: Path, **extra: str) -> Config:
    params = {
        "queue_directory": str(tmp_path / "spool"),
        "myhostname": "mail.test.example",
        "mydestination": "$myhostname, localhost",
        "maillog_file": str(tmp_path / "maillog"),
    }
    params.update(extra)
    text = "".join(f"{k} = {v}\n" for k, v in params.items())
    return Config.from_text(text, str(tmp_path))


class Env:
    """A spool, cleanup, fake clock and fake agents; ``sched()`` makes the scheduler."""

    def __init__(self, tmp_path: Path, **params: str) -> None:
        self.cfg = make_cfg(tmp_path, **params)
        self.spool = Spool(str(tmp_path / "spool"))
        self.spool.make_dirs()
        self.cleanup = Cleanup(self.cfg, self.spool)
        self.clock = Clock()
        self.agents = FakeAgents(self.spool)

    def submit(self, sender: str, rcpts: list[str], body: bytes = b"hi\n",
               age: float = 0) -> str:
        """Queue a message in incoming/, its mtime on the fake clock: a file written
        seconds after the clock was made (a loaded machine, a long test) would otherwise
        look future-dated to the scheduler, whose feed skips it."""
        arrival = (int(self.clock.now - age), 0) if age else (0, 0)
        qid = self.cleanup.submit(
            Envelope(sender=sender, recipients=[Recipient(r) for r in rcpts], arrival=arrival),
            b"Subject: t\n\n" + body)
        path = self.spool.path("incoming", qid)
        if os.stat(path).st_mtime > self.clock.now:
            os.utime(path, (self.clock.now, self.clock.now))
        return qid

    def sched(self) -> Scheduler:
        return Scheduler(self.cfg, self.spool, self.agents,  # type: ignore[arg-type]
                         clock=self.clock)

    def files(self, queue: str) -> list[str]:
        return sorted(self.spool.scan(queue))


def submit(cleanup: Cleanup, sender: str, rcpts: list[str], body: bytes = b"hi\n") -> str:
    return cleanup.submit(Envelope(sender=sender, recipients=[Recipient(r) for r in rcpts]),
                          b"Subject: t\n\n" + body)


async def drain(sched: Scheduler, rounds: int = 50000) -> None:
    """Step until nothing is left to do now: no work and no task able to progress
    (timers in the future and deliveries held by FakeAgents.hold may remain)."""
    idle = 0
    for _ in range(rounds):
        worked = sched.step()
        await asyncio.sleep(0)
        idle = 0 if worked else idle + 1
        if idle and (not sched.tasks or idle >= 10):
            return
    raise AssertionError("scheduler did not settle")


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def defer_reasons(spool: Spool, qid: str) -> list[tuple[str, str]]:
    return [(d.status, d.reason) for _, d in statuslog.read(spool, "defer", qid)]


# ----------------------------------------------------------------------------- routing
def test_resolver_routes(tmp_path: Path) -> None:
    tm = tmp_path / "transport"
    tm.write_text("special.example  smtp:[127.0.0.1]:2526\n.sub.example discard:\n"
                  "err.example error:5.1.2 no such domain\n")
    cfg = make_cfg(tmp_path, transport_maps=f"texthash:{tm}", relayhost="[relay.example]")
    r = Resolver(cfg)
    assert (r.resolve("u@localhost").transport, r.resolve("u@localhost").nexthop) == (
        "local", "mail.test.example")
    assert r.resolve("u@MAIL.test.example").local
    assert r.resolve("u@other.example").nexthop == "[relay.example]"
    assert r.resolve("u@special.example").nexthop == "[127.0.0.1]:2526"
    assert r.resolve("u@a.sub.example").transport == "discard"
    assert r.resolve("u@err.example").transport == "error"
    assert r.resolve("u@err.example").nexthop == "5.1.2 no such domain"
    assert r.resolve("@x").transport == "error"
    assert r.resolve("-opt@x.example").transport == "error"  # allow_min_user = no
    r2 = Resolver(make_cfg(tmp_path, allow_min_user="yes"))
    assert r2.resolve("-opt@x.example").transport == "smtp"


def test_delivers_and_removes(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qids = [env.submit("a@x.example", [f"r{i}@d{i % 3}.example", "u@localhost"])
            for i in range(9)]

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert not sched.active.messages and sched.active.rcpt_count == 0
        # every queue of a ready destination was forgotten once empty
        assert all(not t.queues for t in sched.transports.values())
        assert all(t.jobs.rcpt_unused == 20000 for t in sched.transports.values())

    run(go())
    assert not env.files("incoming") and not env.files("active")
    assert sorted({t for t, _ in env.agents.requests}) == ["local", "smtp"]
    assert all(len(r.recipients) == 1 for t, r in env.agents.requests if t == "local")
    assert {r.queue_id for _, r in env.agents.requests} == set(qids)


def test_recipient_limit_splits_entries(tmp_path: Path) -> None:
    env = Env(tmp_path, smtp_destination_recipient_limit="2")
    env.submit("a@x.example", [f"r{i}@big.example" for i in range(5)])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert sorted(len(r.recipients) for _, r in env.agents.requests) == [1, 2, 2]


def test_local_gets_one_queue_per_recipient_without_extension(tmp_path: Path) -> None:
    env = Env(tmp_path, recipient_delimiter="+")
    env.submit("a@x.example", ["u+x@localhost", "u@localhost", "v@localhost"])
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        local = sched.transports["local"]
        assert sorted(local.queues) == ["u@mail.test.example", "v@mail.test.example"]
        assert len(local.queues["u@mail.test.example"].busy) == 2  # window 2: both busy
        env.agents.release(3)
        await drain(sched)

    run(go())
    assert sorted(env.agents.rcpts("local")) == ["u+x@localhost", "u@localhost", "v@localhost"]


# ----------------------------------------------------------------------------- fairness
def test_incoming_and_deferred_take_turns_and_incoming_wins_when_full(tmp_path: Path) -> None:
    env = Env(tmp_path, qmgr_message_active_limit="3")
    inc = [env.submit("a@x.example", [f"i{i}@d.example"]) for i in range(4)]
    dfr = [env.submit("a@x.example", [f"f{i}@d.example"]) for i in range(3)]
    for qid in dfr:
        path = env.spool.move(qid, "incoming", "deferred")
        os.utime(path, (env.clock.now - 10, env.clock.now - 10))
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert len(sched.active.messages) == 3  # full: I D I
        env.agents.release(3)
        await drain(sched)
        env.agents.release(len(env.agents.waiting))
        await drain(sched)
        env.agents.release(len(env.agents.waiting))
        await drain(sched)

    run(go())
    origin = {q: "I" for q in inc} | {q: "D" for q in dfr}
    # after a feed the other queue goes first; once full, incoming is preferred
    assert [origin[r.queue_id] for _, r in env.agents.requests] == list("IDIIDID")


def test_a_feed_step_passes_over_files_not_yet_due(tmp_path: Path) -> None:
    """A deferred scan over files whose retry time has not come passes over up to
    SKIP_BATCH of them in one feed step (no event-loop round per file), but still takes
    at most one message in per step."""
    from qmgrd.qmgr.scheduler import SKIP_BATCH
    env = Env(tmp_path)
    later = env.clock.now + 3600
    n_waiting = 2 * SKIP_BATCH + 10
    for i in range(n_waiting + 2):
        qid = env.submit("a@x.example", [f"r{i}@d.example"])
        path = env.spool.move(qid, "incoming", "deferred")
        due = env.clock.now - 10 if i >= n_waiting else later
        os.utime(path, (due, due))
    sched = env.sched()
    sched.deferred.request()
    steps = 0
    while sched.feed_one():
        steps += 1
        assert len(sched.active.messages) <= steps  # one message per step at most
    assert len(sched.active.messages) == 2
    # 212 names in directory order, two of them due: each step passes over up to 100
    # names or stops at one it takes, so at most ceil(212 / 100) + 2 steps (one per
    # name, 212, before)
    assert steps <= 5
    assert len(env.files("deferred")) == n_waiting


def test_round_robin_across_transports(tmp_path: Path) -> None:
    env = Env(tmp_path)
    for i in range(3):
        env.submit("a@x.example", [f"u{i}@localhost"])
        env.submit("a@x.example", [f"r{i}@d{i}.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        while sched.feed_one():
            pass
        assert len(sched.active.messages) == 6
        sched.dispatcher.dispatch()
        await drain(sched)

    run(go())
    seq = [t for t, _ in env.agents.requests]
    assert sorted(seq) == ["local"] * 3 + ["smtp"] * 3
    assert all(a != b for a, b in itertools.pairwise(seq)), seq


def test_round_robin_across_destinations_of_a_message(tmp_path: Path) -> None:
    env = Env(tmp_path, smtp_destination_recipient_limit="2")
    env.submit("a@x.example", [f"r{i}@d{d}.example" for d in range(3) for i in range(4)])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert [r.nexthop for _, r in env.agents.requests] == [
        "d0.example", "d1.example", "d2.example"] * 2


# ----------------------------------------------------------------------------- feedback
def test_slow_start_window_grows_by_one_per_success(tmp_path: Path) -> None:
    env = Env(tmp_path)
    for i in range(12):
        env.submit("a@x.example", [f"r{i}@slow.example"])
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        q = sched.transports["smtp"].queues["slow.example"]
        assert (env.agents.inflight, q.window.window, len(q.todo)) == (5, 5, 7)
        env.agents.release(1)  # positive feedback with 5 busy: 5 < 5 + 5 -> 6
        await drain(sched)
        assert (q.window.window, env.agents.inflight) == (6, 6)
        env.agents.release(1)
        await drain(sched)
        assert (q.window.window, env.agents.inflight) == (7, 7)
        env.agents.release(len(env.agents.waiting))
        await drain(sched)

    run(go())
    assert env.agents.max_per_dest["slow.example"] == 7


def test_negative_feedback_shrinks_the_window_then_kills_the_destination(
        tmp_path: Path) -> None:
    env = Env(tmp_path)
    qids = [env.submit("a@x.example", [f"r{i}@flaky.example"]) for i in range(8)]
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        q = sched.transports["smtp"].queues["flaky.example"]
        assert (len(q.busy), len(q.todo)) == (5, 3)
        env.agents.release(1, "hopfail")
        await drain(sched)
        assert (q.window.window, len(q.busy)) == (3, 4)  # 5 -> 3: no new delivery
        env.agents.release(1, "hopfail")
        await drain(sched)
        assert (q.window.window, len(q.busy)) == (2, 3)
        env.agents.release(1, "hopfail")  # 1/5 + 1/3 + 1/2 >= 1: dead
        await drain(sched)
        assert q.dead and q.dead_reason == "connect refused" and q.dead_status == "4.4.1"
        assert not q.todo  # the 3 waiting entries were deferred without an attempt
        assert q.dead_until == env.clock.now + 300
        env.agents.release(2)  # in-flight deliveries still finish
        await drain(sched)

    run(go())
    assert len(env.agents.requests) == 5
    never_tried = [q for q in qids if q not in {r.queue_id for _, r in env.agents.requests}]
    assert len(never_tried) == 3
    for qid in never_tried:  # Postfix's text for mail not tried at a dead destination
        assert defer_reasons(env.spool, qid) == [
            ("4.4.1", "delivery temporarily suspended: connect refused")]


def test_dead_destination_cache_expires_after_minimal_backoff(tmp_path: Path) -> None:
    env = Env(tmp_path, minimal_backoff_time="100s")
    for i in range(3):
        env.submit("a@x.example", [f"r{i}@down.example"])
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        env.agents.release(3, "hopfail")  # three failures: dead
        await drain(sched)
        q = sched.transports["smtp"].queues["down.example"]
        assert q.dead
        env.agents.hold = False
        late = env.submit("a@x.example", ["late@down.example"])
        sched.trigger(b"I")
        await drain(sched)
        assert len(env.agents.requests) == 3  # no attempt: the saved reason is used
        assert defer_reasons(env.spool, late) == [("4.4.1", "delivery temporarily suspended: connect refused")]
        assert env.spool.path("deferred", late) in [
            env.spool.path("deferred", x) for x in env.files("deferred")]
        env.clock.now += 99
        await drain(sched)
        assert q.dead
        env.clock.now += 1  # minimal_backoff_time later the destination is alive again
        await drain(sched)
        assert not q.dead and "down.example" not in sched.transports["smtp"].queues
        again = env.submit("a@x.example", ["again@down.example"])
        sched.trigger(b"I")
        await drain(sched)
        assert env.agents.requests[-1][1].queue_id == again

    run(go())


def test_flush_forgets_dead_destinations_and_transports_at_once(tmp_path: Path) -> None:
    env = Env(tmp_path)
    for i in range(5):
        env.submit("a@x.example", [f"r{i}@down.example"])
    env.submit("a@x.example", ["u@localhost"])
    env.agents.unavailable.add("local")
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        env.agents.release(3, "hopfail")
        await drain(sched)
        smtp, local = sched.transports["smtp"], sched.transports["local"]
        q = smtp.queues["down.example"]
        assert q.dead
        assert local.dead and local.dead_reason == "mail transport unavailable"
        assert len(sched.timers) == 2 and sched.dead_queues == {q}
        sched.trigger(b"F")
        assert not q.dead and q.window.window == 2  # the two deliveries still busy
        assert not local.dead and len(sched.timers) == 0
        assert not sched.dead_queues and not sched.dead_transports
        env.agents.release(2)
        await drain(sched)

    run(go())


def test_dead_transport_defers_without_attempt_until_transport_retry_time(
        tmp_path: Path) -> None:
    env = Env(tmp_path, transport_retry_time="30s")
    q1 = env.submit("a@x.example", ["r@d.example"])
    env.agents.unavailable.add("smtp")

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        smtp = sched.transports["smtp"]
        assert smtp.dead and smtp.dead_until == env.clock.now + 30
        q2 = env.submit("a@x.example", ["s@e.example"])
        sched.trigger(b"I")
        await drain(sched)
        assert env.spool.path("deferred", q2) in {env.spool.path("deferred", q)
                                                  for q in env.files("deferred")}
        assert defer_reasons(env.spool, q2) == [("4.3.0", "mail transport unavailable")]
        env.agents.unavailable.clear()
        env.clock.now += 30
        await drain(sched)
        assert not smtp.dead
        q3 = env.submit("a@x.example", ["t@e.example"])
        sched.trigger(b"I")
        await drain(sched)
        assert [r.queue_id for _, r in env.agents.requests] == [q3]

    run(go())
    assert q1 in env.files("deferred")


# ----------------------------------------------------------------------------- rate delays
def test_destination_rate_delay_one_delivery_per_delay(tmp_path: Path) -> None:
    env = Env(tmp_path, smtp_destination_rate_delay="10s")
    for i in range(3):
        env.submit("a@x.example", [f"r{i}@slow.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        q = sched.transports["smtp"].queues["slow.example"]
        assert len(env.agents.requests) == 1
        assert q.suspended and q.suspended_until == env.clock.now + 10
        env.clock.now += 9
        await drain(sched)
        assert len(env.agents.requests) == 1
        env.clock.now += 1
        await drain(sched)
        assert len(env.agents.requests) == 2
        env.clock.now += 10
        await drain(sched)
        assert len(env.agents.requests) == 3
        env.clock.now += 10
        await drain(sched)
        assert "slow.example" not in sched.transports["smtp"].queues  # resumed, empty

    run(go())
    assert env.agents.max_per_dest["slow.example"] == 1


def test_transport_rate_delay_spaces_all_deliveries_of_the_transport(tmp_path: Path) -> None:
    env = Env(tmp_path, smtp_transport_rate_delay="5s")
    for i in range(3):
        env.submit("a@x.example", [f"r@d{i}.example"])
    env.submit("a@x.example", ["u@localhost"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert [t for t, _ in env.agents.requests].count("smtp") == 1
        assert env.agents.rcpts("local") == ["u@localhost"]  # other transports go on
        env.clock.now += 5
        await drain(sched)
        assert len(env.agents.rcpts("smtp")) == 2
        env.clock.now += 5
        await drain(sched)
        assert len(env.agents.rcpts("smtp")) == 3

    run(go())


# ----------------------------------------------------------------------------- triggers
def test_unknown_trigger_bytes_are_ignored_and_logged_once(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path)

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        sched.trigger(b"I\0")  # the NUL unix_trigger appends is not "unknown"
        sched.trigger(b"\x01zzz\xffI")
        sched.trigger(b"?")
        qid = env.submit("a@x.example", ["r@d.example"])
        sched.trigger(b"W")
        await drain(sched)
        assert qid not in env.files("incoming")

    run(go())
    err = capfd.readouterr().err
    assert err.count("ignoring 5 unknown trigger request byte(s) (hex 01 7a 7a 7a ff;") == 1
    assert "ignoring" in err and "\\x" not in err


def test_unknown_trigger_warning_is_short(tmp_path: Path,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path)
    env.sched().trigger(bytes(range(1, 33)) * 32)
    err = capfd.readouterr().err
    assert "ignoring 1024 unknown trigger request byte(s) (hex 01 02 03 04 05 06 07 08 " \
        "09 0a 0b 0c 0d 0e 0f 10...;" in err
    assert len(err) < 250


def test_forced_deferred_scans_are_rate_limited(tmp_path: Path) -> None:
    """A flood of A+D triggers (any local user can write public/qmgr) cannot make the
    qmgr retry a deferred message over and over: at most one forced scan per second,
    and the last request is still honoured when the second is up."""
    env = Env(tmp_path)
    env.agents.decide = lambda transport, req, rcpt: "defer"
    qid = env.submit("a@x.example", ["r@d.example"])
    scans = Counter[str]()
    real_scan = env.spool.scan_paths

    def counting_scan(queue: str, bogus: Any = None) -> Iterator[tuple[str, str]]:
        scans[queue] += 1
        return real_scan(queue, bogus)

    env.spool.scan_paths = counting_scan  # type: ignore[method-assign]

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert len(env.agents.requests) == 1 and env.files("deferred") == [qid]
        sched.trigger(b"AD")  # an operator's flush: at once
        await drain(sched)
        assert len(env.agents.requests) == 2 and env.files("deferred") == [qid]
        env.clock.now += 1
        before = scans["deferred"]
        for _ in range(1000):  # the flood, all within one second of the fake clock
            sched.trigger(b"AD")
            sched.step()
            await asyncio.sleep(0)
        await drain(sched)
        assert 3 <= len(env.agents.requests) <= 4  # at most ~2 forced passes
        assert scans["deferred"] > before  # plain D requests still scan (time honoured)
        assert env.files("deferred") == [qid]
        burst = len(env.agents.requests)
        env.clock.now += 1  # the second is up: the remembered request runs, once
        await drain(sched)
        assert len(env.agents.requests) == burst + 1
        env.clock.now += 5
        await drain(sched)
        assert len(env.agents.requests) == burst + 1  # coalesced: nothing more queued

    run(go())


def test_scan_all_alone_starts_nothing_but_applies_to_the_next_scan(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r@d.example"])
    later = env.clock.now + 1000
    path = env.spool.move(qid, "incoming", "deferred")
    os.utime(path, (later, later))

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert not env.agents.requests  # mtime in the future
        sched.trigger(b"A")
        await drain(sched)
        assert not env.agents.requests and not sched.deferred.busy
        sched.trigger(b"D")  # the next deferred scan ignores time stamps
        await drain(sched)
        assert [r.queue_id for _, r in env.agents.requests] == [qid]

    run(go())


def test_trigger_flood_cannot_stall_feeding(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qids = [env.submit("a@x.example", [f"r{i}@d{i % 4}.example"]) for i in range(30)]
    scans = Counter[str]()
    real_scan = env.spool.scan_paths

    def counting_scan(queue: str, bogus: Any = None) -> Iterator[tuple[str, str]]:
        scans[queue] += 1
        return real_scan(queue, bogus)

    env.spool.scan_paths = counting_scan  # type: ignore[method-assign]

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        for step in range(200):
            sched.trigger(b"WIDA" * 256)  # a full 1024-byte read every round
            sched.step()
            await asyncio.sleep(0)
            if step == 29:
                assert scans["incoming"] <= 2  # restarts wait for the running scan
            if not sched.active.messages and not env.files("incoming") and step > 30:
                break
        await drain(sched)

    run(go())
    assert sorted({r.queue_id for _, r in env.agents.requests}) == sorted(qids)


# ----------------------------------------------------------------------------- policy
def test_defer_transports_until_a_flush(tmp_path: Path) -> None:
    env = Env(tmp_path, defer_transports="smtp")
    qid = env.submit("a@x.example", ["r@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert not env.agents.requests
        assert defer_reasons(env.spool, qid) == [("4.3.2", "deferred transport")]
        sched.trigger(b"FADI")  # postqueue -f: defer_transports is ignored this time
        await drain(sched)
        assert [r.queue_id for _, r in env.agents.requests] == [qid]
        other = env.submit("a@x.example", ["s@d.example"])
        sched.trigger(b"I")  # a scan without F: deferred again
        await drain(sched)
        assert len(env.agents.requests) == 1 and other in env.files("deferred")

    run(go())


def test_hold_queue_is_never_scanned(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r@d.example"])
    env.spool.move(qid, "incoming", "hold")

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        sched.trigger(b"FADIW")
        await drain(sched)

    run(go())
    assert not env.agents.requests and env.files("hold") == [qid]


def test_bogus_incoming_entries_are_warned_about_once_and_skipped(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Entries of incoming/ named as queue ids that are no queue file - a symbolic
    link, a directory - are skipped with Postfix's mail_open_ok warning, once each
    however many scans run (an incoming scan runs at every message); names that are no
    queue id (a junk file, a directory, cleanup's temporary <usec>.<pid> file) are
    skipped silently, as Postfix's scan does; mail flows past them all, they are left
    as they are, and one removed and made again is warned about again."""
    from qmgrd.spool.queueid import new_long_id

    env = Env(tmp_path)
    incoming = Path(env.spool.queue_path("incoming"))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not mail")
    link, dirid = new_long_id(1_700_000_000, 1, 11), new_long_id(1_700_000_000, 2, 22)
    (incoming / link).symlink_to(target)
    (incoming / dirid).mkdir()
    (incoming / "junk.txt").write_bytes(b"x")
    (incoming / "notes").mkdir()
    (incoming / "123456.4321").write_bytes(b"")  # a cleanup's file before its link
    uid = os.getuid()
    said = {f"incoming/{link}: uid {uid}: not a regular file",
            f"incoming/{dirid}: uid {uid}: not a regular file"}

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        for i in range(5):  # five messages, five incoming scans
            env.submit("a@x.example", [f"r{i}@d.example"])
            sched.trigger(b"I")
            await drain(sched)
        assert len(env.agents.rcpts()) == 5
        err = capfd.readouterr().err
        for text in said:
            assert err.count(text) == 1, (text, err)
        assert "junk.txt" not in err and "notes" not in err and "123456.4321" not in err
        (incoming / link).unlink()
        sched.trigger(b"I")
        await drain(sched)  # a complete scan without it: forgotten
        (incoming / link).symlink_to(target)
        for _ in range(3):
            sched.trigger(b"I")
            await drain(sched)
        err = capfd.readouterr().err
        assert err.count(f"incoming/{link}: uid {uid}: not a regular file") == 1, err
        assert dirid not in err

    run(go())
    assert os.readlink(incoming / link) == str(target) and target.read_bytes() == b"not mail"
    assert sorted(os.listdir(incoming)) == sorted([link, dirid, "junk.txt", "notes",
                                                   "123456.4321"])


def test_clog_warning_once_per_warn_time(tmp_path: Path,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path, qmgr_message_active_limit="10", qmgr_clog_warn_time="300s")
    for i in range(5):
        env.submit("a@x.example", [f"r{i}@clog.example"])
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        env.clock.now += 300
        env.submit("a@x.example", ["late@clog.example"])
        sched.trigger(b"I")
        await drain(sched)
        env.agents.release(len(env.agents.waiting))
        await drain(sched)
        env.agents.release(len(env.agents.waiting))
        await drain(sched)

    run(go())
    err = capfd.readouterr().err
    assert err.count("is using up") == 2
    assert "warning: mail for clog.example is using up 3 of 3 active queue entries" in err
    assert "warning: mail for clog.example is using up 6 of 6 active queue entries" in err
    assert "to turn off these warnings specify: qmgr_clog_warn_time = 0" in err


def test_double_bounce_recipient_discarded(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qid = env.submit("", ["double-bounce@mail.test.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert env.agents.requests == []
    assert qid not in env.files("active") and qid not in env.files("deferred")


def test_corrupt_file_moved_to_corrupt_and_qmgr_goes_on(tmp_path: Path) -> None:
    env = Env(tmp_path)
    bad = env.spool.path("incoming", "4SVLCh0sf8z9HdB")
    with open(bad, "wb") as f:
        f.write(b"not a queue file")
    os.chmod(bad, 0o700)
    good = env.submit("a@x.example", ["r@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert env.files("corrupt") == ["4SVLCh0sf8z9HdB"]
    assert [r.queue_id for _, r in env.agents.requests] == [good]


def test_bounce_asks_bounce_service_and_removes(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.agents.decide = lambda t, req, r: "bounce" if r.address.startswith("bad") else "sent"
    qid = env.submit("a@x.example", ["bad@d.example", "good@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert [(s, r.queue_id) for s, r in env.agents.status_requests] == [("bounce", qid)]
    assert not env.files("active")


def test_per_message_flush_bit_revives_what_the_message_needs(tmp_path: Path) -> None:
    env = Env(tmp_path)
    for i in range(5):
        env.submit("a@x.example", [f"r{i}@down.example"])
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        env.agents.release(3, "hopfail")
        await drain(sched)
        assert sched.transports["smtp"].queues["down.example"].dead
        env.agents.hold = False  # (the two deliveries still in flight stay held)
        qid = env.submit("a@x.example", ["flushed@down.example"])
        os.chmod(env.spool.path("incoming", qid), 0o740)  # group read: flush this one
        sched.trigger(b"I")
        await drain(sched)
        q = sched.transports["smtp"].queues["down.example"]
        # revived with window = the deliveries in flight; the message waits its turn
        assert q.ready and q.window.window == 2 and len(q.busy) == 2 and len(q.todo) == 1
        assert not sched.dead_queues and qid in sched.active.messages
        env.agents.release(2)
        await drain(sched)
        assert env.agents.requests[-1][1].queue_id == qid  # attempted, not deferred
        assert not os.path.exists(env.spool.path("active", qid))
        assert defer_reasons(env.spool, qid) == []

    run(go())


def test_agent_crash_defers_unfinished_recipients_with_a_log_line(tmp_path: Path) -> None:
    """An agent that dies mid-request (no reply): the recipients it did not finish get a
    defer-log entry and a status=deferred line; the one it finished keeps its D record."""
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["done@d.example", "lost@d.example"])
    real = env.agents._outcomes

    def crash_after_first(transport: str, req: DeliverRequest, override: str) -> DeliverStatus:
        first = DeliverRequest(**{**req.__dict__, "recipients": req.recipients[:1]})
        real(transport, first, "sent")
        return DeliverStatus(status=1, dsn_status="4.3.0", action="delayed",
                             reason="unknown mail transport error", agent_failed=True)

    env.agents._outcomes = crash_after_first  # type: ignore[method-assign]

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert env.files("deferred") == [qid]
    assert [(r.address, d.reason) for r, d in statuslog.read(env.spool, "defer", qid)] == [
        ("lost@d.example", "unknown mail transport error")]


# ----------------------------------------------------------------------------- start-up
def test_missing_transport_map_is_one_fatal_line(tmp_path: Path) -> None:
    """The qmgr process itself: a table that cannot be opened is one ``fatal:`` line in
    the maillog (no traceback) and exit 1."""
    (tmp_path / "q").mkdir()
    maillog = tmp_path / "maillog"
    (tmp_path / "main.cf").write_text(
        f"queue_directory = {tmp_path}/q\nmaillog_file = {maillog}\n"
        "myhostname = h.example\ntransport_maps = hash:/nonexistent\n")
    (tmp_path / "master.cf").write_text("qmgr fifo n - n 300 1 qmgr\n")
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "qmgrd.qmgr", "-c", str(tmp_path), "-n", "qmgr",
         "-t", "fifo", "-l", str(tmp_path / "fifo")],
        env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, timeout=20, check=False)
    assert proc.returncode == 1
    lines = maillog.read_text().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith("]: fatal: parameter transport_maps: hash:/nonexistent: "
                             "No such file or directory"), lines


def test_transport_map_bad_line_is_a_warning_not_a_fatal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A line without a value made the qmgr die at start-up (``fatal: parameter
    transport_maps: ... expected "key whitespace value"``), and the master throttled
    it: as with postmap, it is one warning naming file and line, and the rest routes."""
    from master import log
    warnings: list[str] = []
    monkeypatch.setattr(log, "warning", warnings.append)
    table = tmp_path / "transport"
    table.write_text("a.example smtp:[relay-a]\n  \nbadline-without-value\n"
                     "b.example error:5.7.1 no\n")
    cfg = Config.from_text(f"myhostname = h.example\ntransport_maps = hash:{table}\n",
                           str(tmp_path))
    r = Resolver(cfg)
    assert (r.resolve("x@a.example").transport, r.resolve("x@a.example").nexthop) == (
        "smtp", "[relay-a]")
    assert r.resolve("x@b.example").transport == "error"
    assert r.resolve("x@badline-without-value").nexthop == "badline-without-value"
    assert warnings == [(f"{table}, line 3: expected format: key whitespace value -- "
                         "ignoring this line")]


def test_flow_tokens_withheld_while_the_qmgr_has_a_backlog(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """in_flow_delay (qmgrd.flow): one token per message taken from incoming, except
    while a deferred scan runs or the active queue is over 2 x default_process_limit;
    the withheld tokens are paid (at most default_process_limit) once caught up."""
    import qmgrd.qmgr.scheduler as scheduler_mod
    put: list[int] = []
    monkeypatch.setattr(scheduler_mod, "flow_put", lambda n: put.append(n) or n)
    env = Env(tmp_path, default_process_limit="2")  # tokens <= 2, backlog mark 4
    env.agents.hold = True
    dfr = [env.submit("a@x.example", [f"f{i}@d.example"]) for i in range(3)]
    for qid in dfr:
        path = env.spool.move(qid, "incoming", "deferred")
        os.utime(path, (env.clock.now - 10, env.clock.now - 10))
    for i in range(3):
        env.submit("a@x.example", [f"i{i}@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        sched.step()  # takes from incoming while the deferred scan is busy
        assert sched.deferred.busy and put == []
        await drain(sched)  # I D I D I: all taken; the deferred scan is over
        assert not sched.deferred.busy and len(sched.active) == 6
        assert sum(put) == 0 and sched._flow_owed == 2  # 6 > 4, owed capped at 2
        for _ in range(10):  # two agents at a time (default_process_limit)
            env.agents.release(len(env.agents.waiting))
            await drain(sched)
        assert len(sched.active) == 0
        env.submit("a@x.example", ["late@d.example"])
        sched.trigger(b"I")
        await drain(sched)
        assert put == [3]  # its own token and the two owed

    run(go())


_REQUEST = DeliverRequest(queue_name="active", queue_id="4Xq7Zc1Hl2z4abc", offset=0, size=0,
                          sender="s@x", nexthop="x")


def _agent_socket(tmp_path: Path, service: str) -> socket.socket:
    """A listening ``<tmp_path>/private/<service>``: the test's stand-in for an agent."""
    (tmp_path / "private").mkdir(exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "private" / service))
    listener.listen(1)
    return listener


def test_an_agent_that_greets_too_late_finds_the_connection_closed(tmp_path: Path) -> None:
    """The request goes out before the greeting (qmgrd.qmgr.client); an agent that
    accepts and greets after greeting_timeout finds the request and then EOF - the
    qmgr's end closed - which is what the agent checks before delivering
    (transports.agent._qmgr_gone, tested in test_agent_base)."""
    listener = _agent_socket(tmp_path, "slow")

    async def run() -> None:
        client = AgentClient(str(tmp_path), greeting_timeout=0.2, reply_timeout=5)
        with pytest.raises(TransportUnavailable, match="no valid greeting"):
            await client.deliver("slow", _REQUEST)

    asyncio.run(run())  # the connection waits in the listen queue past the timeout
    conn, _ = listener.accept()
    got = b""
    with conn, listener:
        conn.settimeout(2)
        while data := conn.recv(65536):
            got += data
    assert got == _REQUEST.encode()


def test_the_request_is_written_before_the_greeting_is_read(tmp_path: Path) -> None:
    """One wake-up less per delivery: the agent finds the request waiting when it has
    greeted; the reply is still taken only after a valid greeting."""
    listener = _agent_socket(tmp_path, "agent")
    reply = DeliverStatus(status=0, dsn_status="2.0.0", action="relayed", reason="250 ok")
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            want = _REQUEST.encode()
            got = b""
            while len(got) < len(want):  # read before greeting: it is already there
                got += conn.recv(65536)
            seen.append(got)
            conn.sendall(protocol_greeting("delivery_request_protocol")
                         + encode(reply.to_attrs()))

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        got = asyncio.run(AgentClient(str(tmp_path), greeting_timeout=5,
                                      reply_timeout=5).deliver("agent", _REQUEST))
    finally:
        worker.join(10)
        listener.close()
    assert seen == [_REQUEST.encode()]
    assert (got.status, got.reason, got.agent_failed) == (0, "250 ok", False)


@pytest.mark.parametrize("greeting", [b"", b"protocol\0delivery_req",
                                      b"protocol\0status_protocol\0\0"])
def test_no_complete_valid_greeting_means_transport_unavailable(
        tmp_path: Path, greeting: bytes) -> None:
    """An agent greets before it reads: a connection that ends before a complete
    greeting was not read (nothing delivered), and a wrong protocol is not an agent."""
    listener = _agent_socket(tmp_path, "agent")

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(greeting)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        # (a peer gone at once may fail the request's write first: the same verdict)
        with pytest.raises(TransportUnavailable,
                           match="no valid greeting|closed before the greeting|write to"):
            asyncio.run(AgentClient(str(tmp_path), greeting_timeout=5,
                                    reply_timeout=5).deliver("agent", _REQUEST))
    finally:
        worker.join(10)
        listener.close()


def _agent_exchange(tmp_path: Path, script: Callable[[socket.socket], None]) -> DeliverStatus:
    """AgentClient.deliver against a one-connection agent running ``script`` (in a
    thread: the test's stand-in for the agent process)."""
    listener = _agent_socket(tmp_path, "agent")

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            script(conn)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        return asyncio.run(AgentClient(str(tmp_path), greeting_timeout=5,
                                       reply_timeout=5).deliver("agent", _REQUEST))
    finally:
        worker.join(10)
        listener.close()


def test_client_reads_a_greeting_and_reply_that_trickle_in(tmp_path: Path) -> None:
    reply = DeliverStatus(status=0, dsn_status="2.0.0", action="relayed", reason="250 ok")

    def script(conn: socket.socket) -> None:
        data = protocol_greeting("delivery_request_protocol")
        for i in range(len(data)):
            conn.sendall(data[i:i + 1])
            time.sleep(0.002)
        conn.recv(65536)  # the request
        data = encode(reply.to_attrs())
        for i in range(0, len(data), 7):
            conn.sendall(data[i:i + 7])
            time.sleep(0.002)

    got = _agent_exchange(tmp_path, script)
    assert (got.status, got.dsn_status, got.reason, got.agent_failed) == \
        (0, "2.0.0", "250 ok", False)


def test_client_defers_when_the_agent_hangs_up_before_replying(tmp_path: Path) -> None:
    def script(conn: socket.socket) -> None:
        conn.sendall(protocol_greeting("delivery_request_protocol"))
        conn.recv(65536)

    got = _agent_exchange(tmp_path, script)
    assert (got.status, got.dsn_status, got.agent_failed) == (1, "4.3.0", True)


def test_a_cancelled_delivery_closes_its_connection(tmp_path: Path) -> None:
    """The qmgr stopping (its tasks cancelled) while an agent has not greeted yet: the
    connection is closed at once - the agent reads the request and then EOF (so it
    delivers nothing: transports.agent) - not left open and watched."""
    listener = _agent_socket(tmp_path, "mute")

    async def run() -> None:
        client = AgentClient(str(tmp_path), greeting_timeout=30, reply_timeout=30)
        task = asyncio.ensure_future(client.deliver("mute", _REQUEST))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        conn, _ = listener.accept()
        got = b""
        with conn:
            conn.settimeout(2)
            while data := conn.recv(65536):
                got += data
        assert got == _REQUEST.encode()

    with listener:
        asyncio.run(run())


def test_the_feed_skips_symlinks_and_other_non_regular_files(tmp_path: Path) -> None:
    """A symbolic link named like a queue id (to a ready queue file outside the queue)
    in incoming/ or deferred/, or a FIFO, is not renamed into active/ nor read through:
    the feed uses lstat, as the scan's lstat + S_ISREG filter did before."""
    env = Env(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    links = {}
    for queue in ("incoming", "deferred"):
        qid = env.submit("a@x.example", [f"r@{queue}.example"])
        target = outside / qid
        os.rename(env.spool.path("incoming", qid), target)
        os.chmod(target, 0o700)  # a ready queue file, but not in the queue
        link = env.spool.path(queue, qid)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(target, link)
        links[qid] = (link, target.read_bytes())
    fifo = env.submit("a@x.example", ["r@fifo.example"])
    os.unlink(env.spool.path("incoming", fifo))
    os.mkfifo(env.spool.path("incoming", fifo), 0o700)
    real = env.submit("a@x.example", ["r@real.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        sched.trigger(b"A")
        await drain(sched)

    run(go())
    assert [r.queue_id for _, r in env.agents.requests] == [real]
    assert not os.listdir(env.spool.queue_path("active"))
    for qid, (link, data) in links.items():
        assert os.path.islink(link) and (outside / qid).read_bytes() == data
    assert os.path.exists(env.spool.path("incoming", fifo))


@pytest.mark.parametrize("outcome", ["sent", "defer"])
def test_a_deferred_file_left_under_other_hashing_settings_is_taken_in(
        tmp_path: Path, outcome: str) -> None:
    """After a reload changed hash_queue_depth (or hash_queue_names), the old qmgr may
    still move a message to deferred/ under its old hashing once the repair has run.
    The scan finds it (it descends into one-character directories); the feed takes it
    from where it was found, so it is delivered, or deferred again under the current
    hashing (where qmgr-ctl finds it) - not skipped silently at every scan."""
    env = Env(tmp_path)
    env.agents.decide = lambda transport, req, rcpt: outcome
    qids = [env.submit("a@x.example", [f"r{i}@d.example"]) for i in range(2)]
    old_layouts = [Spool(env.spool.queue_directory, hash_queue_depth=2),
                   Spool(env.spool.queue_directory, hash_queue_names=())]
    for qid, old in zip(qids, old_layouts, strict=True):
        path = old.move(qid, "incoming", "deferred")
        assert path != env.spool.path("deferred", qid) and os.path.exists(path)
        due = env.clock.now - 10
        os.utime(path, (due, due))

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert sorted(r.queue_id for _, r in env.agents.requests) == sorted(qids)
    assert env.files("active") == []
    if outcome == "sent":
        assert env.files("deferred") == []
    else:
        for qid in qids:
            assert os.path.exists(env.spool.path("deferred", qid))
    left = [p for p in Path(env.spool.queue_path("deferred")).rglob("*") if p.is_file()]
    assert sorted(p.name for p in left) == (sorted(qids) if outcome == "defer" else [])


def test_from_line_quotes_a_sender_local_part_as_the_to_lines_do(tmp_path: Path) -> None:
    """Postfix >= 3.5 logs addresses in external form (info_log_address_format =
    external): ``from=<"a b"@x.example>``, as the agents' ``to=<...>`` lines already
    were; unquoted, a sender ``a>b`` cut the line's field at its ``>``."""
    env = Env(tmp_path)
    env.submit("a b@x.example", ["u@localhost"])
    env.submit("a>b@x.example", ["u@localhost"])
    maillog = tmp_path / "maillog"
    log.setup("qmgr", str(maillog))
    try:
        async def go() -> None:
            sched = env.sched()
            sched.startup()
            await drain(sched)

        run(go())
    finally:
        log.close()
    text = maillog.read_text()
    assert 'from=<"a b"@x.example>, size=' in text
    assert 'from=<"a>b"@x.example>, size=' in text


def _stale_defer_log(env: Env, qid: str, address: str) -> None:
    """A defer log an earlier attempt left for ``qid``: one ``old reason`` entry."""
    statuslog.append(env.spool, "defer", qid, Recipient(address),
                     statuslog.Dsn("4.4.1", "delayed", "old reason"))


def _run_until_idle(env: Env) -> None:
    """A new scheduler, started and stepped until nothing is left to do (drain)."""
    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())


def test_a_stale_defer_log_is_gone_before_the_agent_gets_the_request(tmp_path: Path) -> None:
    """Postfix removes the defer log of an earlier attempt when the message enters the
    active queue; qmgrd removes it just before the first delivery request (issue 8),
    so the agent's new entries are the only ones: never the old reason with them."""
    env = Env(tmp_path)
    env.agents.decide = lambda transport, req, rcpt: "defer"
    qid = env.submit("a@x.example", ["r@d.example"])
    _stale_defer_log(env, qid, "r@d.example")
    seen: list[bool] = []
    env.agents.on_deliver = lambda transport, req: seen.append(
        os.path.exists(env.spool.path("defer", req.queue_id)))
    _run_until_idle(env)
    assert seen == [False]
    assert [reason for _, reason in defer_reasons(env.spool, qid)] == ["try later"]
    assert env.files("deferred") == [qid]


def test_a_stale_defer_log_is_gone_before_the_qmgr_defers_by_itself(tmp_path: Path) -> None:
    """A deferral the qmgr writes itself (``defer_transports``) replaces the old
    reasons as well."""
    env = Env(tmp_path, defer_transports="smtp")
    qid = env.submit("a@x.example", ["r@d.example"])
    _stale_defer_log(env, qid, "r@d.example")
    _run_until_idle(env)
    assert env.agents.requests == []
    assert [reason for _, reason in defer_reasons(env.spool, qid)] == ["deferred transport"]
    assert env.files("deferred") == [qid]


def test_a_stale_defer_log_goes_with_a_delivered_message(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r@d.example"])
    _stale_defer_log(env, qid, "r@d.example")
    _run_until_idle(env)
    assert env.files("active") == env.files("deferred") == []
    assert not os.path.exists(env.spool.path("defer", qid))
