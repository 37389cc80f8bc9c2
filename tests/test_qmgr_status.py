"""The window onto the scheduler: the snapshot document, the ``private/qmgr-status`` socket,
``qmgr-ctl status [--json]``, and the real qmgr serving it under the master."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from qmgrd.qmgr.status import StatusServer, format_text
from tests.test_qmgr_scheduler import Env, drain, run

PY = sys.executable


def test_snapshot_shows_windows_dead_and_suspended_destinations(tmp_path: Path) -> None:
    env = Env(tmp_path, local_destination_rate_delay="60s", minimal_backoff_time="300s")
    for i in range(5):
        env.submit("a@x.example", [f"r{i}@down.example"])
    env.submit("a@x.example", ["x@ok.example", "y@ok.example"])
    env.submit("a@x.example", ["u@localhost"])
    env.agents.hold = True
    snap: dict[str, Any] = {}
    t0 = 0.0

    async def go() -> None:
        nonlocal snap, t0
        t0 = env.clock.now
        sched = env.sched()
        sched.startup()
        await drain(sched)
        down = [i for i, (_, r) in enumerate(env.agents.requests)
                if r.nexthop == "down.example"]
        for i in sorted(down[:3], reverse=True):  # three site failures: dead
            event, box = env.agents.waiting.pop(i)
            box.append("hopfail")
            event.set()
        local = next(i for i, (t, _) in enumerate(env.agents.requests) if t == "local")
        local -= sum(1 for i in down[:3] if i < local)
        event, box = env.agents.waiting.pop(local)
        box.append("sent")
        event.set()
        await drain(sched)
        snap = json.loads(json.dumps(sched.snapshot()))  # plain JSON data
        env.agents.release(len(env.agents.waiting))
        await drain(sched)

    run(go())
    now = env.clock.now
    assert snap["started"] == t0 and snap["time"] >= t0  # when the qmgr started, not a flag
    # 3 down.example messages failed (deferred), the local one was delivered
    assert snap["active"]["messages"] == 3 and snap["active"]["recipients"] == 4
    assert snap["active"]["message_limit"] == 20000
    assert snap["scans"]["incoming"]["busy"] is False
    transports = {t["name"]: t for t in snap["transports"]}
    smtp = transports["smtp"]
    dests = {d["name"]: d for d in smtp["destinations"]}
    assert (dests["down.example"]["state"], dests["down.example"]["window"]) == ("dead", 0)
    assert dests["down.example"]["dead_until"] == now + 300
    assert (dests["down.example"]["dead_status"], dests["down.example"]["dead_reason"]) == (
        "4.4.1", "connect refused")
    assert dests["down.example"]["busy"] == 2  # still in flight when it died
    assert (dests["ok.example"]["state"], dests["ok.example"]["window"],
            dests["ok.example"]["busy"], dests["ok.example"]["todo"]) == ("ready", 5, 1, 0)
    assert smtp["inflight"] == 3 and smtp["max_inflight"] == 100
    # every entry was handed out, so no job is left on the lists
    assert smtp["active"] == {"jobs": 0, "messages": 3, "recipients": 4}
    assert dests["ok.example"]["recipients"] == 2
    local = transports["local"]
    (ldest,) = local["destinations"]
    assert (ldest["name"], ldest["state"], ldest["window"]) == (
        "u@mail.test.example", "suspended", -1)
    assert ldest["suspended_until"] == now + 60
    assert local["rate_delay"] == {"destination": 60, "transport": 0, "locked_until": 0.0}
    text = format_text(snap)
    assert "transport smtp: 3 in flight (max 100)" in text
    assert "down.example" in text and "4.4.1 connect refused" in text
    assert "suspended" in text and "u@mail.test.example" in text


def write_main_cf(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {tmp_path / 'spool'}\n")
    return etc


async def ctl(etc: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "qmgrd.ctl.cli", "-c", str(etc), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_status_socket_and_qmgr_ctl_status(tmp_path: Path) -> None:
    env = Env(tmp_path)
    etc = write_main_cf(tmp_path)
    path = str(tmp_path / "spool" / "private" / "qmgr-status")

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        env.submit("a@x.example", ["r@d.example"])
        env.agents.hold = True
        sched.trigger(b"I")
        await drain(sched)
        server = StatusServer(path, sched.snapshot)
        assert await server.start()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        code, out, err = await ctl(etc, "status", "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["pid"] == os.getpid()
        (smtp,) = doc["transports"]
        assert smtp["destinations"][0]["name"] == "d.example"
        assert smtp["destinations"][0]["busy"] == 1
        code, out, err = await ctl(etc, "status")
        assert code == 0, err
        assert out.startswith(f"qmgr pid {os.getpid()}: 1 messages, 1 recipients")
        assert "transport smtp: 1 in flight" in out
        await server.close()
        assert not os.path.exists(path)
        code, out, err = await ctl(etc, "status")
        assert code == 69
        assert err.startswith("qmgr-ctl: fatal: the qmgr is not running (nothing listens "
                              f"on {os.path.abspath(path)}): is the mail system up?"), err
        env.agents.release(1)
        await drain(sched)

    run(go())


def test_status_server_replaces_a_stale_socket_and_reports_failure(tmp_path: Path) -> None:
    env = Env(tmp_path)
    stale = tmp_path / "spool" / "private" / "qmgr-status"
    stale.write_text("left over")

    async def go() -> None:
        server = StatusServer(str(stale), lambda: {"ok": 1})
        assert await server.start()
        reader, writer = await asyncio.open_unix_connection(str(stale))
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert json.loads(data) == {"ok": 1}
        newer = StatusServer(str(stale), lambda: {"ok": 2})  # a new qmgr after a reload
        assert await newer.start()
        await server.close()  # the old one leaves the new socket alone
        reader, writer = await asyncio.open_unix_connection(str(stale))
        assert json.loads(await reader.read()) == {"ok": 2}
        writer.close()
        await writer.wait_closed()
        await newer.close()
        assert not stale.exists()
        bad = StatusServer(str(tmp_path / "no" / "such" / "dir"), dict)
        assert not await bad.start()

    run(go())
    assert env.files("active") == []


@pytest.mark.timeout(60)
def test_running_qmgr_serves_status(mailsys: Any) -> None:
    from tests.harness import wait_for

    ms = mailsys()
    ms.start()
    r = ms.sendmail("user@localhost", data=b"Subject: s\n\nbody\n")
    assert r.returncode == 0, r.stderr
    sock = ms.spool / "private" / "qmgr-status"
    wait_for(sock.exists, 20, "private/qmgr-status")
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    qmgr = ms.children("qmgr")[0]
    assert st.st_uid == qmgr.uids().effective  # made by the qmgr itself
    r = ms.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["pid"] == qmgr.pid
    assert {"active", "scans", "transports", "next_deferred_scan"} <= set(doc)
    r = ms.ctl("status")
    assert r.returncode == 0 and r.stdout.startswith(f"qmgr pid {qmgr.pid}:")
