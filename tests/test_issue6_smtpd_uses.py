"""Issue 6 (fresh-eyes finding): an smtpd process that serves several sessions at once
(smtpd_process_busy_sessions > 1, the default 5) tells the master how many sessions it
has served, so that ``qmgr-master status`` shows its uses and a crash after it served
clients is a crash, not "bad command startup -- throttling".

Before: the master counts a use only at a busy -> idle transition, and a process of the
default model never reaches busy unless 5 clients are connected at once; its uses stayed
0 however many sessions it served, and a kill -9 of it (OOM killer, an operator's kill
of a wedged process) throttled the whole SMTP service for service_throttle_time (60 s):
clients waited in the listen queue for a minute.
"""

from __future__ import annotations

import json
import time

import psutil
import pytest

from tests.harness import MakeSystem, wait_for
from tests.tools.smtpd_system import smtp, smtpd_pids, start

pytestmark = pytest.mark.timeout(120)

SENDER = "alice@mail.test.example"
MAIN = {"smtpd_error_sleep_time": "0s", "defer_transports": "smtp"}


def _uses(ms, pids: set[int]) -> dict[int, int]:  # type: ignore[no-untyped-def]
    """The uses ``qmgr-master status --json`` shows for each of ``pids``."""
    out = ms.master("status", "--json")
    assert out.returncode == 0, out.stderr
    return {row["pid"]: int(row["uses"]) for row in json.loads(out.stdout)["processes"]
            if row["pid"] in pids}


@pytest.mark.parametrize("busy_sessions", ["1", "5"])
def test_sessions_count_as_uses_and_a_killed_smtpd_does_not_throttle(
        mailsys: MakeSystem, busy_sessions: str) -> None:
    ms, port = start(mailsys, dict(MAIN, smtpd_process_busy_sessions=busy_sessions))
    for i in range(3):  # one client at a time: never 5 at once
        with smtp(port) as s:
            assert s.sendmail(SENDER, ["bob@mail.test.example"],
                              f"Subject: {i}\r\n\r\nx\r\n".encode()) == {}
    # start()'s greeting probe and these three sessions: 4 sessions in all (with 5, one
    # process serves them all; with 1, the master may have started a second)
    pids = smtpd_pids(ms)
    wait_for(lambda: sum(_uses(ms, pids).values()) >= 4, 10,
             "the smtpd processes to report their sessions as uses")
    uses = _uses(ms, pids)
    pid = max(uses, key=lambda p: uses[p])
    psutil.Process(pid).kill()
    wait_for(lambda: f"pid {pid} killed by signal 9" in ms.log(), 20, "the kill logged")
    t0 = time.monotonic()
    with smtp(port, timeout=30) as s:  # the service is not throttled: served at once
        assert s.noop()[0] == 250
    assert time.monotonic() - t0 < 10
    assert "bad command startup -- throttling" not in ms.log()
