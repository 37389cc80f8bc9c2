"""Issue 3 acceptance: ``maxproc 2`` on the smtp line is a hard limit.

The bundled master.cf with the smtp service's maxproc set to 2; 200 messages to many
destinations through a sink that delays some DATA answers (``-W data:1:10``: a random
whole number of seconds, mostly 0) so deliveries overlap.  psutil samples the master's
children every ~20 ms while the mail flows: never more than 2 smtp processes (a child
counts from spawn until the master has reaped it), and 2 are seen, so the limit was
reached.  Every message arrives.

With the default smtp_process_delivery_limit (50 deliveries per process) the same
maxproc 2 caps the deliveries in flight (the qmgr's per-transport limit), not the
processes: an aiosmtpd peer whose DATA takes 0.2 s sees at most 2 transactions at once,
and 2 are seen; one smtp process carries them all.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from aiosmtpd.controller import Controller

from qmgrd.trigger import send_trigger
from tests.harness import (
    REPO,
    Injector,
    MakeSystem,
    ProcSampler,
    fill_deferred,
    free_port,
    message_ids,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Peers

pytestmark = pytest.mark.timeout(120)

SMTP_LINE = re.compile(r"^smtp(\s+)unix(\s+\S+){4}\s+\S+(\s+smtp)\s*$", re.MULTILINE)


def test_smtp_maxproc_2_is_never_exceeded(mailsys: MakeSystem, peers: Peers) -> None:
    sink = peers.sink("-W", "data:1:10")
    # one delivery per process (smtp_process_delivery_limit=1), so that the deliveries
    # need more processes than maxproc allows: the master must hold the line at 2
    cf, n = SMTP_LINE.subn("smtp      unix  -       -       n       -       2       smtp"
                           "\n  -o smtp_process_delivery_limit=1",
                           (REPO / "etc" / "master.cf").read_text())
    assert n == 1, "the bundled master.cf has no smtp unix line to edit"
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{sink.port}"}, master_cf=cf)
    ms.start()
    tag = f"maxproc-{uuid.uuid4().hex[:10]}.test"
    jobs = [(["-i", "-f", "alice@mail.test.example", f"r{i}@d{i % 20}.example"],
             f"Subject: {i}\nMessage-ID: <m{i}@{tag}>\n\nbody {i}\n".encode())
            for i in range(200)]
    inj = Injector(ms, jobs, parallel=8)
    sampler = ProcSampler(ms.master_pid, "smtp")
    over: list[tuple[float, int]] = []
    t0 = time.monotonic()
    next_count = [t0]

    def step() -> bool:
        inj.pump()
        now = time.monotonic()
        count = sampler.sample()
        if count > 2:
            over.append((round(now - t0, 2), count))
        if now < next_count[0]:
            return False
        next_count[0] = now + 0.5  # counting the sink's dumps is the slow part
        return bool(sink.count() >= 200)

    try:
        wait_for(step, 100, "200 messages at the sink", interval=0.01)
    finally:
        inj.close()
    assert not inj.failures, inj.failures[:3]
    print(f"{sampler.samples} samples in {time.monotonic() - t0:.1f}s, at most "
          f"{sampler.max_seen} smtp processes, {len(sampler.pids)} smtp pids")
    assert not over, f"more than 2 smtp processes at (s, count): {over[:10]}"
    assert sampler.max_seen == 2, "the limit was never reached: the test proves nothing"
    want = {f"m{i}" for i in range(200)}
    wait_for(lambda: set(message_ids(sink.messages(), tag)) == want, 10,
             "every Message-ID at the sink")


class SlowPeer:
    """aiosmtpd handler: each DATA takes ``delay`` s; counts the transactions (MAIL to
    the end of DATA) and the DATA phases open at once, and keeps every message."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.txn = self.most_txn = 0
        self.data = self.most_data = 0
        self.messages: list[bytes] = []

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        self.txn += 1
        self.most_txn = max(self.most_txn, self.txn)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data += 1
        self.most_data = max(self.most_data, self.data)
        try:
            await asyncio.sleep(self.delay)
            self.messages.append(bytes(envelope.original_content))
        finally:
            self.data -= 1
            self.txn -= 1
        return "250 2.0.0 Ok: queued"


@pytest.fixture
def slow_peer() -> Iterator[tuple[SlowPeer, int]]:
    handler = SlowPeer(0.2)
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, decode_data=False,
                     ready_timeout=10)
    ctl.start()
    try:
        yield handler, port
    finally:
        ctl.stop()


def test_smtp_maxproc_2_caps_deliveries_of_one_multi_process(
        mailsys: MakeSystem, slow_peer: tuple[SlowPeer, int]) -> None:
    peer, port = slow_peer
    n = 30
    cf, count = SMTP_LINE.subn("smtp      unix  -       -       n       -       2       smtp",
                               (REPO / "etc" / "master.cf").read_text())
    assert count == 1, "the bundled master.cf has no smtp unix line to edit"
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{port}"}, master_cf=cf)
    assert "smtp_process_delivery_limit" not in (ms.etc / "main.cf").read_text()
    ms.start()
    tag = f"multi-{uuid.uuid4().hex[:10]}.test"
    fill_deferred(ms, "alice@mail.test.example",
                  [f"r{i}@d{i % 10}.example" for i in range(n)], tag=tag, age=0)
    assert send_trigger(str(ms.spool / "public" / "qmgr"), b"D")
    wait_for(lambda: len(peer.messages) >= n, 60, f"{n} messages at the peer")
    wait_for(ms.queue_empty, 30, "an empty queue")
    print(f"at most {peer.most_txn} transactions, {peer.most_data} DATA phases at once")
    assert peer.most_txn <= 2, f"{peer.most_txn} deliveries at once with maxproc 2"
    assert peer.most_data == 2, "never 2 deliveries at once: the test proves nothing"
    got = message_ids(peer.messages, tag)
    assert got == Counter({f"{tag}{i}": 1 for i in range(n)}), "each message exactly once"
    log = ms.log()
    assert log.count("status=sent") == n and "status=deferred" not in log
    pids = {int(pid) for pid in re.findall(r"smtp\[(\d+)\]: \w+: to=<", log)}
    ms.stop()
    assert pids
    assert len(pids) == 1, f"the deliveries were made by smtp processes {pids}"
