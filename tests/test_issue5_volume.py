"""Issue 5 acceptance 6: 5,000 bounced recipients make one notice, fast, and other mail
keeps flowing meanwhile.

One message from a local sender to 5,000 recipients at ``bad.example``, which
transport_maps sends to the ``error`` transport (``error:5.1.1 no such user``: every
recipient bounces, with no SMTP peer's CPU on this 2-CPU machine in the measurement). The
agents write each request's bounce-log entries with one append, the qmgr asks the bounce
service once when the message is done, and the service writes one notice listing the
5,000 recipients within 10 s of the submission. While the big message is being bounced,
small messages to ``ok.example`` (tests/tools/scenario_smtpd.py, accepting) are
delivered: the qmgr waits neither for the big job nor for the notice.

The 10 s hold on an idle machine of the kind design.md §6 measured (an interpreter start,
``python -S -I -c pass``, takes about 18 ms there). Other engineers' tests share this
2-CPU machine, so the budget is scaled by how much slower such a start is now (measured
before and after the run, the larger factor wins; never below 1).
"""

from __future__ import annotations

import email
import re
import statistics
import subprocess
import time
from collections.abc import Callable

import pytest
from flufl.bounce import scan_message

from tests.harness import PY, Injector, LogCursor, MailSystem, maildir_messages, wait_for
from tests.test_issue5_notices import (  # noqa: F401 - dsn_system is a fixture
    HOST,
    Notice,
    dsn_system,
)
from tests.tools.scenario_smtpd import Scenario

pytestmark = pytest.mark.timeout(180)

N = 5000
SMALL = 5
REASON = "no such user here"
BUDGET = 10.0  # seconds from the submission to the notice in the sender's Maildir
NOMINAL_START = 0.018  # seconds: ``python -S -I -c pass`` on the design.md §6 machine


def slowdown() -> float:
    """How many times slower than nominal an interpreter start is now (at least 1)."""
    times = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([PY, "-S", "-I", "-c", "pass"], check=True, timeout=60)
        times.append(time.perf_counter() - t)
    return max(1.0, statistics.median(times) / NOMINAL_START)


def test_5000_bounced_recipients_make_one_notice(
        dsn_system: Callable[..., tuple[MailSystem, Scenario]]) -> None:  # noqa: F811
    ms, scen = dsn_system({"ok.example": "accept"},
                          extra_routes=f"bad.example error:5.1.1 {REASON}\n")
    cur = LogCursor(ms)
    rcpts = [f"u{i}@bad.example" for i in range(N)]
    data = b"Subject: to many\nMessage-ID: <many@issue5>\n\nhello all\n"
    factor = slowdown()
    budget = BUDGET * factor
    t0 = time.monotonic()
    r = ms.sendmail("-i", "-f", f"alice@{HOST}", *rcpts, data=data)
    assert r.returncode == 0, r.stderr

    def big_active() -> str:
        m = re.search(rf"qmgr\[\d+\]: (\w+): from=<alice@{HOST}>, size=\d+, nrcpt={N} ",
                      "\n".join(cur.lines()))
        return m.group(1) if m else ""

    qid = str(wait_for(big_active, budget, "the big message in the active queue"))
    # other mail, submitted while the big one is being bounced
    inj = Injector(ms, [(["-i", "-f", f"bob@{HOST}", f"s{i}@ok.example"],
                         b"Subject: small %d\n\nsmall\n" % i) for i in range(SMALL)],
                   parallel=5)
    try:
        wait_for(lambda: inj.pump() and maildir_messages(ms, "alice"), budget * 3,
                 "the notice", interval=0.02)
    finally:
        inj.close()
    elapsed = time.monotonic() - t0
    assert not inj.failures, inj.failures[:2]
    factor = max(factor, slowdown())
    assert elapsed < BUDGET * factor, (elapsed, factor)

    wait_for(lambda: len(scen.messages("ok.example")) == SMALL and ms.queue_empty(), 20,
             "the small messages and an empty queue")
    lines = cur.lines()
    (raw,) = maildir_messages(ms, "alice")  # one notice, not 5,000
    assert len([line for line in lines if "notification:" in line]) == 1
    n = Notice.parse(raw)
    assert n.subject == "Undelivered Mail Returned to Sender"
    assert n.report["X-Postfix-Queue-ID"] == qid
    assert sorted(b["Final-Recipient"] for b in n.rcpts) == sorted(f"rfc822; {a}"
                                                                   for a in rcpts)
    assert {b["Action"] for b in n.rcpts} == {"failed"}
    assert {b["Status"] for b in n.rcpts} == {"5.1.1"}
    assert f"<u4321@bad.example>: {REASON}\n" in n.text
    for b in n.rcpts[::250]:
        addr = b["Final-Recipient"]
        assert b["Diagnostic-Code"] == f"X-Postfix; {REASON}", addr
    assert set(scan_message(email.message_from_bytes(raw))) == {a.encode() for a in rcpts}

    # the small messages were delivered while the big one was still being bounced
    bounced = [i for i, line in enumerate(lines)
               if f"{qid}: to=<" in line and "status=bounced" in line]
    assert len(bounced) == N
    sent = [i for i, line in enumerate(lines)
            if "@ok.example>" in line and "status=sent" in line]
    assert len(sent) == SMALL
    assert sent[0] < bounced[-1], "no small message was delivered before the big one ended"
