"""Issue 4 acceptance: retry timing seen from a real SMTP peer.

A message to a domain whose peer (tests/tools/scenario_smtpd.py) answers 450 to every
RCPT, with minimal_backoff_time=2s, maximal_backoff_time=8s, queue_run_delay=1s: the gaps
between the attempts (session start times at the peer) follow Postfix's backoff, the
message's age clamped to [minimal, maximal] backoff, plus at most one queue_run_delay.
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.harness import ScenarioSetup as Setup
from tests.harness import wait_for
from tests.test_issue4_scheduling import SENDER, msg


# --------------------------------------------------------------------------- 3
@pytest.mark.timeout(60)
def test_retry_gaps_follow_backoff(scenario: Setup) -> None:
    qrd, lo, hi = 1.0, 2.0, 8.0
    ms, scen = scenario({"retry.example": "defer"}, minimal_backoff_time="2s",
                        maximal_backoff_time="8s", queue_run_delay="1s")
    t_submit = time.time()
    r = ms.sendmail("-i", "-f", SENDER, "r@retry.example", data=msg("r", 0))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: scen.stats()["retry.example"]["sessions"] >= 6, 45, "6 attempts")
    times = scen.stats()["retry.example"]["session_times"][:6]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    slack = 1.5
    for k, (t_prev, gap) in enumerate(zip(times, gaps, strict=False)):
        age = t_prev - t_submit
        expect = min(max(age, lo), hi)
        # at least the backoff less up to 1 s (the next-attempt time is stored as a whole
        # second file mtime, as in Postfix), at most backoff + one queue_run_delay + slack
        assert gap >= expect - 1.1, (k, gaps, times)
        assert gap <= expect + qrd + slack, (k, gaps, times)
    # the growth itself: the later gaps reach the cap, the first one does not
    assert gaps[0] < 4.5, gaps
    assert gaps[2] > gaps[0] + 1, gaps
    assert gaps[-1] >= hi - 1.1, gaps


