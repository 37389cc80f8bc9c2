"""The qmgr's side of qmgr-ctl (qmgrd.qmgr.control, .admin, .suspend) without processes:
real spool files, fake agents that can hold a delivery open, a fake clock.

Checked: hold/delete/requeue of active mail wait for the delivery in flight and never
lose a count; files the qmgr does not hold are changed under a lock; suspensions defer
without attempts, bring the retry time forward and expire by the clock; the control
socket answers."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from master import log
from qmgrd.delivery import DeliverStatus
from qmgrd.qmgr import suspend as susp
from qmgrd.qmgr.admin import ABSENT, BUSY, DONE, apply_file
from qmgrd.qmgr.control import Control, ControlServer, request
from qmgrd.qmgr.scheduler import Scheduler
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import Recipient
from qmgrd.spool.message import QueueFile
from tests.harness import require_tool
from tests.test_qmgr_scheduler import Env, drain, run


def counts_are_zero(sched: Scheduler) -> None:
    """Nothing left in memory: no message, recipient, entry, job or slot leak."""
    assert not sched.active.messages
    assert sched.active.rcpt_count == 0
    for t in sched.transports.values():
        assert t.inflight == 0
        assert all(not q.todo and not q.busy for q in t.queues.values())
        assert not t.jobs.sched
        assert t.jobs.rcpt_unused == t.params.rcpt_pool  # every slot is back


def control(env: Env, sched: Scheduler, restarts: list[int] | None = None) -> Control:
    box = restarts if restarts is not None else []
    return Control(sched, env.spool.queue_directory, lambda: box.append(1))


async def started(env: Env) -> tuple[Scheduler, Control]:
    """A scheduler with its control, started and run until nothing more can happen now
    (deliveries held by ``env.agents`` stay in flight)."""
    sched = env.sched()
    ctl = control(env, sched)
    sched.startup()
    await drain(sched)
    return sched, ctl


def test_delete_waits_for_the_delivery_in_flight(tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r1@one.example", "r2@two.example"])
    other = env.submit("a@x.example", ["r3@three.example"])
    env.agents.hold = True

    async def go() -> None:
        sched, ctl = await started(env)
        assert len(env.agents.waiting) == 3  # every delivery is in flight
        statuslog.append(env.spool, "defer", qid, Recipient("r1@one.example"),
                         statuslog.Dsn("4.2.0", "delayed", "earlier attempt"))
        assert ctl.act([qid], "delete") == {qid: "pending"}
        assert os.path.exists(env.spool.path("active", qid))  # the agent may still read it
        env.agents.release(3, "defer")
        await drain(sched)
        assert ctl._result(qid) == DONE
        counts_are_zero(sched)

    run(go())
    assert not os.path.exists(env.spool.path("active", qid))
    assert not os.path.exists(env.spool.path("defer", qid))  # logs go with the message
    assert env.files("deferred") == [other]  # the other message is untouched
    assert f"{qid}: removed" in capfd.readouterr().err  # the log (stderr: not set up)


def test_hold_takes_waiting_entries_out_and_keeps_every_recipient(tmp_path: Path) -> None:
    env = Env(tmp_path, smtp_destination_recipient_limit="2",
              smtp_destination_concurrency_limit="1", initial_destination_concurrency="1")
    qid = env.submit("a@x.example", [f"r{i}@one.example" for i in range(6)])
    env.agents.hold = True

    async def go() -> None:
        sched, ctl = await started(env)
        assert len(env.agents.waiting) == 1  # one entry in flight, two waiting
        assert sched.active.rcpt_count == 6
        assert ctl.act([qid], "hold") == {qid: "pending"}
        assert sched.active.rcpt_count == 2  # the waiting ones are gone, counts kept
        env.agents.release(1, "sent")
        await drain(sched)
        counts_are_zero(sched)

    run(go())
    assert env.files("hold") == [qid]
    assert len(env.agents.requests) == 1  # no attempt after the hold
    with QueueFile.open(env.spool, "hold", qid, lock=None, readonly=True) as qf:
        assert (len(qf.recipients), qf.done_count) == (4, 2)  # 4 left, 2 delivered


def test_hold_of_mail_delivered_meanwhile_removes_it(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r@one.example"])
    env.agents.hold = True

    async def go() -> None:
        sched, ctl = await started(env)
        assert ctl.act([qid], "hold") == {qid: "pending"}
        env.agents.release(1, "sent")
        await drain(sched)
        assert ctl._result(qid) == "delivered"
        counts_are_zero(sched)

    run(go())
    assert not env.files("hold") and not env.files("active")


def test_requeue_puts_it_back_to_incoming_and_it_is_routed_again(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r@one.example"])
    env.agents.hold = True

    async def go() -> None:
        sched, ctl = await started(env)
        assert ctl.act([qid], "requeue") == {qid: "pending"}
        env.agents.release(1, "defer")
        env.agents.hold = False
        await drain(sched)  # back to incoming, scanned, delivered again
        counts_are_zero(sched)

    run(go())
    assert [r.queue_id for _, r in env.agents.requests] == [qid, qid]
    assert not env.files("deferred") and not env.files("incoming")


def test_unread_recipients_stay_in_the_file(tmp_path: Path) -> None:
    env = Env(tmp_path, qmgr_message_recipient_limit="10",
              qmgr_message_recipient_minimum="2", smtp_recipient_limit="2",
              smtp_destination_recipient_limit="1")
    qid = env.submit("a@x.example", [f"r{i}@one.example" for i in range(30)])
    env.agents.hold = True

    async def go() -> None:
        sched, ctl = await started(env)
        msg = sched.active.messages[qid]
        assert msg.rcpt_offset > 0  # not every recipient was read
        ctl.act([qid], "hold")
        env.agents.release(len(env.agents.waiting), "sent")
        await drain(sched)
        counts_are_zero(sched)

    run(go())
    assert env.files("hold") == [qid]


def test_files_the_qmgr_does_not_hold(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r@one.example"])
    env.spool.move(qid, "incoming", "active")

    async def go() -> None:
        sched = env.sched()
        ctl = control(env, sched)
        fd = os.open(env.spool.path("active", qid), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # an agent of an earlier qmgr delivers it
            assert ctl.act([qid], "hold") == {qid: BUSY}
        finally:
            os.close(fd)
        assert ctl.act([qid], "hold") == {qid: DONE}
        other = "4SVLCh0sf8z9HdB"
        assert ctl.act([other], "delete") == {other: ABSENT}

    run(go())
    assert env.files("hold") == [qid]
    assert apply_file(env.spool, "hold", qid, "release") == DONE
    assert env.files("deferred") == [qid]
    assert apply_file(env.spool, "hold", qid, "release") == ABSENT


@pytest.mark.parametrize("action", ["hold", "delete", "requeue"])
def test_request_for_a_message_gone_from_every_queue_is_logged(
        tmp_path: Path, action: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A queued hold/delete/requeue that reaches the qmgr after the message left the
    queue altogether (delivered and removed while the qmgr was stopped): one line,
    ``<id>: <action> not done: no such message in the queue``; a message that is in
    another queue (the ctl's to change) is not reported so."""
    env = Env(tmp_path)
    deferred = env.submit("a@x.example", ["r@one.example"])
    env.spool.move(deferred, "incoming", "deferred")

    async def go() -> None:
        sched = env.sched()
        ctl = control(env, sched)
        gone = "4SVLCh0sf8z9HdB"
        assert ctl.act([gone, deferred], action) == {gone: ABSENT, deferred: ABSENT}

    run(go())
    err = capsys.readouterr().err
    assert f"4SVLCh0sf8z9HdB: {action} not done: no such message in the queue" in err
    assert f"{deferred}: {action} not done" not in err


def write_suspension(env: Env, key: str, until: float, reason: str = "") -> None:
    path = susp.suspend_path(env.spool.queue_directory)
    susp.update(path, lambda items: [s for s in items if s.domain != key]
                + [susp.Suspension(key, until, reason, env.clock.now)], env.clock.now)


def test_suspension_defers_without_attempt_and_ends_by_itself(tmp_path: Path) -> None:
    env = Env(tmp_path, minimal_backoff_time="300s", maximal_backoff_time="4000s")
    write_suspension(env, "example.com", env.clock.now + 60, "maintenance")
    held = env.submit("a@x.example", ["u@example.com", "v@other.example"])

    async def go() -> None:
        sched = env.sched()
        ctl = control(env, sched)
        ctl.load_suspensions()
        assert [s["domain"] for s in sched.snapshot()["suspended"]] == ["example.com"]
        sched.startup()
        await drain(sched)
        assert env.agents.rcpts() == ["v@other.example"]  # no attempt for example.com
        assert env.files("deferred") == [held]
        mtime = os.stat(env.spool.path("deferred", held)).st_mtime
        assert mtime == env.clock.now + 60  # retry at the end, not after 300 s
        (status, reason), = [(d.status, d.reason)
                             for _, d in statuslog.read(env.spool, "defer", held)]
        assert status == "4.3.2" and "example.com suspended" in reason
        assert "maintenance" in reason
        env.clock.now += 61
        await drain(sched)
        assert not sched.suspended
        assert env.agents.rcpts()[-1] == "u@example.com"

    run(go())
    assert not env.files("deferred")


def deferral_detail(report: str) -> list[str]:
    """The reasons of pflogsumm's "message deferral detail" section, count removed."""
    section = report.split("message deferral detail", 1)[1].split("\n\n", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\s+\d+\s{3}(\S.*)$", section, re.MULTILINE)]


def test_suspension_deferral_reads_well_in_pflogsumm(tmp_path: Path) -> None:
    """The qmgr's status=deferred line for a suspended destination, through pflogsumm
    (which cuts a long reason after each ':' in turn): its "message deferral detail"
    shows the operator's reason, or (without one) the suspension itself - not a piece
    of the end time such as "30:00: maintenance window". The end time is kept, as an
    ISO 8601 basic time without ':'."""
    pflogsumm = require_tool("pflogsumm")
    env = Env(tmp_path)
    write_suspension(env, "example.com", env.clock.now + 3600, "maintenance window")
    write_suspension(env, "example.org", env.clock.now + 3600)
    env.submit("a@x.example", ["u@example.com"])
    env.submit("a@x.example", ["v@example.org"])
    maillog = tmp_path / "maillog"
    log.setup("qmgr", str(maillog), "qmgrd")

    async def go() -> None:
        sched = env.sched()
        control(env, sched).load_suspensions()
        sched.startup()
        await drain(sched)

    run(go())
    log.close()
    p = subprocess.run([pflogsumm, "--syslog-name=qmgrd", str(maillog)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    reasons = sorted(deferral_detail(p.stdout))
    assert len(reasons) == 2, p.stdout
    # without a reason: the text, shortened by pflogsumm as any long reason (with
    # --verbose-msg-detail it shows it whole, below)
    assert reasons[0].startswith("delivery to example.org suspended by the administrator"), \
        p.stdout
    assert reasons[1] == "maintenance window", p.stdout
    end = r"until \d{8}T\d{6}[+-]\d{4}"
    lines = sorted((line for line in maillog.read_text().splitlines()
                    if "status=deferred" in line), key=lambda line: "example.org" in line)
    assert len(lines) == 2, maillog.read_text()
    assert re.search(rf"dsn=4\.3\.2, status=deferred \(delivery to example\.com suspended "
                     rf"by the administrator {end}: maintenance window\)$", lines[0]), lines
    assert re.search(rf"status=deferred \(delivery to example\.org suspended by the "
                     rf"administrator {end}\)$", lines[1]), lines
    p = subprocess.run([pflogsumm, "--syslog-name=qmgrd", "--verbose-msg-detail",
                        str(maillog)], capture_output=True, text=True, timeout=60, check=False)
    assert re.fullmatch(rf"delivery to example\.com suspended by the administrator {end}: "
                        "maintenance window", min(deferral_detail(p.stdout))), p.stdout


def test_suspension_sweeps_waiting_entries_and_is_lifted(tmp_path: Path) -> None:
    env = Env(tmp_path, smtp_destination_concurrency_limit="1",
              initial_destination_concurrency="1")
    qids = [env.submit("a@x.example", [f"u{i}@example.com"]) for i in range(3)]
    env.agents.hold = True

    async def go() -> None:
        sched, ctl = await started(env)
        assert len(env.agents.waiting) == 1  # 1 in flight, 2 waiting
        write_suspension(env, ".com", 0)
        assert (await ctl.handle({"cmd": "suspend"}))["suspended"][0]["domain"] == ".com"
        env.agents.release(1, "sent")
        await drain(sched)
        counts_are_zero(sched)
        assert len(env.agents.requests) == 1
        path = susp.suspend_path(env.spool.queue_directory)
        susp.update(path, lambda items: [], env.clock.now)
        await ctl.handle({"cmd": "suspend"})
        assert not sched.suspended

    run(go())
    assert len(env.files("deferred")) == 2 and set(env.files("deferred")) < set(qids)


def test_control_socket_round_trip(tmp_path: Path) -> None:
    env = Env(tmp_path)
    restarts: list[int] = []
    path = str(tmp_path / "ctl.sock")

    async def go() -> None:
        sched = env.sched()
        server = ControlServer(path, control(env, sched, restarts))
        assert await server.start()
        loop = asyncio.get_running_loop()
        try:
            pong = await loop.run_in_executor(None, request, path, {"cmd": "ping"})
            assert pong["pid"] == os.getpid() and pong["tables_changed"] is False
            bad = await loop.run_in_executor(
                None, request, path, {"cmd": "act", "action": "delete", "ids": ["../x"]})
            assert "error" in bad
            act = await loop.run_in_executor(
                None, request, path,
                {"cmd": "act", "action": "delete", "ids": ["4SVLCh0sf8z9HdB"]})
            assert act == {"results": {"4SVLCh0sf8z9HdB": ABSENT}}
            tables = await loop.run_in_executor(None, request, path, {"cmd": "tables"})
            assert tables["restarting"] is False and not restarts
        finally:
            await server.close()
        assert not os.path.exists(path)

    run(go())


def test_suspension_file_is_checked(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    assert susp.load(path, 0) == []
    for bad in ("{", "[]", json.dumps({"suspensions": [{"domain": "../etc"}]})):
        Path(path).write_text(bad)
        try:
            susp.load(path, 0)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
    Path(path).write_text(json.dumps({"suspensions": [
        {"domain": "a.example", "until": 10}, {"domain": "b.example", "until": 0}]}))
    assert [s.domain for s in susp.load(path, 20)] == ["b.example"]  # a. has ended
    for key in ("example.com", ".example.com", "[127.0.0.1]:2525", "[::1]", "x-y.example"):
        assert susp.valid_key(key), key
    for key in ("", "../../etc/passwd", "a\0b", "a\nb", "a b", "a/b", "[x]:99999999"):
        assert not susp.valid_key(key), key
    s = susp.Suspensions()
    s.replace([susp.Suspension("example.com"), susp.Suspension(".sub.example"),
               susp.Suspension("[127.0.0.1]:2525")], 0)
    assert s.match("u@EXAMPLE.com", "example.com")
    assert not s.match("u@x.example.com", "x.example.com")
    assert s.match("u@a.sub.example", "a.sub.example")
    assert not s.match("u@sub.example", "sub.example")
    assert s.match("u@elsewhere.example", "[127.0.0.1]:2525")
    assert not s.match("u@elsewhere.example", "[127.0.0.1]:2526")


def test_qmgr_copes_when_a_file_is_removed_under_it(tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """Postfix's postsuper way (and qmgr-ctl's fallback with no qmgr answering): the file
    goes while its delivery is in flight; the qmgr warns, forgets it, counts stay right."""
    env = Env(tmp_path)
    gone = env.submit("a@x.example", ["r@one.example"])
    moved = env.submit("a@x.example", ["r@two.example"])
    env.agents.hold = True

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)
        assert len(env.agents.waiting) == 2
        os.unlink(env.spool.path("active", gone))
        env.spool.move(moved, "active", "hold")
        env.agents.release(2, "defer")  # replies: the agents had the files open
        await drain(sched)
        counts_are_zero(sched)

    env.agents._outcomes = lambda t, r, o: DeliverStatus(status=1)  # type: ignore[method-assign]
    run(go())
    err = capfd.readouterr().err
    assert f"{gone}: active queue file vanished" in err
    assert "delivery via" not in err and "Traceback" not in err
    assert env.files("hold") == [moved] and not env.files("active")


@pytest.mark.timeout(25)  # a bound for hanging: the command ends after --wait + 2 s
def test_hold_against_a_stopped_qmgr_is_left_to_it(tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """qmgr-ctl hold of an active message while the qmgr does not run (its event loop
    blocked, as under SIGSTOP): the command ends within its wait bound with "outcome
    unknown", exit 75, and leaves the file alone (moving it under the qmgr made the
    delivery agent defer it with "queue file read error"); when the qmgr runs again it
    finds the request in its socket and holds the message itself, counts intact."""
    from click.testing import CliRunner

    from qmgrd.ctl.cli import EX_TEMPFAIL, cli
    from qmgrd.qmgr.control import CONTROL_SOCKET

    env = Env(tmp_path)
    qid = env.submit("a@x.example", ["r@one.example"])
    env.agents.hold = True
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {env.spool.queue_directory}\n"
                                 f"maillog_file = {tmp_path}/ctl.log\n")

    async def go() -> None:
        sched, ctl = await started(env)
        assert len(env.agents.waiting) == 1  # its delivery is in flight
        server = ControlServer(os.path.join(env.spool.queue_path("private"),
                                            CONTROL_SOCKET), ctl)
        assert await server.start()
        try:
            # the command runs in this thread: the qmgr's loop is stopped meanwhile
            res = CliRunner().invoke(cli, ["-c", str(etc), "hold", "--wait", "0.5", qid])
            assert res.exit_code == EX_TEMPFAIL, res.stderr
            assert res.stdout == ""
            assert ("qmgr-ctl: warning: no answer from the qmgr (control reply timed out "
                    "after 2.5s): it may be stopped or overloaded") in res.stderr
            assert (f"{qid}: outcome unknown: the qmgr did not answer (control reply timed "
                    "out after 2.5s); it has the request and makes the change when it "
                    "runs again") in res.stderr
            assert res.stderr.endswith("qmgr-ctl: Placed on hold: 0 messages; outcome "
                                       "unknown: 1 message\n"), res.stderr
            assert env.files("active") == [qid]  # not moved under the qmgr
            # the qmgr runs again: the request waiting in its socket is served
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while qid not in ctl.pending and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert qid in ctl.pending
            env.agents.release(1, "defer")
            await drain(sched)
            counts_are_zero(sched)
        finally:
            await server.close()

    run(go())
    assert env.files("hold") == [qid] and not env.files("active")
    err = capfd.readouterr().err
    assert f"{qid}: placed on hold" in err and "read error" not in err
