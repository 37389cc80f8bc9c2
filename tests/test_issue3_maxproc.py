"""Issue 3 acceptance: ``maxproc 2`` on the smtp line is a hard limit.

The bundled master.cf with the smtp service's maxproc set to 2; 200 messages to many
destinations through a sink that delays some DATA answers (``-W data:1:10``: a random
whole number of seconds, mostly 0) so deliveries overlap.  psutil samples the master's
children every ~20 ms while the mail flows: never more than 2 smtp processes (a child
counts from spawn until the master has reaped it), and 2 are seen, so the limit was
reached.  Every message arrives.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING

import pytest

from tests.harness import REPO, Injector, MakeSystem, ProcSampler, message_ids, wait_for

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
