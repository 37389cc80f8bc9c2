"""qmgr-ctl delete/hold/requeue report the qmgr's verdict, not just "the request went in".

A change of a message in the active queue waits for its delivery in flight; when every
recipient is delivered meanwhile the change is moot (the qmgr logs ``delete moot`` /
``hold not done``). Checked: the qmgr's control socket carries that verdict back
(``"verdict": true`` -> ``delivered``, also for a delete; without it a moot delete is still
``done``, as for older callers); the CLI neither counts such a message nor prints
``removed`` for it (``<id>: not removed: delivered meanwhile``, exit 0); and, on a running
system with a slow peer, ``delete`` of a message in flight that gets delivered says so.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from qmgrd.ctl import admin as ctl_admin
from qmgrd.qmgr import control as qmgr_control
from qmgrd.qmgr.admin import DONE
from qmgrd.qmgr.control import Control
from tests.harness import MailSystem, ScenarioSetup, wait_for
from tests.test_ctl_hardening import Q
from tests.test_ctl_qmgr_control import control, counts_are_zero, started
from tests.test_qmgr_scheduler import Env, drain, run

SENDER = "alice@mail.test.example"


# --------------------------------------------------------------------------- qmgr side
async def _act_while_delivered(env: Env, ctl: Control, qid: str, action: str,
                               **extra: Any) -> dict[str, Any]:
    """Send ``act`` (waiting up to 5 s) while the delivery in flight ends "sent"."""
    task = asyncio.create_task(ctl.handle({"cmd": "act", "action": action, "ids": [qid],
                                           "wait": 5, **extra}))
    await asyncio.sleep(0)  # the request takes the message out of scheduling
    env.agents.release(1, "sent")
    await drain(ctl.sched)
    return await asyncio.wait_for(task, 10)


@pytest.mark.parametrize(("action", "verdict", "want"), [
    ("delete", True, "delivered"), ("delete", False, DONE),
    ("hold", True, "delivered"), ("requeue", True, "delivered")])
def test_qmgr_reports_a_moot_change(tmp_path: Path, action: str, verdict: bool,
                                    want: str) -> None:
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r@one.example"])
    env.agents.hold = True

    async def go() -> None:
        sched, ctl = await started(env)
        assert len(env.agents.waiting) == 1
        extra = {"verdict": True} if verdict else {}
        reply = await _act_while_delivered(env, ctl, qid, action, **extra)
        assert reply == {"results": {qid: want}}
        counts_are_zero(sched)

    run(go())
    assert not env.files("active") and not env.files("hold") and not env.files("incoming")


def test_a_hold_after_a_pending_delete_says_the_delete_is_pending(tmp_path: Path) -> None:
    """A hold (or requeue) of a message whose delete waits for its delivery in flight is
    not answered "done" (the CLI would print "placed on hold" for mail being removed)."""
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r@one.example"])
    env.agents.hold = True

    async def go() -> None:
        sched, ctl = await started(env)
        first = await ctl.handle({"cmd": "act", "action": "delete", "ids": [qid]})
        assert first == {"results": {qid: "pending"}}
        for action in ("hold", "requeue"):
            reply = await ctl.handle({"cmd": "act", "action": action, "ids": [qid],
                                      "verdict": True})
            assert reply == {"results": {qid: "a delete of it is pending"}}
        env.agents.release(1, "defer")
        await drain(sched)

    run(go())
    assert not env.files("active") and not env.files("hold") and not env.files("deferred")


def test_qmgr_refuses_a_bad_verdict_flag(tmp_path: Path) -> None:
    env = Env(tmp_path)

    async def go() -> None:
        sched = env.sched()
        reply = await control(env, sched).handle(
            {"cmd": "act", "action": "delete", "ids": [], "verdict": "yes"})
        assert "error" in reply

    run(go())


# --------------------------------------------------------------------------- CLI side
@pytest.mark.parametrize(("action", "text", "summary"), [
    ("delete", "not removed", "Deleted: 0 messages"),
    ("hold", "not placed on hold", "Placed on hold: 0 messages"),
    ("requeue", "not requeued", "Requeued: 0 messages")])
def test_cli_does_not_count_a_moot_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          action: str, text: str, summary: str) -> None:
    q = Q(tmp_path)
    moot, done = q.submit("active"), q.submit("active")
    sent: list[dict[str, Any]] = []

    def request(path: str, req: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        if req["cmd"] == "act":
            sent.append(req)
            return {"results": {moot: "delivered", done: DONE}}
        return {"pid": 1, "restarting": False}

    monkeypatch.setattr(qmgr_control, "request", request)
    code, out, err = q.run(action, moot, done)
    assert code == 0, err
    assert sent and sent[0]["verdict"] is True
    assert out.splitlines() == [f"{moot}: {text}: delivered meanwhile",
                                f"{done}: {ctl_admin.DONE_TEXT[action]}"]
    assert summary.replace("0 messages", "1 message") in err


# --------------------------------------------------------------------------- end to end
@pytest.mark.timeout(60)
def test_delete_of_mail_delivered_during_the_wait(scenario: ScenarioSetup) -> None:
    ms: MailSystem
    ms, scen = scenario({"slow.example": "accept"})
    sent = ms.sendmail("-i", "-f", SENDER, "x@slow.example",
                       data=b"Subject: slow\nMessage-ID: <slow@verdict>\n"
                            b"X-Scenario-Delay: 5\n\nbody\n")
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: scen.stats()["slow.example"]["current"] >= 1, 20,
             "the slow delivery to start")
    (path,) = ms.queue_files("active")
    qid = path.name
    r = ms.ctl("delete", "--wait", "30", qid)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{qid}: not removed: delivered meanwhile\n"
    assert "Deleted: 0 messages" in r.stderr
    assert scen.messages("slow.example")  # it was delivered
    wait_for(lambda: f"{qid}: delete moot" in ms.log(), 10, "the qmgr's log line")
    assert not os.path.exists(path)
