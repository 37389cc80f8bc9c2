"""Issue 4 acceptance: the qmgr's scheduling seen from real SMTP peers.

A whole qmgrd instance (tests.harness.MailSystem) sends to tests/tools/scenario_smtpd.py,
one behaviour per port; ``transport_maps = texthash:<etc>/transport`` routes each test
domain to its port. Checked: slow start (concurrency grows from
initial_destination_concurrency and stays under the destination limit), a dead
destination does not hold back healthy ones and is shown dead by ``qmgr-ctl status
--json``, retry gaps follow Postfix's backoff formula, and expiry (a notice to a local
sender; none for the null sender).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    LogCursor,
    MailSystem,
    MakeSystem,
    inject_many,
    maildir_messages,
    wait_for,
)
from tests.tools.scenario_smtpd import Scenario

SENDER = "alice@mail.test.example"

Setup = Callable[..., tuple[MailSystem, Scenario]]


@pytest.fixture
def scenario(mailsys: MakeSystem, tmp_path: Path) -> Iterator[Setup]:
    """setup(behaviours, **main) -> (started MailSystem, Scenario peer)."""
    made: list[Scenario] = []

    def setup(behaviours: dict[str, str], **main: str) -> tuple[MailSystem, Scenario]:
        scen = Scenario(tmp_path / f"scenario{len(made)}", behaviours)
        made.append(scen)
        ms = mailsys(main=main)
        table = ms.etc / "transport"
        table.write_text(scen.transport_lines())
        ms.write_main(transport_maps=f"texthash:{table}")
        ms.start()
        return ms, scen

    yield setup
    for s in made:
        s.stop()


def msg(tag: str, i: int) -> bytes:
    return f"Subject: {tag} {i}\nMessage-ID: <{tag}{i}@issue4>\n\nbody {i}\n".encode()


def status(ms: MailSystem) -> dict[str, Any]:
    r = ms.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def destination(snap: dict[str, Any], transport: str, name: str) -> dict[str, Any] | None:
    for t in snap["transports"]:
        if t["name"] != transport:
            continue
        for d in t["destinations"]:
            if name in (d["name"], d.get("nexthop")):
                return d  # type: ignore[no-any-return]
    return None


# --------------------------------------------------------------------------- 1
@pytest.mark.timeout(60)
def test_slow_start_seen_at_the_peer(scenario: Setup) -> None:
    ms, scen = scenario({"slow.example": "accept:0.3"},
                        initial_destination_concurrency="2",
                        smtp_destination_concurrency_limit="8",
                        default_process_limit="100")
    inject_many(ms, [(["-i", "-f", SENDER, f"u{i}@slow.example"], msg("s", i))
                     for i in range(60)], parallel=12)
    wait_for(lambda: len(scen.messages("slow.example")) >= 60, 45, "60 messages at the peer")
    st = scen.stats()["slow.example"]
    assert st["messages"] == 60
    assert st["max_concurrent"] <= 8, st["max_concurrent"]
    assert st["max_concurrent"] > 2, st["max_concurrent"]


# --------------------------------------------------------------------------- 2
@pytest.mark.timeout(60)
def test_dead_destination_does_not_hold_back_healthy_ones(scenario: Setup) -> None:
    healthy = [f"ok{i}.example" for i in range(5)]
    behaviours = {"dead.example": "greet421"} | {d: "accept" for d in healthy}
    ms, scen = scenario(behaviours, initial_destination_concurrency="5",
                        smtp_destination_concurrency_failed_cohort_limit="1",
                        minimal_backoff_time="60s", maximal_backoff_time="120s",
                        queue_run_delay="60s")
    inject_many(ms, [(["-i", "-f", SENDER, f"d{i}@dead.example"], msg("d", i))
                     for i in range(50)], parallel=12)

    dead_hop = f"[127.0.0.1]:{scen.ports['dead.example']}"

    def dead_state() -> dict[str, Any] | None:
        d = destination(status(ms), "smtp", dead_hop)
        return d if d is not None and d["state"] == "dead" else None

    d = wait_for(dead_state, 20, "dead.example to be dead in qmgr-ctl status")
    assert isinstance(d, dict)
    assert d["dead_reason"], d
    assert "421" in d["dead_reason"] or "4.3.2" in d["dead_reason"] \
        or "refused" in d["dead_reason"] or "not available" in d["dead_reason"], d
    wait_for(lambda: not ms.queue_files("maildrop", "incoming", "active"), 20,
             "the dead domain's mail to leave the active queue")

    t0 = time.monotonic()
    inject_many(ms, [(["-i", "-f", SENDER, f"h{i}@{dom}"], msg(f"h{dom[:3]}", i))
                     for dom in healthy for i in range(2)])
    wait_for(lambda: all(len(scen.messages(dom)) >= 2 for dom in healthy), 10,
             "healthy mail within 10 s")
    assert time.monotonic() - t0 < 10
    # Failed-cohort rule (limit 1, window 5, feedback 1/window): each failure adds
    # 1/window to fail_cohorts and shrinks the window by 1/window, so the 5th failure
    # kills the destination; up to window-1 (4) attempts may still be in flight then.
    # Hence at most 9 sessions, never one per message (~50).
    sessions = scen.stats()["dead.example"]["sessions"]
    assert 1 <= sessions <= 9, sessions
    assert len(ms.queue_files("deferred")) == 50


# --------------------------------------------------------------------------- 4
@pytest.mark.timeout(60)
def test_expiry_returns_mail_to_local_sender(scenario: Setup) -> None:
    ms, scen = scenario({"late.example": "defer"}, maximal_queue_lifetime="5s",
                        bounce_queue_lifetime="5s", minimal_backoff_time="1s",
                        maximal_backoff_time="2s", queue_run_delay="1s")
    cur = LogCursor(ms)
    r = ms.sendmail("-i", "-f", SENDER, "x@late.example", data=msg("x", 0))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: maildir_messages(ms, "alice"), 30, "a notice in alice's Maildir")
    wait_for(ms.queue_empty, 10, "an empty queue")
    notice = maildir_messages(ms, "alice")[0]
    assert b"x@late.example" in notice
    assert b"<x0@issue4>" in notice
    assert any("status=expired, returned to sender" in line for line in cur.lines())
    assert scen.stats()["late.example"]["sessions"] >= 1


@pytest.mark.timeout(60)
def test_expiry_of_null_sender_mail_sends_nothing(scenario: Setup) -> None:
    ms, scen = scenario({"late.example": "defer"}, maximal_queue_lifetime="1d",
                        bounce_queue_lifetime="5s", minimal_backoff_time="1s",
                        maximal_backoff_time="2s", queue_run_delay="1s")
    cur = LogCursor(ms)
    r = ms.sendmail("-i", "-f", "<>", "y@late.example", data=msg("y", 0))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: any("status=expired" in line for line in cur.lines()), 30,
             "the null-sender message to expire")
    wait_for(ms.queue_empty, 10, "an empty queue")
    assert scen.stats()["late.example"]["sessions"] >= 1
    # nothing was sent anywhere: no Maildir, no bounce attempt
    assert maildir_messages(ms) == []
    assert not [line for line in cur.lines() if "postmaster" in line and "status=sent" in line]
