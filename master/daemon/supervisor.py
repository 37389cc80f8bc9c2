"""master.daemon.supervisor - the master's policy: spawn, reap, throttle, wake up, reload.

Summary
    One Supervisor owns one ServiceState per master.cf service and the table of live
    children.  It decides, never does: every system call goes through an injected
    :class:`~master.daemon.spawn.OsLayer` (so tests run it with a fake OS and clock),
    and the event loop (master.daemon.master) asks it which descriptors to watch and
    tells it what became ready.  Postfix behaviour followed (postfix.md §3.4-§3.7):

    * On-demand spawning: a service's listener is watched only while the service has no
      idle child, is below maxproc (0 = unlimited) and is not throttled.  When it becomes
      readable exactly one child is spawned and counted idle; idle children accept
      connections themselves.
    * Status records ``struct.pack("=iIi", pid, generation, avail)`` (avail 0 busy,
      1 idle) arrive on the service's status channel; every busy -> idle transition
      counts one use, and a negative avail ``-n`` counts n uses without a change of
      state (a multi_server process, which is not busy per request).  Unknown pids, stale generations and partial records are ignored
      with a warning.
    * A child that ends abnormally before completing a request throttles its service
      for service_throttle_time ("bad command startup -- throttling"); spawn failure
      throttles too.  The master never exits because of a child.
    * Wakeup timers send ``W`` every ``wakeup`` seconds, the first right at start
      (``N?``: only once the service has been used); throttled services are skipped.
      When the last child of a wakeup service ends (crash, reload, max_use) or its
      throttle ends, the wakeup is sent at once instead of at the next tick, so a
      resident service such as the qmgr comes straight back (a small step beyond
      Postfix, which waits for the next trigger); at most one such early wakeup per
      second, so a service that dies at once cannot spin.
    * Reload is mark and sweep on (name, type): kept services keep their listener but
      get a new status channel and generation, so old children see EOF and finish;
      old children still count against maxproc (a solitary service never runs two
      children, even across a reload); removed services lose their listener and status
      channel and their children get SIGTERM; new services start.
    * Stop closes every status channel and sends SIGTERM to every child;
      kill_remaining() sends SIGKILL to what is left, with a warning naming each.
    * Privileges: when the master runs as root (``Settings.privileged``) a child of an
      ``unpriv`` service gets ``--unpriv`` and one of a ``chroot`` service ``--chroot``
      (master.server.jail does the rest in the child).
    * A service with maxproc > 1 whose every child is busy at the limit logs "has
      reached its process limit" - at most once per PROCESS_LIMIT_WARN_INTERVAL (1000 s)
      per service, as Postfix's master_avail_listen().
    * A child killed by SIGALRM is reported with its watchdog time
      (``Settings.watchdog``, see master.server.watchdog).

Public API
    endpoint_problem(service, queue_directory, exc) -> str;  EndpointError(Exception)
    Settings(config_directory, queue_directory, default_process_limit=100,
             service_throttle_time=60, foreground=False, privileged=False, watchdog={})
        watchdog: (name, type) -> the watchdog seconds of that service's children
    Child (pid, service, generation, avail, use_count, signalled, started)
    ServiceState (service, generation, listen_fds, status_fd, children, throttled_until,
                  next_wakeup, used, removed); wants_listener(stopping) -> bool
    Supervisor(osl, settings)
        start(services) -> None            raises EndpointError (a listener failed:
                                           "<master.cf>, line <n>: cannot open endpoint
                                           <endpoint>: <reason>"), OSError (flow pipe)
        reload(settings, services) -> None  never raises (failed new services: warning)
        wanted_listeners() -> set[int];  status_fds() -> list[int]
        on_listener_ready(fd);  on_status_ready(fd);  run_timers()
        reap() -> list[(pid, exitcode)]    buries every ended child; returns those that
                                           were no service's (a one-shot command the
                                           master started), for their owner to report
        next_deadline() -> float | None;  stop();  kill_remaining();  close_all()
        children: dict[int, Child];  services: dict[(name, type), ServiceState]
        snapshot(wall_offset=0.0) -> dict     the state for the control socket (JSON-able;
                                               monotonic times + wall_offset = epoch)

Logs
    warning: process <module> pid <n> exit status <s> | killed by signal <n>
        (not for a child that died of the signal the master sent it); signal 14 adds
        " (watchdog timeout after <t>s?)"
    warning: service "<name>" (<endpoint>) has reached its process limit "<n>": new
        clients may experience noticeable delays  (+ a second line with the remedy)
    warning: <service>: bad command startup -- throttling
    warning: <service>: spawn: <error>;  warning: <service>: partial status (<n> bytes)
    warning: <service>: cannot start service: <master.cf>, line <n>: cannot open endpoint
        <endpoint>: <reason>   (a new service at reload; <service>: cannot open ... when
        a kept service's endpoint moved)
    warning: <service>: status from unknown pid <n> / stale generation ...
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from master import log
from master.config import Service, describe
from master.daemon.spawn import OsLayer, child_argv, describe_exit

__all__ = ["STATUS", "Child", "EndpointError", "ServiceState", "Settings", "Supervisor",
           "endpoint_problem"]

STATUS = struct.Struct("=iIi")
STATUS_BUSY = 0
STATUS_IDLE = 1
REWAKE_INTERVAL = 1.0
PROCESS_LIMIT_WARN_INTERVAL = 1000.0


class EndpointError(Exception):
    """A service's endpoint cannot be opened at start (str = endpoint_problem())."""


def endpoint_problem(svc: Service, queue_directory: str, exc: BaseException) -> str:
    """``"<master.cf>, line <n>: cannot open endpoint <endpoint>: <reason>"`` (the reason
    in log wording, master.config.describe; an error that names its own file gives
    ``"... cannot open endpoint <file>: <reason>"``)."""
    where = f"{svc.path}, line {svc.line}: " if svc.path else ""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{where}cannot open endpoint {describe(exc)}"
    return f"{where}cannot open endpoint {svc.endpoint(queue_directory)}: {describe(exc)}"


@dataclass(frozen=True)
class Settings:
    """The main.cf values the master's policy uses (times in seconds)."""

    config_directory: str
    queue_directory: str
    default_process_limit: int = 100
    service_throttle_time: int = 60
    foreground: bool = False
    privileged: bool = False
    watchdog: Mapping[tuple[str, str], int] = field(default_factory=dict)


@dataclass(eq=False)
class Child:
    """One live child process of a service."""

    pid: int
    service: ServiceState
    generation: int
    avail: bool = True
    use_count: int = 0
    signalled: int = 0  # the signal the master sent it (stop, removal), 0 = none
    started: float = 0.0  # monotonic spawn time


@dataclass(eq=False)
class ServiceState:
    """The master's run-time state of one master.cf service."""

    service: Service
    generation: int
    listen_fds: list[int] = field(default_factory=list)
    status_fd: int | None = None
    status_child_fd: int | None = None
    children: dict[int, Child] = field(default_factory=dict)
    throttled_until: float | None = None
    next_wakeup: float | None = None
    last_wakeup: float | None = None
    used: bool = False
    removed: bool = False
    limit_warned: float | None = None  # monotonic time of the last process-limit warning
    idle: int = 0  # children of the current generation with avail set (kept by the methods)

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def listen_fd(self) -> int | None:
        """The first listener (the one wakeups go to), None when there is none."""
        return self.listen_fds[0] if self.listen_fds else None

    def idle_count(self) -> int:
        """Idle children of the current generation (a count kept up to date by
        add_child / drop_child / set_avail / new_generation: the master asks for it after
        every status record, so it must not walk the children)."""
        return self.idle

    def add_child(self, child: Child) -> None:
        """A new child (counted idle, as Postfix's master does until it reports)."""
        self.children[child.pid] = child
        if child.avail and child.generation == self.generation:
            self.idle += 1

    def drop_child(self, pid: int) -> None:
        """A reaped child."""
        child = self.children.pop(pid, None)
        if child is not None and child.avail and child.generation == self.generation:
            self.idle -= 1

    def set_avail(self, child: Child, avail: bool) -> None:
        """A status record of ``child`` (of the current generation)."""
        if child.avail != avail and child.generation == self.generation:
            self.idle += 1 if avail else -1
        child.avail = avail

    def new_generation(self, generation: int) -> None:
        """Reload: every child belongs to an older generation and is no longer idle."""
        for child in self.children.values():
            child.avail = False
        self.generation = generation
        self.idle = 0

    def wants_listener(self, stopping: bool) -> bool:
        """True while the listener must be watched for on-demand spawning (§3.5)."""
        if stopping or self.removed or not self.listen_fds or self.status_fd is None:
            return False
        if self.throttled_until is not None:
            return False
        if self.service.maxproc and len(self.children) >= self.service.maxproc:
            return False
        return self.idle_count() == 0


class Supervisor:
    """Spawn / reap / throttle / wakeup / reload policy over an OsLayer (module docstring).

    The constructor does no I/O; start() opens the endpoints.
    """

    def __init__(self, osl: OsLayer, settings: Settings) -> None:
        self.os = osl
        self.settings = settings
        self.services: dict[tuple[str, str], ServiceState] = {}
        self.children: dict[int, Child] = {}
        self.generation = 0
        self.stopping = False
        self._flow: tuple[int, int] | None = None

    # --- life cycle ------------------------------------------------------------------
    def start(self, services: Sequence[Service]) -> None:
        """Open the flow pipe and every service's endpoints.  Raises OSError (the flow
        pipe) or EndpointError naming the service's master.cf line (the caller makes
        that fatal at start-up)."""
        self.generation += 1
        self._flow = self.os.open_flow()
        for svc in services:
            st = ServiceState(svc, self.generation)
            try:
                self._open(st)
            except (OSError, ValueError) as exc:
                self._close_status(st)
                raise EndpointError(endpoint_problem(svc, self.settings.queue_directory,
                                                     exc)) from exc
            self.services[svc.service_key] = st

    def reload(self, settings: Settings, services: Sequence[Service]) -> list[str]:
        """Mark and sweep to the new service list (module docstring).  A new service
        whose endpoint cannot be opened is logged and left out; returns those problems
        (``"<service>: <endpoint_problem>"``, for the reload verdict)."""
        problems: list[str] = []
        self.settings = Settings(self.settings.config_directory,
                                 self.settings.queue_directory,
                                 settings.default_process_limit,
                                 settings.service_throttle_time,
                                 self.settings.foreground,
                                 self.settings.privileged,
                                 settings.watchdog)
        self.generation += 1
        wanted = {svc.service_key: svc for svc in services}
        for key in list(self.services):
            if key not in wanted:
                self._remove(self.services.pop(key))
        for key, svc in wanted.items():
            st = self.services.get(key)
            if st is None:
                st = ServiceState(svc, self.generation)
                try:
                    self._open(st)
                except (OSError, ValueError) as exc:
                    self._close_status(st)
                    problem = endpoint_problem(svc, self.settings.queue_directory, exc)
                    log.warning(f"{svc.name}: cannot start service: {problem}")
                    problems.append(f"{svc.name}: {problem}")
                    continue
                self.services[key] = st
                continue
            self._restart(st, svc)
        return problems

    def stop(self) -> None:
        """Begin shutdown: no more spawns or wakeups, close every status channel (children
        see EOF), SIGTERM every child."""
        self.stopping = True
        for st in self.services.values():
            self._close_status(st)
            st.next_wakeup = None
        for child in self.children.values():
            self._kill(child, signal.SIGTERM)

    def kill_remaining(self, grace: float | None = None) -> None:
        """SIGKILL every child still alive (the end of the stop grace period), each
        named in a warning: ``warning: <service>: pid <pid> did not exit within <grace>s
        after SIGTERM: killed`` (``grace`` None: without the time)."""
        within = f" within {grace:g}s" if grace is not None else ""
        for child in self.children.values():
            log.warning(f"{child.service.name}: pid {child.pid} did not exit{within} "
                        "after SIGTERM: killed")
            self._kill(child, signal.SIGKILL)

    def close_all(self) -> None:
        """Close every descriptor the supervisor owns (the master is exiting)."""
        for st in self.services.values():
            self._close_status(st)
            for fd in st.listen_fds:
                self.os.close(fd)
            st.listen_fds = []
        if self._flow is not None:
            for fd in self._flow:
                self.os.close(fd)
            self._flow = None

    # --- what the loop watches --------------------------------------------------------
    def wanted_listeners(self) -> set[int]:
        """Listener descriptors to watch now."""
        return {fd for st in self.services.values() if st.wants_listener(self.stopping)
                for fd in st.listen_fds}

    def status_fds(self) -> list[int]:
        """Master ends of every open status channel."""
        return [st.status_fd for st in self.services.values() if st.status_fd is not None]

    def next_deadline(self) -> float | None:
        """The monotonic time of the next timer (throttle end or wakeup), or None."""
        times = [t for st in self.services.values()
                 for t in (st.throttled_until, st.next_wakeup) if t is not None]
        return min(times) if times else None

    # --- events -----------------------------------------------------------------------
    def on_listener_ready(self, fd: int) -> None:
        """A watched listener is readable: spawn one child if the policy still allows."""
        for st in self.services.values():
            if fd in st.listen_fds:
                if st.wants_listener(self.stopping):
                    self._spawn(st)
                return

    def on_status_ready(self, fd: int) -> None:
        """A status channel is readable: apply the records in it."""
        for st in self.services.values():
            if st.status_fd == fd:
                self._read_status(st)
                return

    def reap(self) -> list[tuple[int, int]]:
        """Collect ended children (after draining status channels, so that a last
        "idle" record is counted before its sender is buried). Returns (pid, exitcode)
        of those that were not children of a service."""
        others: list[tuple[int, int]] = []
        for st in self.services.values():
            self._read_status(st)
        for pid, code in self.os.reap():
            child = self.children.pop(pid, None)
            if child is None:
                others.append((pid, code))
                continue
            st = child.service
            st.drop_child(pid)
            self._rewake(st)
            if code == 0 or (code < 0 and -code == child.signalled):
                continue  # a clean exit, or the end we asked for
            log.warning(f"process {st.service.module} pid {pid} {describe_exit(code)}"
                        f"{self._exit_hint(st, code)}")
            if (child.use_count == 0 and child.generation == st.generation
                    and not st.removed and not self.stopping
                    and st.throttled_until is None):
                self._throttle(st)
        return others

    def run_timers(self) -> None:
        """End throttles and send wakeups that are due."""
        now = self.os.monotonic()
        for st in self.services.values():
            if st.throttled_until is not None and now >= st.throttled_until:
                st.throttled_until = None
                self._rewake(st)
            if st.next_wakeup is not None and now >= st.next_wakeup:
                st.next_wakeup = now + st.service.wakeup
                if (st.throttled_until is None and st.listen_fds
                        and (st.used or not st.service.wakeup_if_used)):
                    st.last_wakeup = now
                    self.os.wakeup(st.service, self.settings.queue_directory,
                                   st.listen_fds[0])

    def snapshot(self, wall_offset: float = 0.0) -> dict[str, Any]:
        """The master's view of every service and child, JSON-able (control socket).
        Monotonic times are turned into epoch seconds by adding ``wall_offset``."""
        services = []
        for st in self.services.values():
            svc = st.service
            procs = [{"pid": c.pid, "generation": c.generation,
                      "state": "idle" if c.avail else "busy", "uses": c.use_count,
                      "started": round(c.started + wall_offset, 3)}
                     for c in sorted(st.children.values(), key=lambda c: c.pid)]
            throttled = st.throttled_until
            services.append({
                "name": svc.name, "type": svc.type, "module": svc.module,
                "endpoint": svc.endpoint(self.settings.queue_directory),
                "maxproc": svc.maxproc, "unpriv": svc.unpriv, "chroot": svc.chroot,
                "wakeup": svc.wakeup, "generation": st.generation,
                "throttled_until": (None if throttled is None
                                    else round(throttled + wall_offset, 3)),
                "processes": procs})
        return {"generation": self.generation, "stopping": self.stopping,
                "privileged": self.settings.privileged, "services": services}

    # --- internals --------------------------------------------------------------------
    def _exit_hint(self, st: ServiceState, code: int) -> str:
        if code != -signal.SIGALRM:
            return ""
        timeout = self.settings.watchdog.get(st.service.service_key)
        return "" if timeout is None else f" (watchdog timeout after {timeout}s?)"

    def _check_limit(self, st: ServiceState) -> None:
        """Postfix's "has reached its process limit" warning (module docstring)."""
        svc = st.service
        if (svc.maxproc <= 1 or len(st.children) < svc.maxproc or st.idle_count() > 0
                or st.throttled_until is not None or self.stopping or st.removed):
            return
        now = self.os.monotonic()
        if st.limit_warned is not None and now - st.limit_warned < PROCESS_LIMIT_WARN_INTERVAL:
            return
        st.limit_warned = now
        where = svc.endpoint(self.settings.queue_directory)
        if svc.type != "inet":
            where = "/".join(where.split("/")[-2:])
        log.warning(f'service "{svc.name}" ({where}) has reached its process limit '
                    f'"{svc.maxproc}": new clients may experience noticeable delays')
        log.warning("to avoid this condition, increase the process count in master.cf "
                    "or reduce the service time per client")

    def _backlog(self, svc: Service) -> int:
        return max(svc.maxproc, self.settings.default_process_limit)

    def _open(self, st: ServiceState) -> None:
        st.status_fd, st.status_child_fd = self.os.open_status()
        st.listen_fds = self.os.open_listeners(st.service, self.settings.queue_directory,
                                               self._backlog(st.service))
        self._arm_wakeup(st)

    def _arm_wakeup(self, st: ServiceState) -> None:
        st.next_wakeup = self.os.monotonic() if st.service.wakeup > 0 else None

    def _rewake(self, st: ServiceState) -> None:
        """A wakeup service left without a process (its last child ended: crash, reload,
        limits; or its throttle ended) gets its wakeup now rather than at the next tick,
        so that a resident service (qmgr, pickup) comes back at once."""
        if (st.service.wakeup > 0 and not st.children and not st.removed
                and not self.stopping and st.next_wakeup is not None):
            soon = self.os.monotonic()
            if st.last_wakeup is not None:  # a service dying at once: 1 wakeup/s at most
                soon = max(soon, st.last_wakeup + REWAKE_INTERVAL)
            st.next_wakeup = min(st.next_wakeup, soon)

    def _kill(self, child: Child, sig: int) -> None:
        child.signalled = sig
        self.os.kill(child.pid, sig)

    def _restart(self, st: ServiceState, svc: Service) -> None:
        """A kept service: new status channel and generation; listener kept unless its
        endpoint moved (private <-> public)."""
        qdir = self.settings.queue_directory
        old = st.service
        self._close_status(st)
        st.new_generation(self.generation)
        st.service = svc
        st.throttled_until = None
        st.status_fd, st.status_child_fd = self.os.open_status()
        if old.endpoint(qdir) != svc.endpoint(qdir) and st.listen_fds:
            self.os.close_listeners(old, qdir, st.listen_fds)
            st.listen_fds = []
            try:
                st.listen_fds = self.os.open_listeners(svc, qdir, self._backlog(svc))
            except (OSError, ValueError) as exc:
                log.warning(f"{svc.name}: {endpoint_problem(svc, qdir, exc)}")
        self._arm_wakeup(st)

    def _remove(self, st: ServiceState) -> None:
        st.removed = True
        st.next_wakeup = None
        self._close_status(st)
        if st.listen_fds:
            self.os.close_listeners(st.service, self.settings.queue_directory, st.listen_fds)
            st.listen_fds = []
        for child in st.children.values():
            self._kill(child, signal.SIGTERM)

    def _close_status(self, st: ServiceState) -> None:
        for fd in (st.status_fd, st.status_child_fd):
            if fd is not None:
                self.os.close(fd)
        st.status_fd = st.status_child_fd = None

    def _throttle(self, st: ServiceState) -> None:
        st.throttled_until = self.os.monotonic() + self.settings.service_throttle_time
        log.warning(f"{st.name}: bad command startup -- throttling")

    def _spawn(self, st: ServiceState) -> None:
        assert self._flow is not None and st.listen_fds
        assert st.status_child_fd is not None
        argv = child_argv(st.service, self.settings.config_directory,
                          self.settings.foreground, self.settings.privileged,
                          len(st.listen_fds))
        fds = [self._flow[0], self._flow[1], st.status_child_fd, *st.listen_fds]
        try:
            pid = self.os.spawn(argv, st.generation, fds)
        except OSError as exc:
            log.warning(f"{st.name}: spawn: {describe(exc)}")
            self._throttle(st)
            return
        child = Child(pid, st, st.generation, started=self.os.monotonic())
        st.add_child(child)
        self.children[pid] = child
        st.used = True
        self._check_limit(st)

    def _read_status(self, st: ServiceState) -> None:
        while st.status_fd is not None:
            data = self.os.read_status(st.status_fd)
            if not data:
                return
            whole = len(data) - len(data) % STATUS.size
            if whole != len(data):
                log.warning(f"{st.name}: partial status ({len(data) - whole} bytes)")
            for off in range(0, whole, STATUS.size):
                pid, gen, avail = STATUS.unpack_from(data, off)
                self._apply_status(st, pid, gen, avail)

    def _apply_status(self, st: ServiceState, pid: int, gen: int, avail: int) -> None:
        child = st.children.get(pid)
        if child is None:
            log.warning(f"{st.name}: status from unknown pid {pid}")
            return
        if gen != child.generation or gen != st.generation:
            log.warning(f"{st.name}: status from pid {pid} with stale generation {gen}")
            return
        if avail == STATUS_IDLE:
            if not child.avail:
                child.use_count += 1
            st.set_avail(child, True)
        elif avail == STATUS_BUSY:
            st.set_avail(child, False)
            self._check_limit(st)
        elif avail < 0:  # a multi_server process: -avail more requests completed
            child.use_count += -avail
        else:
            log.warning(f"{st.name}: pid {pid}: bad status {avail}")
