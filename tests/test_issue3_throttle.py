"""Issue 3 acceptance: a service whose command fails at start-up is throttled.

master.cf gets a ``failsvc`` unix service running tests.services.fail_agent (its pre_jail
raises, so every child exits 1 before its first request) with a 1-second wakeup, so the
master keeps trying to start it.  With service_throttle_time = 5s, over 10 seconds it
may be spawned at most twice per throttle period (<= 4), the master stays up, and the
other services deliver mail meanwhile (postfix.md §3.5: "bad command startup --
throttling").
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING

import pytest

from tests.harness import (
    REPO,
    Injector,
    LogCursor,
    MakeSystem,
    maildir_messages,
    message_ids,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Peers

pytestmark = pytest.mark.timeout(60)

THROTTLE = 5
WINDOW = 10.0
FAIL_LINE = "failsvc   unix  -       -       n       1       -       tests.services.fail_agent\n"


def test_failing_service_is_throttled_and_the_rest_keeps_working(
        mailsys: MakeSystem, peers: Peers) -> None:
    sink = peers.sink()
    cf = (REPO / "etc" / "master.cf").read_text() + FAIL_LINE
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{sink.port}",
                       "service_throttle_time": f"{THROTTLE}s"}, master_cf=cf)
    cursor = LogCursor(ms)
    t0 = time.monotonic()
    ms.start()
    tag = f"thr-{uuid.uuid4().hex[:10]}.test"
    jobs = []
    for i in range(20):
        rcpt = f"u{i % 3}@localhost" if i % 2 else f"r{i}@remote.example"
        jobs.append((["-i", "-f", "alice@mail.test.example", rcpt],
                     f"Subject: {i}\nMessage-ID: <m{i}@{tag}>\n\nbody {i}\n".encode()))
    inj = Injector(ms, jobs, parallel=4)
    first_seen: dict[int, float] = {}  # failing child pid -> when the test first saw it
    fatal = re.compile(r"fatal: failsvc: this service cannot start")
    delivered_at: list[float] = []

    def delivered() -> set[str]:
        return set(message_ids(sink.messages(), tag) + message_ids(maildir_messages(ms), tag))

    def watch() -> bool:
        inj.pump()
        now = time.monotonic()
        if not delivered_at and len(delivered()) == len(jobs):
            delivered_at.append(now - t0)
        for pid, msg in cursor.by("fail_agent"):
            if fatal.search(msg):
                first_seen.setdefault(pid, now)
        assert not ms.proc_dead(), "the master died"
        return now - t0 >= WINDOW

    try:
        wait_for(watch, WINDOW + 5, "the observation window", interval=0.05)
        inj.finish(30)
    finally:
        inj.close()
    assert not inj.failures, inj.failures[:3]
    in_window = sorted(t - t0 for t in first_seen.values() if t - t0 <= WINDOW)
    print(f"failsvc failed starts seen at {[round(t, 1) for t in in_window]} s")

    def exits() -> list[str]:
        return [line for line in cursor.lines()
                if "process tests.services.fail_agent pid" in line and "exit status 1" in line]

    def reaped() -> set[int]:
        return {int(m) for line in exits() for m in re.findall(r"pid (\d+) exit", line)}

    # a child's fatal line comes before its exit, the master's line after it reaped it:
    # the last start seen may end the window with its exit not yet logged
    wait_for(lambda: reaped() >= set(first_seen), 20, "the master to report every failed start")
    lines = cursor.lines()
    master_exits = exits()
    throttled = [line for line in lines if "failsvc: bad command startup -- throttling" in line]
    assert 2 <= len(in_window) <= 2 * WINDOW / THROTTLE, (in_window, master_exits)
    assert len(throttled) >= 1
    # the master reaped and reported each failed start (none missed, none invented)
    assert len(master_exits) >= len(in_window)
    # the master is up and the other services delivered all mail within the window
    assert ms.master("status").returncode == 0
    assert delivered() == {f"m{i}" for i in range(20)}
    assert delivered_at and delivered_at[0] <= WINDOW, delivered_at
