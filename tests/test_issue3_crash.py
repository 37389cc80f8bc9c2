"""Issue 3 acceptance: crashes.  kill -9 of each kind of child in turn (qmgr, pickup,
smtp, local, bounce) while 500 messages flow loses nothing and each service comes back;
kill -9 of the master: every child exits by itself, and a new master on the same queue
delivers what was queued before.

Counting is by Message-ID (``<ID@TAG>``, TAG unique per test): remote mail at smtp-sink
(top-level header), local mail in Maildirs, bounced mail through the notice quoting its
headers in the sender's Maildir.  Postfix may deliver twice after a crash, so duplicates
are allowed here but printed (``pytest -s`` / ``-rP`` shows them).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import psutil
import pytest

from tests.harness import (
    Injector,
    LogCursor,
    MailSystem,
    MakeSystem,
    SmtpSink,
    maildir_messages,
    message_ids,
    service_of,
    session_report,
    wait_delivered,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Peers

SENDER = "alice@mail.test.example"  # local: bounce notices land in mail/alice/new
BOUNCE_DOMAIN = "bounce.example"    # routed to error:5.1.1 by transport_maps


def make_jobs(tag: str, n: int, local_every: int, bounce_every: int,
              ) -> tuple[list[tuple[list[str], bytes]], dict[str, set[str]]]:
    """n messages: every ``local_every``-th to a local user, every ``bounce_every``-th to
    a recipient that bounces, the rest remote.  Returns (jobs, expected ids per kind)."""
    jobs = []
    kinds: dict[str, set[str]] = {"remote": set(), "local": set(), "bounce": set()}
    for i in range(n):
        if bounce_every and i % bounce_every == bounce_every - 1:
            kind, rcpt = "bounce", f"nobody{i}@{BOUNCE_DOMAIN}"
        elif local_every and i % local_every == local_every - 1:
            kind, rcpt = "local", f"l{i % 7}@localhost"
        else:
            kind, rcpt = "remote", f"r{i}@d{i % 13}.example"
        mid = f"{kind[0]}{i}"
        kinds[kind].add(mid)
        data = (f"Subject: {kind} {i}\nMessage-ID: <{mid}@{tag}>\n\n"
                f"message {i} of {tag}\n").encode()
        jobs.append((["-i", "-f", SENDER, rcpt], data))
    return jobs, kinds


class Tally:
    """What arrived where, by Message-ID."""

    def __init__(self, ms: MailSystem, sink: SmtpSink, tag: str,
                 kinds: dict[str, set[str]]) -> None:
        self.ms, self.sink, self.tag, self.kinds = ms, sink, tag, kinds

    def counts(self) -> dict[str, Counter[str]]:
        local_users = [d.name for d in self.ms.mail.iterdir()] if self.ms.mail.exists() else []
        local = Counter[str]()
        for user in local_users:
            if user != "alice":
                local += message_ids(maildir_messages(self.ms, user), self.tag)
        return {
            "remote": message_ids(self.sink.messages(), self.tag),
            "local": local,
            "bounce": message_ids(maildir_messages(self.ms, "alice"), self.tag,
                                  top_only=False),
        }

    def missing(self) -> dict[str, set[str]]:
        got = self.counts()
        return {k: want - set(got[k]) for k, want in self.kinds.items() if want - set(got[k])}

    def complete(self) -> bool:
        return not self.missing()

    def duplicates(self) -> dict[str, dict[str, int]]:
        return {k: {m: n for m, n in c.items() if n > 1}
                for k, c in self.counts().items() if any(n > 1 for n in c.values())}


def busy_smtp(ms: MailSystem, port: int) -> psutil.Process | None:
    """An smtp process with a connection to the sink (busy), else None."""
    for p in psutil.Process(ms.master_pid).children():
        if service_of(p) != "smtp":
            continue
        try:
            if any(c.raddr and c.raddr[1] == port for c in p.net_connections("tcp")):
                return p
        except psutil.Error:
            continue
    return None


def oldest(procs: list[psutil.Process]) -> psutil.Process | None:
    """The longest-running process (the most likely to have served a request: killing a
    child that never did throttles its service, as in Postfix)."""
    live = []
    for p in procs:
        try:
            live.append((p.create_time(), p.pid, p))
        except psutil.Error:
            continue
    return min(live)[2] if live else None


# what a service logs when it has done its job (the proof that it serves again)
SERVES = {
    "qmgr": "(queue active)",
    "pickup": " uid=",
    "smtp": "status=sent",
    "local": "status=sent",
    "bounce": "notification",
}


def kill_and_watch(ms: MailSystem, sink: SmtpSink, inj: Injector, service: str,
                   after: int) -> str:
    """Once ``after`` messages are injected, kill -9 one ``service`` process (an smtp one
    in mid-conversation with the sink if there is one) and wait until another process of
    that service has done its job again.  Returns a line for the report."""
    wait_for(lambda: inj.pump() or inj.done >= after, 60, f"{after} messages injected",
             interval=0.02)
    found: list[psutil.Process] = []

    def find_victim() -> bool:
        inj.pump()
        victim = busy_smtp(ms, sink.port) if service == "smtp" else None
        victim = victim or oldest(ms.children(service))
        if victim is not None:
            found.append(victim)
        return victim is not None

    wait_for(find_victim, 30, f"a {service} process to kill", interval=0.02)
    victim = found[-1]
    cursor = LogCursor(ms)
    t0 = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)

    def served_again() -> bool:
        return any(pid != victim.pid and SERVES[service] in msg
                   for pid, msg in cursor.by(service))

    wait_delivered(ms, served_again, 45, f"{service} to serve again after kill -9",
                   pump=inj.pump)
    new = [p.pid for p in ms.children(service) if p.pid != victim.pid]
    if service in ("qmgr", "pickup"):
        assert new, f"no new {service} process after kill -9 of {victim.pid}"
    return (f"{service}: killed {victim.pid}, served again after "
            f"{time.monotonic() - t0:.1f}s, now {new}")


@pytest.mark.timeout(150)
def test_kill_each_kind_of_child_while_500_messages_flow(mailsys: MakeSystem, peers: Peers) -> None:
    sink = peers.sink()
    tag = f"kill-{uuid.uuid4().hex[:10]}.test"
    ms = mailsys(main={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "transport_maps": f"inline:{{ {BOUNCE_DOMAIN}=error:5.1.1 }}",
        # a child killed before its first request throttles its service; keep that short
        "service_throttle_time": "5s",
    })
    ms.start()
    jobs, kinds = make_jobs(tag, 500, local_every=8, bounce_every=13)
    tally = Tally(ms, sink, tag, kinds)
    inj = Injector(ms, jobs, parallel=8)
    report: list[str] = []
    try:
        for service, after in (("qmgr", 40), ("pickup", 100), ("smtp", 160),
                               ("local", 220), ("bounce", 280)):
            report.append(kill_and_watch(ms, sink, inj, service, after))
        inj.finish(120)
        assert not inj.failures, inj.failures[:3]
        wait_delivered(ms, tally.complete, 60, "every message delivered or bounced")
    finally:
        inj.close()
        print("\n".join(report))
        print("missing:", {k: sorted(v)[:20] for k, v in tally.missing().items()})
        print("duplicates:", tally.duplicates())
    assert ms.master("status").returncode == 0
    assert not ms.proc_dead()
    # nothing meant for delivery was bounced
    bounced = tally.counts()["bounce"]
    assert not [m for m in bounced if m[0] != "b"], sorted(bounced)


@pytest.mark.timeout(120)
def test_kill_master_children_exit_and_new_master_delivers_queued_mail(
        mailsys: MakeSystem, peers: Peers) -> None:
    sink = peers.sink("-w", "1")  # a slow DATA answer keeps deliveries in flight
    tag = f"master-{uuid.uuid4().hex[:10]}.test"
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{sink.port}",
                       "transport_maps": f"inline:{{ {BOUNCE_DOMAIN}=error:5.1.1 }}"})
    ms.start()
    jobs, kinds = make_jobs(tag, 80, local_every=5, bounce_every=0)
    before, after = jobs[:60], jobs[60:]
    inj = Injector(ms, before, parallel=8)
    try:
        inj.finish(60)
    finally:
        inj.close()
    assert not inj.failures, inj.failures[:3]
    wait_for(lambda: busy_smtp(ms, sink.port) and ms.children("local"), 30,
             "smtp deliveries in flight and a local agent")
    old_master = ms.master_pid
    old = {p.pid: service_of(p) for p in psutil.Process(old_master).children()}
    assert {"qmgr", "pickup", "smtp", "local"} <= set(old.values()), old
    os.kill(old_master, signal.SIGKILL)
    assert ms.proc is not None
    ms.proc.wait(10)
    t0 = time.monotonic()

    def running(pid: int) -> bool:
        try:
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    def left() -> dict[int, str | None]:
        return {pid: what for pid, what in old.items() if running(pid)}

    try:
        wait_for(lambda: not left(), 30, "every child of the killed master to exit")
    except AssertionError:
        still = left()
        for pid in still:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        raise AssertionError(f"still running 30 s after the master died: {still}") from None
    took = time.monotonic() - t0
    print(f"children gone {took:.1f}s after kill -9 of the master")
    assert not session_report(ms)["orphans"]

    # mail submitted while no master runs waits in maildrop
    inj = Injector(ms, after, parallel=8)
    try:
        inj.finish(60)
    finally:
        inj.close()
    assert not inj.failures, inj.failures[:3]
    cursor = LogCursor(ms)
    ms.start()
    assert ms.master_pid != old_master
    tally = Tally(ms, sink, tag, kinds)
    try:
        wait_delivered(ms, tally.complete, 60, "every message queued before the restart")
    finally:
        print("missing:", {k: sorted(v)[:20] for k, v in tally.missing().items()})
        print("duplicates:", tally.duplicates())
    text = "\n".join(cursor.lines())
    assert "daemon started" in text
    assert not [line for line in cursor.lines()
                if "fatal" in line or "Traceback" in line], text[-3000:]
