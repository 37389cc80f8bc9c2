"""The master's spawn / reap / throttle / on-demand / wakeup / reload policy, run against
a fake OS layer and a fake clock (no processes, no descriptors)."""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence

import pytest

from master.config import Service
from master.daemon import supervisor as supmod
from master.daemon.supervisor import STATUS, Settings, Supervisor


class FakeOs:
    """An OsLayer that records what the policy asks for."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._pid = 100
        self._fd = 100
        self.spawned: list[tuple[int, list[str], int, list[int]]] = []
        self.exits: list[tuple[int, int]] = []
        self.killed: list[tuple[int, int]] = []
        self.status: dict[int, list[bytes]] = {}
        self.wakeups: list[tuple[str, float]] = []
        self.closed: list[int] = []
        self.listeners: dict[str, int] = {}
        self.backlogs: dict[str, int] = {}
        self.closed_listeners: list[str] = []
        self.fail_spawn = False
        self.sockets: dict[str, int] = {}  # service name -> number of listeners
        self.all_listeners: dict[str, list[int]] = {}
        self.fail_listen: set[str] = set()

    def _newfd(self) -> int:
        self._fd += 1
        return self._fd

    def monotonic(self) -> float:
        return self.now

    def spawn(self, argv: Sequence[str], generation: int, fds: Sequence[int]) -> int:
        if self.fail_spawn:
            raise OSError(11, "Resource temporarily unavailable")
        self._pid += 1
        self.spawned.append((self._pid, list(argv), generation, list(fds)))
        return self._pid

    def reap(self) -> list[tuple[int, int]]:
        out, self.exits = self.exits, []
        return out

    def kill(self, pid: int, sig: int) -> None:
        self.killed.append((pid, sig))

    def open_listeners(self, service: Service, queue_directory: str,
                       backlog: int) -> list[int]:
        if service.name in self.fail_listen:
            raise OSError(98, "Address already in use")
        fds = [self._newfd() for _ in range(self.sockets.get(service.name, 1))]
        self.listeners[service.name] = fds[0]
        self.all_listeners[service.name] = fds
        self.backlogs[service.name] = backlog
        return fds

    def close_listeners(self, service: Service, queue_directory: str,
                        fds: Sequence[int]) -> None:
        self.closed.extend(fds)
        self.closed_listeners.append(service.name)

    def open_status(self) -> tuple[int, int]:
        return self._newfd(), self._newfd()

    def open_flow(self) -> tuple[int, int]:
        return self._newfd(), self._newfd()

    def close(self, fd: int) -> None:
        self.closed.append(fd)

    def read_status(self, fd: int) -> bytes | None:
        queue = self.status.get(fd)
        if queue:
            return queue.pop(0)
        return None

    def wakeup(self, service: Service, queue_directory: str, fd: int) -> None:
        self.wakeups.append((service.name, self.now))


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)

    def warning(self, msg: str) -> None:
        self.lines.append("warning: " + msg)


def svc(name: str, maxproc: int = 2, stype: str = "unix", wakeup: int = 0,
        if_used: bool = False, private: bool = True) -> Service:
    return Service(name=name, type=stype, private=private, unpriv=True, chroot=False,
                   wakeup=wakeup, wakeup_if_used=if_used, maxproc=maxproc, command=name,
                   module=f"tests.services.{name}")


@pytest.fixture
def flog(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLog]:
    fake = FakeLog()
    monkeypatch.setattr(supmod, "log", fake)
    yield fake


@pytest.fixture
def fos() -> FakeOs:
    return FakeOs()


def make(fos: FakeOs, *services: Service, throttle: int = 60,
         foreground: bool = False) -> Supervisor:
    sup = Supervisor(fos, Settings("/etc/q", "/var/q", default_process_limit=100,
                                   service_throttle_time=throttle, foreground=foreground))
    sup.start(list(services))
    return sup


def st_of(sup: Supervisor, name: str) -> supmod.ServiceState:
    [st] = [st for key, st in sup.services.items() if key[0] == name]
    return st


def report(fos: FakeOs, sup: Supervisor, name: str, pid: int, avail: int,
           gen: int | None = None) -> None:
    st = st_of(sup, name)
    assert st.status_fd is not None
    g = st.generation if gen is None else gen
    fos.status.setdefault(st.status_fd, []).append(STATUS.pack(pid, g, avail))
    sup.on_status_ready(st.status_fd)


def connect(sup: Supervisor, fos: FakeOs, name: str) -> int | None:
    """The listener became readable: returns the pid spawned, if any."""
    before = len(fos.spawned)
    fd = fos.listeners[name]
    if fd in sup.wanted_listeners():
        sup.on_listener_ready(fd)
    return fos.spawned[-1][0] if len(fos.spawned) > before else None


def test_spawn_on_demand_one_child_counted_idle(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"), foreground=True)
    lfd = fos.listeners["echo"]
    assert sup.wanted_listeners() == {lfd}
    assert fos.backlogs["echo"] == 100  # max(maxproc, default_process_limit)
    pid = connect(sup, fos, "echo")
    assert pid is not None
    _, argv, gen, fds = fos.spawned[0]
    assert argv[1:] == ["-P", "-m", "tests.services.echo", "-c", "/etc/q", "-n", "echo",
                        "-t", "unix", "-d"]
    st = st_of(sup, "echo")
    assert gen == st.generation == 1
    assert fds[2] == st.status_child_fd and fds[3] == lfd and len(fds) == 4
    # the new child counts as idle: the listener is no longer watched
    assert sup.wanted_listeners() == set()
    sup.on_listener_ready(lfd)  # a stale readiness must not spawn again
    assert len(fos.spawned) == 1


def test_busy_child_reopens_listener_up_to_maxproc(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo", maxproc=2))
    p1 = connect(sup, fos, "echo")
    assert p1 is not None
    report(fos, sup, "echo", p1, 0)
    p2 = connect(sup, fos, "echo")
    assert p2 is not None and p2 != p1
    report(fos, sup, "echo", p2, 0)
    assert sup.wanted_listeners() == set()  # at maxproc
    report(fos, sup, "echo", p1, 1)
    assert st_of(sup, "echo").children[p1].use_count == 1
    assert sup.wanted_listeners() == set()  # an idle child exists


def test_negative_avail_counts_uses_without_a_state_change(fos: FakeOs,
                                                          flog: FakeLog) -> None:
    """A multi_server process reports completed requests as avail -n: counted as uses,
    still idle (no new process for the next connection)."""
    sup = make(fos, svc("echo", maxproc=2))
    p1 = connect(sup, fos, "echo")
    assert p1 is not None
    report(fos, sup, "echo", p1, -1)
    report(fos, sup, "echo", p1, -37)
    child = st_of(sup, "echo").children[p1]
    assert child.use_count == 38 and child.avail
    assert sup.wanted_listeners() == set()  # an idle child exists
    assert not any("bad status" in line for line in flog.lines)


def test_maxproc_zero_is_unlimited(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo", maxproc=0))
    for _ in range(150):
        pid = connect(sup, fos, "echo")
        assert pid is not None
        report(fos, sup, "echo", pid, 0)
    assert len(sup.children) == 150


def test_startup_failure_throttles_then_recovers(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("bad"), throttle=60)
    pid = connect(sup, fos, "bad")
    assert pid is not None
    fos.exits.append((pid, 1))
    sup.reap()
    assert f"warning: process tests.services.bad pid {pid} exit status 1" in flog.lines
    assert "warning: bad: bad command startup -- throttling" in flog.lines
    assert sup.wanted_listeners() == set()
    assert sup.next_deadline() == fos.now + 60
    fos.now += 59.9
    sup.run_timers()
    assert connect(sup, fos, "bad") is None
    fos.now += 0.1
    sup.run_timers()
    assert sup.next_deadline() is None
    assert connect(sup, fos, "bad") is not None


def test_killed_before_first_request_throttles(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("bad"))
    pid = connect(sup, fos, "bad")
    assert pid is not None
    fos.exits.append((pid, -9))
    sup.reap()
    assert f"warning: process tests.services.bad pid {pid} killed by signal 9" in flog.lines
    assert st_of(sup, "bad").throttled_until is not None


def test_abnormal_exit_after_a_request_does_not_throttle(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"))
    pid = connect(sup, fos, "echo")
    assert pid is not None
    report(fos, sup, "echo", pid, 0)
    report(fos, sup, "echo", pid, 1)
    fos.exits.append((pid, -9))
    sup.reap()
    assert st_of(sup, "echo").throttled_until is None
    assert not any("throttling" in line for line in flog.lines)
    assert connect(sup, fos, "echo") is not None  # respawn on the next connection


def test_clean_exit_without_use_does_not_throttle(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"))
    pid = connect(sup, fos, "echo")
    assert pid is not None
    fos.exits.append((pid, 0))
    sup.reap()
    assert flog.lines == []
    assert sup.children == {}


def test_reap_reads_the_last_idle_record_first(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"))
    pid = connect(sup, fos, "echo")
    assert pid is not None
    st = st_of(sup, "echo")
    assert st.status_fd is not None
    # busy + idle arrive in one read, then the child dies before the loop looked
    fos.status[st.status_fd] = [STATUS.pack(pid, 1, 0) + STATUS.pack(pid, 1, 1)]
    fos.exits.append((pid, 1))
    sup.reap()
    assert st.throttled_until is None


def test_spawn_failure_throttles(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"))
    fos.fail_spawn = True
    assert connect(sup, fos, "echo") is None
    assert any(line.startswith("warning: echo: spawn:") for line in flog.lines)
    assert "warning: echo: bad command startup -- throttling" in flog.lines


def test_bad_status_records_are_ignored(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"))
    pid = connect(sup, fos, "echo")
    assert pid is not None
    report(fos, sup, "echo", 4242, 0)
    report(fos, sup, "echo", pid, 0, gen=7)
    st = st_of(sup, "echo")
    assert st.status_fd is not None
    fos.status[st.status_fd] = [STATUS.pack(pid, 1, 0)[:5]]
    sup.on_status_ready(st.status_fd)
    assert st.children[pid].avail  # none of them counted
    assert "warning: echo: status from unknown pid 4242" in flog.lines
    assert any("stale generation 7" in line for line in flog.lines)
    assert "warning: echo: partial status (5 bytes)" in flog.lines


def test_wakeup_timers(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("pickup", stype="fifo", wakeup=60, maxproc=1),
               svc("flush", wakeup=100, if_used=True), svc("echo"))
    t0 = fos.now
    sup.run_timers()
    assert fos.wakeups == [("pickup", t0)]  # first one right away; "?" waits for use
    assert sup.next_deadline() == t0 + 60
    fos.now += 60
    sup.run_timers()
    assert [w[0] for w in fos.wakeups] == ["pickup", "pickup"]
    assert connect(sup, fos, "flush") is not None
    fos.now += 40
    sup.run_timers()
    assert ("flush", fos.now) in fos.wakeups


def test_throttled_service_gets_no_wakeup(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("pickup", stype="fifo", wakeup=10, maxproc=1), throttle=30)
    sup.run_timers()
    pid = connect(sup, fos, "pickup")
    assert pid is not None
    fos.exits.append((pid, 1))
    sup.reap()
    fos.wakeups.clear()
    fos.now += 10
    sup.run_timers()
    assert fos.wakeups == []
    fos.now += 20
    sup.run_timers()
    assert [w[0] for w in fos.wakeups] == ["pickup"]


def test_reload_keeps_listener_new_generation(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo", maxproc=3))
    old = st_of(sup, "echo")
    lfd, sfd, cfd = old.listen_fd, old.status_fd, old.status_child_fd
    pid = connect(sup, fos, "echo")
    assert pid is not None
    sup.reload(sup.settings, [svc("echo", maxproc=3)])
    st = st_of(sup, "echo")
    assert st is old and st.listen_fd == lfd and st.generation == 2
    assert sfd in fos.closed and cfd in fos.closed and lfd not in fos.closed
    assert st.status_fd not in (sfd, None)
    # the old child is on its way out: not idle, but still counted against maxproc
    assert sup.wanted_listeners() == {lfd}
    new = connect(sup, fos, "echo")
    assert new is not None and fos.spawned[-1][2] == 2
    assert st.children[pid].generation == 1
    # the old child dying before any use does not throttle the new generation
    fos.exits.append((pid, 1))
    sup.reap()
    assert st.throttled_until is None


def test_solitary_service_never_runs_two_children_across_reload(
        fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("qmgr", maxproc=1))
    pid = connect(sup, fos, "qmgr")
    assert pid is not None
    report(fos, sup, "qmgr", pid, 0)  # busy with a request
    sup.reload(sup.settings, [svc("qmgr", maxproc=1)])
    assert sup.wanted_listeners() == set()
    assert connect(sup, fos, "qmgr") is None
    fos.exits.append((pid, 0))
    sup.reap()
    new = connect(sup, fos, "qmgr")
    assert new is not None and fos.spawned[-1][2] == 2


def test_reload_removes_and_adds_services(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"), svc("gone"))
    gone = st_of(sup, "gone")
    sfd = gone.status_fd
    pid = connect(sup, fos, "gone")
    assert pid is not None
    sup.reload(sup.settings, [svc("echo"), svc("fresh")])
    assert ("gone", "unix") not in sup.services
    assert "gone" in fos.closed_listeners and sfd in fos.closed
    assert (pid, signal.SIGTERM) in fos.killed
    assert fos.listeners["fresh"] in sup.wanted_listeners()
    fos.exits.append((pid, -15))
    sup.reap()
    assert pid not in sup.children
    assert not any("throttling" in line for line in flog.lines)


def test_reload_with_unopenable_new_service(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"))
    fos.fail_listen.add("smtp")
    sup.reload(sup.settings, [svc("echo"), svc("smtp", stype="inet")])
    assert ("smtp", "inet") not in sup.services
    assert any(line.startswith("warning: smtp: cannot start service") for line in flog.lines)


def test_reload_moves_endpoint_when_private_flag_changes(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"))
    old_fd = fos.listeners["echo"]
    sup.reload(sup.settings, [svc("echo", private=False)])
    assert old_fd in fos.closed
    assert st_of(sup, "echo").listen_fd == fos.listeners["echo"] != old_fd


def test_stop_and_kill(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"), svc("pickup", stype="fifo", wakeup=5))
    p1 = connect(sup, fos, "echo")
    p2 = connect(sup, fos, "pickup")
    assert p1 is not None and p2 is not None
    sup.stop()
    assert sup.status_fds() == [] and sup.wanted_listeners() == set()
    assert sorted(fos.killed) == [(p1, signal.SIGTERM), (p2, signal.SIGTERM)]
    assert sup.next_deadline() is None
    fos.exits.append((p1, 0))
    sup.reap()
    sup.kill_remaining(5.0)
    assert fos.killed[-1] == (p2, signal.SIGKILL)
    # the one left is named: a stop that had to kill says so
    assert flog.lines == [(f"warning: pickup: pid {p2} did not exit within 5s after "
                           "SIGTERM: killed")]
    fos.exits.append((p2, -9))
    sup.reap()
    assert sup.children == {}
    assert len(flog.lines) == 1  # neither throttling nor "killed by signal" for our signals
    sup.close_all()
    assert fos.listeners["echo"] in fos.closed


def test_signals_the_master_sent_are_not_warned_about(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("echo"), svc("gone"))
    p1 = connect(sup, fos, "echo")
    p2 = connect(sup, fos, "gone")
    assert p1 is not None and p2 is not None
    sup.reload(sup.settings, [svc("echo")])
    fos.exits += [(p2, -signal.SIGTERM), (p1, -signal.SIGTERM)]  # p1: someone else's
    sup.reap()
    # (p1 is of the old generation: no throttling of the reloaded service)
    assert flog.lines == [f"warning: process tests.services.echo pid {p1} killed by signal 15"]


def test_resident_wakeup_service_comes_back_at_once(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("qmgr", stype="fifo", wakeup=300, maxproc=1))
    sup.run_timers()
    pid = connect(sup, fos, "qmgr")
    assert pid is not None
    report(fos, sup, "qmgr", pid, 0)
    report(fos, sup, "qmgr", pid, 1)
    fos.now += 50
    fos.exits.append((pid, -9))  # killed mid-flight after some work: no throttle
    sup.reap()
    assert sup.next_deadline() == fos.now
    sup.run_timers()
    assert fos.wakeups[-1] == ("qmgr", fos.now)
    # a reload: the old qmgr may swallow the reload wakeup; its exit wakes the new one
    pid = connect(sup, fos, "qmgr")
    assert pid is not None
    report(fos, sup, "qmgr", pid, 0)
    report(fos, sup, "qmgr", pid, 1)
    sup.reload(sup.settings, [svc("qmgr", stype="fifo", wakeup=300, maxproc=1)])
    sup.run_timers()
    assert fos.wakeups[-1] == ("qmgr", fos.now)
    assert connect(sup, fos, "qmgr") is None  # solitary: the old one still runs
    fos.now += 0.2
    fos.exits.append((pid, 0))
    sup.reap()
    assert sup.next_deadline() == fos.now + 0.8  # at most one early wakeup per second
    fos.now += 0.8
    sup.run_timers()
    assert fos.wakeups[-1] == ("qmgr", fos.now)
    assert connect(sup, fos, "qmgr") is not None and fos.spawned[-1][2] == 2


def test_wakeup_when_throttle_ends(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("pickup", stype="fifo", wakeup=60, maxproc=1), throttle=10)
    sup.run_timers()
    pid = connect(sup, fos, "pickup")
    assert pid is not None
    fos.exits.append((pid, 1))
    sup.reap()
    assert sup.next_deadline() == fos.now + 1.0  # the rewake, then skipped as throttled
    fos.now += 1.0
    sup.run_timers()
    assert len(fos.wakeups) == 1
    fos.now += 9.0
    sup.run_timers()  # the throttle ends: wake it now, not 50 s later
    assert fos.wakeups[-1] == ("pickup", fos.now)


def test_privileged_master_passes_unpriv_and_chroot(fos: FakeOs, flog: FakeLog) -> None:
    jailed = Service(name="qmgr", type="fifo", private=False, unpriv=True, chroot=True,
                     wakeup=0, wakeup_if_used=False, maxproc=1, command="qmgr",
                     module="qmgrd.qmgr")
    rooted = Service(name="local", type="unix", private=True, unpriv=False, chroot=False,
                     wakeup=0, wakeup_if_used=False, maxproc=2, command="local",
                     module="transports.local")
    sup = Supervisor(fos, Settings("/etc/q", "/var/q", privileged=True))
    sup.start([jailed, rooted, svc("smtp")])
    for name in ("qmgr", "local", "smtp"):
        connect(sup, fos, name)
    flags = {argv[argv.index("-n") + 1]: [a for a in argv if a.startswith("--")]
             for _, argv, _, _ in fos.spawned}
    assert flags == {"qmgr": ["--unpriv", "--chroot"], "local": [], "smtp": ["--unpriv"]}
    # started by a normal user: no flags at all, whatever master.cf says
    plain = FakeOs()
    sup2 = Supervisor(plain, Settings("/etc/q", "/var/q", privileged=False))
    sup2.start([jailed])
    connect(sup2, plain, "qmgr")
    assert not [a for a in plain.spawned[0][1] if a.startswith("--")]


def test_process_limit_warning_at_most_once_per_1000s(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("smtp", maxproc=2), svc("solo", maxproc=1))
    marker = 'service "smtp" (private/smtp) has reached its process limit "2"'
    p1 = connect(sup, fos, "smtp")
    assert p1 is not None
    report(fos, sup, "smtp", p1, 0)
    p2 = connect(sup, fos, "smtp")
    assert p2 is not None
    assert not [line for line in flog.lines if marker in line]  # p2 still idle
    report(fos, sup, "smtp", p2, 0)  # both busy at the limit
    warned = [line for line in flog.lines if marker in line]
    assert warned == [f"warning: {marker}: new clients may experience noticeable delays"]
    assert "increase the process count in master.cf" in flog.lines[-1]
    for _ in range(5):  # busy/idle cycles within the 1000 s: no repeat
        fos.now += 100
        report(fos, sup, "smtp", p1, 1)
        report(fos, sup, "smtp", p1, 0)
    assert len([line for line in flog.lines if marker in line]) == 1
    fos.now += 600  # 1100 s after the first warning
    report(fos, sup, "smtp", p1, 1)
    report(fos, sup, "smtp", p1, 0)
    assert len([line for line in flog.lines if marker in line]) == 2
    # a solitary service (the qmgr, pickup) at its limit is normal: never warned about
    solo = connect(sup, fos, "solo")
    assert solo is not None
    report(fos, sup, "solo", solo, 0)
    assert not [line for line in flog.lines if '"solo"' in line]


def test_watchdog_kill_is_named(fos: FakeOs, flog: FakeLog) -> None:
    service = svc("smtp")
    sup = Supervisor(fos, Settings("/etc/q", "/var/q",
                                   watchdog={service.service_key: 42}))
    sup.start([service])
    pid = connect(sup, fos, "smtp")
    assert pid is not None
    report(fos, sup, "smtp", pid, 0)
    report(fos, sup, "smtp", pid, 1)
    report(fos, sup, "smtp", pid, 0)
    fos.exits.append((pid, -signal.SIGALRM))
    sup.reap()
    assert (f"warning: process tests.services.smtp pid {pid} killed by signal 14 "
            "(watchdog timeout after 42s?)") in flog.lines
    assert not any("throttling" in line for line in flog.lines)  # it had served once


def test_snapshot_is_the_masters_view(fos: FakeOs, flog: FakeLog) -> None:
    sup = make(fos, svc("smtp", maxproc=3), svc("bad"), throttle=60)
    p1 = connect(sup, fos, "smtp")
    assert p1 is not None
    report(fos, sup, "smtp", p1, 0)
    p2 = connect(sup, fos, "smtp")
    assert p2 is not None
    report(fos, sup, "smtp", p1, 1)
    bad = connect(sup, fos, "bad")
    assert bad is not None
    fos.exits.append((bad, 1))
    sup.reap()
    snap = sup.snapshot(wall_offset=1_000_000.0)
    by_name = {s["name"]: s for s in snap["services"]}
    smtp = by_name["smtp"]
    assert (smtp["type"], smtp["maxproc"], smtp["throttled_until"]) == ("unix", 3, None)
    assert [(p["pid"], p["state"], p["uses"]) for p in smtp["processes"]] == [
        (p1, "idle", 1), (p2, "idle", 0)]
    assert by_name["bad"]["throttled_until"] == fos.now + 60 + 1_000_000.0
    assert by_name["bad"]["processes"] == []
    assert snap["generation"] == 1 and snap["stopping"] is False


def test_several_listeners_are_all_passed_with_s(fos: FakeOs, flog: FakeLog) -> None:
    fos.sockets["smtpd"] = 2  # an inet service on two inet_interfaces addresses
    sup = make(fos, svc("smtpd", stype="inet", private=False), svc("echo"))
    fds = fos.all_listeners["smtpd"]
    assert sup.wanted_listeners() == {*fds, fos.listeners["echo"]}
    sup.on_listener_ready(fds[1])  # a connection on the second address
    _, argv, _, passed = fos.spawned[-1]
    assert argv[argv.index("-s") + 1] == "2" and passed[3:] == fds
    assert not set(fds) & sup.wanted_listeners()  # an idle child now: neither watched
    connect(sup, fos, "echo")
    assert "-s" not in fos.spawned[-1][1] and len(fos.spawned[-1][3]) == 4
    sup.close_all()
    assert set(fds) <= set(fos.closed)


def test_idle_count_kept_equals_a_walk_over_the_children(fos: FakeOs, flog: FakeLog) -> None:
    """The count the master asks for after every status record is kept up to date by
    spawn, status, reap and reload, never recounted: it must match a walk at every step."""
    import random

    rng = random.Random(8)
    sup = make(fos, svc("echo", maxproc=6))

    def walked(st: supmod.ServiceState) -> int:
        return sum(1 for c in st.children.values()
                   if c.avail and c.generation == st.generation)

    for _ in range(400):
        st = st_of(sup, "echo")
        pids = list(st.children)
        step = rng.choice(["connect", "busy", "idle", "idle", "exit", "reload"])
        if step == "connect":
            if fos.listeners["echo"] in sup.wanted_listeners():
                sup.on_listener_ready(fos.listeners["echo"])
        elif step in ("busy", "idle") and pids:
            pid = rng.choice(pids)
            if st.children[pid].generation == st.generation:
                report(fos, sup, "echo", pid, 0 if step == "busy" else 1)
        elif step == "exit" and pids:
            fos.exits.append((rng.choice(pids), 0))
            sup.reap()
        elif step == "reload" and rng.random() < 0.2:
            sup.reload(sup.settings, [svc("echo", maxproc=6)])
        st = st_of(sup, "echo")
        assert st.idle_count() == walked(st), step
    assert fos.spawned  # the walk did spawn, report and reap
