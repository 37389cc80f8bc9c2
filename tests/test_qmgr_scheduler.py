"""The qmgr scheduler without processes: real spool files, a fake agent client, a fake clock."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from master.config import Config
from qmgrd.delivery import DeliverRequest, DeliverStatus, StatusRequest
from qmgrd.qmgr.client import TransportUnavailable
from qmgrd.qmgr.resolve import Resolver
from qmgrd.qmgr.scheduler import Scheduler
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class FakeAgents:
    """Plays every delivery agent: outcome per recipient from ``decide``."""

    def __init__(self, spool: Spool, decide=None) -> None:
        self.spool = spool
        self.decide = decide or (lambda transport, req, rcpt: "sent")
        self.requests: list[tuple[str, DeliverRequest]] = []
        self.status_requests: list[tuple[str, StatusRequest]] = []
        self.unavailable: set[str] = set()
        self.hop_fail: set[str] = set()
        self.inflight = 0
        self.max_inflight = 0

    async def deliver(self, transport: str, req: DeliverRequest) -> DeliverStatus:
        if transport in self.unavailable:
            raise TransportUnavailable("connection refused")
        self.requests.append((transport, req))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        await asyncio.sleep(0)
        self.inflight -= 1
        if req.nexthop in self.hop_fail:
            for r in req.recipients:
                statuslog.append(self.spool, "defer", req.queue_id,
                                 Recipient(r.address, offset=r.offset),
                                 statuslog.Dsn("4.4.1", "delayed", "connect refused"))
            return DeliverStatus(1, "4.4.1", "", "", "", "", "delayed", "connect refused")
        failed = 0
        qf = QueueFile.open(self.spool, req.queue_name, req.queue_id, lock="sh")
        try:
            for r in req.recipients:
                outcome = self.decide(transport, req, r)
                rcpt = Recipient(r.address, offset=r.offset)
                if outcome == "sent":
                    qf.mark_done(r.offset)
                elif outcome == "bounce":
                    statuslog.append(self.spool, "bounce", req.queue_id, rcpt,
                                     statuslog.Dsn("5.1.1", "failed", "user unknown"))
                    qf.mark_done(r.offset)
                else:
                    statuslog.append(self.spool, "defer", req.queue_id, rcpt,
                                     statuslog.Dsn("4.2.0", "delayed", "try later"))
                    failed = 1
        finally:
            qf.close()
        return DeliverStatus(status=failed)

    async def status_request(self, service: str, req: StatusRequest) -> bool:
        self.status_requests.append((service, req))
        os.unlink(self.spool.path("bounce" if service == "bounce" else "defer", req.queue_id))
        return True


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


def setup(tmp_path: Path, **extra: str) -> tuple[Config, Spool, Cleanup, Clock]:
    cfg = make_cfg(tmp_path, **extra)
    spool = Spool(str(tmp_path / "spool"))
    spool.make_dirs()
    return cfg, spool, Cleanup(cfg, spool), Clock()


def submit(cleanup: Cleanup, sender: str, rcpts: list[str], body: bytes = b"hi\n") -> str:
    return cleanup.submit(Envelope(sender=sender, recipients=[Recipient(r) for r in rcpts]),
                          b"Subject: t\n\n" + body)


async def drain(sched: Scheduler, rounds: int = 2000) -> None:
    for _ in range(rounds):
        worked = sched.step()
        await asyncio.sleep(0)
        if not worked and not sched.tasks:
            return
    raise AssertionError("scheduler did not settle")


def run(coro) -> None:
    asyncio.run(coro)


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
    assert r.resolve("-opt@x.example").transport == "error"


def test_delivers_and_removes(tmp_path: Path) -> None:
    cfg, spool, cleanup, clock = setup(tmp_path)
    qids = [submit(cleanup, "a@x.example", [f"r{i}@d{i % 3}.example", "u@localhost"])
            for i in range(9)]
    agents = FakeAgents(spool)

    async def go() -> None:
        sched = Scheduler(cfg, spool, agents, clock=clock)  # type: ignore[arg-type]
        sched.startup()
        await drain(sched)
        assert not sched.active

    run(go())
    assert not list(spool.scan("incoming")) and not list(spool.scan("active"))
    transports = sorted({t for t, _ in agents.requests})
    assert transports == ["local", "smtp"]
    # recipients of one message to one destination travel together; local is 1 per request
    assert all(len(r.recipients) == 1 for t, r in agents.requests if t == "local")
    delivered = {r.queue_id for _, r in agents.requests}
    assert delivered == set(qids)


def test_recipient_limit_splits_entries(tmp_path: Path) -> None:
    cfg, spool, cleanup, clock = setup(tmp_path, smtp_destination_recipient_limit="2")
    submit(cleanup, "a@x.example", [f"r{i}@big.example" for i in range(5)])
    agents = FakeAgents(spool)

    async def go() -> None:
        sched = Scheduler(cfg, spool, agents, clock=clock)  # type: ignore[arg-type]
        sched.startup()
        await drain(sched)

    run(go())
    assert sorted(len(r.recipients) for _, r in agents.requests) == [1, 2, 2]


def test_deferred_gets_backoff_mtime_and_defer_log(tmp_path: Path) -> None:
    cfg, spool, cleanup, clock = setup(tmp_path)
    qid = submit(cleanup, "a@x.example", ["ok@d.example", "later@d.example"])
    agents = FakeAgents(spool, lambda t, req, r: "defer" if r.address.startswith("later")
                        else "sent")

    async def go() -> None:
        sched = Scheduler(cfg, spool, agents, clock=clock)  # type: ignore[arg-type]
        sched.startup()
        await drain(sched)

    run(go())
    path = spool.path("deferred", qid)
    assert os.path.exists(path)
    # message age is ~0, so the delay is clamped up to minimal_backoff_time (300 s)
    assert os.stat(path).st_mtime == pytest.approx(clock.now + 300, abs=1)
    entries = statuslog.read(spool, "defer", qid)
    assert [r.address for r, _ in entries] == ["later@d.example"]
    qf = QueueFile.open(spool, "deferred", qid, lock=None, readonly=True)
    try:
        assert [r.address for r in qf.recipients] == ["later@d.example"]
    finally:
        qf.close()


def test_deferred_scan_respects_mtime_until_scan_all(tmp_path: Path) -> None:
    cfg, spool, cleanup, clock = setup(tmp_path)
    qid = submit(cleanup, "a@x.example", ["later@d.example"])
    mode = {"v": "defer"}
    agents = FakeAgents(spool, lambda t, req, r: mode["v"])

    async def go() -> None:
        sched = Scheduler(cfg, spool, agents, clock=clock)  # type: ignore[arg-type]
        sched.startup()
        await drain(sched)
        assert os.path.exists(spool.path("deferred", qid))
        n = len(agents.requests)
        mode["v"] = "sent"
        sched.trigger(b"D")
        await drain(sched)
        assert len(agents.requests) == n  # mtime in the future: not yet
        sched.trigger(b"FADI")
        await drain(sched)
        assert len(agents.requests) == n + 1

    run(go())
    assert not os.path.exists(spool.path("deferred", qid))


def test_bounce_asks_bounce_service_and_removes(tmp_path: Path) -> None:
    cfg, spool, cleanup, clock = setup(tmp_path)
    qid = submit(cleanup, "a@x.example", ["bad@d.example", "good@d.example"])
    agents = FakeAgents(spool, lambda t, req, r: "bounce" if r.address.startswith("bad")
                        else "sent")

    async def go() -> None:
        sched = Scheduler(cfg, spool, agents, clock=clock)  # type: ignore[arg-type]
        sched.startup()
        await drain(sched)

    run(go())
    assert [(s, r.queue_id) for s, r in agents.status_requests] == [("bounce", qid)]
    assert not os.path.exists(spool.path("active", qid))


def test_dead_transport_defers_without_attempt(tmp_path: Path) -> None:
    cfg, spool, cleanup, clock = setup(tmp_path)
    q1 = submit(cleanup, "a@x.example", ["r@d.example"])
    agents = FakeAgents(spool)
    agents.unavailable.add("smtp")

    async def go() -> None:
        sched = Scheduler(cfg, spool, agents, clock=clock)  # type: ignore[arg-type]
        sched.startup()
        await drain(sched)
        assert sched.transports["smtp"].dead(clock.now)
        q2 = submit(cleanup, "a@x.example", ["s@e.example"])
        sched.trigger(b"I")
        await drain(sched)
        assert os.path.exists(spool.path("deferred", q2))
        reasons = [d.reason for _, d in statuslog.read(spool, "defer", q2)]
        assert reasons == ["mail transport unavailable"]

    run(go())
    assert os.path.exists(spool.path("deferred", q1))
    assert agents.requests == []


def test_dead_destination_after_failed_cohort(tmp_path: Path) -> None:
    cfg, spool, cleanup, clock = setup(tmp_path)
    for i in range(20):
        submit(cleanup, "a@x.example", [f"r{i}@down.example"])
    agents = FakeAgents(spool)
    agents.hop_fail.add("down.example")

    async def go() -> None:
        sched = Scheduler(cfg, spool, agents, clock=clock)  # type: ignore[arg-type]
        sched.startup()
        await drain(sched)

    run(go())
    # window 5 -> 3 -> 2 -> dead after three failures: at most the first window of 5 (plus
    # none later) was attempted; every other message was deferred with the saved reason
    assert 3 <= len(agents.requests) <= 5
    deferred = list(spool.scan("deferred"))
    assert len(deferred) == 20
    reasons = {d.reason for q in deferred for _, d in statuslog.read(spool, "defer", q)}
    assert reasons == {"connect refused"}


def test_unknown_trigger_bytes_ignored(tmp_path: Path) -> None:
    cfg, spool, cleanup, clock = setup(tmp_path)
    agents = FakeAgents(spool)

    async def go() -> None:
        sched = Scheduler(cfg, spool, agents, clock=clock)  # type: ignore[arg-type]
        sched.startup()
        await drain(sched)
        sched.trigger(b"\x00zzz\xffI")
        qid = submit(cleanup, "a@x.example", ["r@d.example"])
        sched.trigger(b"I")
        await drain(sched)
        assert not os.path.exists(spool.path("incoming", qid))

    run(go())


def test_corrupt_file_moved_to_corrupt(tmp_path: Path) -> None:
    cfg, spool, _, clock = setup(tmp_path)
    bad = spool.path("incoming", "4SVLCh0sf8z9HdB")
    with open(bad, "wb") as f:
        f.write(b"not a queue file")
    os.chmod(bad, 0o700)
    agents = FakeAgents(spool)

    async def go() -> None:
        sched = Scheduler(cfg, spool, agents, clock=clock)  # type: ignore[arg-type]
        sched.startup()
        await drain(sched)

    run(go())
    assert os.path.exists(spool.path("corrupt", "4SVLCh0sf8z9HdB"))


def test_double_bounce_recipient_discarded(tmp_path: Path) -> None:
    cfg, spool, cleanup, clock = setup(tmp_path)
    qid = submit(cleanup, "", ["double-bounce@mail.test.example"])
    agents = FakeAgents(spool)

    async def go() -> None:
        sched = Scheduler(cfg, spool, agents, clock=clock)  # type: ignore[arg-type]
        sched.startup()
        await drain(sched)

    run(go())
    assert agents.requests == []
    assert not os.path.exists(spool.path("active", qid))
