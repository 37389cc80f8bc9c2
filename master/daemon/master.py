"""master.daemon.master - master(8): the resident supervisor process and its event loop.

Summary
    One process, one thread, one ``selectors`` loop (design.md §4 rules 1-3) over:
    a signal wakeup socket (``signal.set_wakeup_fd``; the handlers only record the
    signal), the status channel of every service, the listeners of services that may
    spawn on demand, and the timers (wakeups, throttles, the stop grace period).  The
    policy lives in master.daemon.supervisor; this module does the I/O around it.

    Start-up (run_master): read main.cf and master.cf, open the log, lock
    ``pid/master.pid`` (a second master gets "fatal: the qmgrd mail system is already
    running (pid N)" and exits 1 having touched nothing), create the queue directories
    and data_directory, chdir to queue_directory, create every endpoint, set the process
    name ``qmgrd: master`` (see master.server.skeleton on titles), log ``daemon started -- version 0.1, configuration <dir>``.

    Signals (postfix.md §3.7): SIGHUP reloads (main.cf and master.cf re-read; on error
    the old configuration stays and the error is logged; ``reload -- version 0.1,
    configuration <dir>``).  SIGTERM, SIGINT, SIGQUIT stop: ``terminating on signal
    <n>``, every status channel closed, SIGTERM to every child, up to STOP_GRACE (5 s)
    of reaping, SIGKILL to the rest, pid file removed, exit 0.  SIGCHLD reaps.

Public API
    VERSION = "0.1";  QUEUE_DIRS: dict[str, int] (name -> mode)
    make_queue_dirs(queue_directory, data_directory) -> None     raises OSError
    settings_from(cfg, foreground) -> Settings
    Master(config_directory, foreground=False): start() (raises StartupError), run() -> int
    StartupError: start-up failed (str = the reason, without "fatal: ")
    run_master(config_directory, foreground=False, notify=None) -> int
        the whole master life; ``notify(None)`` once started, ``notify(reason)`` when
        start-up failed (the CLI's background parent waits for this).  Returns 0 after
        a stop; a failed start-up logs ``fatal: <reason>`` and raises SystemExit(1).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

import setproctitle

from master import log
from master.config import Config, ConfigError, Service, load_master_cf
from master.daemon.pidfile import AlreadyRunning, PidFile, pid_path
from master.daemon.spawn import PosixOs, high_fd
from master.daemon.supervisor import Settings, Supervisor

__all__ = [
    "QUEUE_DIRS",
    "STOP_GRACE",
    "VERSION",
    "Master",
    "StartupError",
    "make_queue_dirs",
    "run_master",
    "settings_from",
]

VERSION = "0.1"
STOP_GRACE = 5.0
KILL_GRACE = 2.0
QUEUE_DIRS: dict[str, int] = {
    "maildrop": 0o1733, "incoming": 0o700, "active": 0o700, "deferred": 0o700,
    "hold": 0o700, "corrupt": 0o700, "bounce": 0o700, "defer": 0o700, "trace": 0o700,
    "private": 0o700, "public": 0o755, "pid": 0o700,
}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
_LISTEN = "listen"
_STATUS = "status"
_SIGNAL = "signal"


class StartupError(Exception):
    """The master cannot start (str = the reason)."""


def make_queue_dirs(queue_directory: str, data_directory: str) -> None:
    """Create the queue directory, its subdirectories (QUEUE_DIRS modes) and
    data_directory (0700) where missing; existing ones are left as they are."""
    os.makedirs(queue_directory, mode=0o755, exist_ok=True)
    for name, mode in QUEUE_DIRS.items():
        path = os.path.join(queue_directory, name)
        if not os.path.isdir(path):
            os.mkdir(path, mode)
            os.chmod(path, mode)
    if data_directory and not os.path.isdir(data_directory):
        os.makedirs(data_directory, mode=0o700, exist_ok=True)


def settings_from(cfg: Config, foreground: bool) -> Settings:
    """The Settings of the master's policy from main.cf.  Raises ConfigError."""
    return Settings(config_directory=cfg.config_directory,
                    queue_directory=cfg.get("queue_directory"),
                    default_process_limit=cfg.get_int("default_process_limit"),
                    service_throttle_time=cfg.get_time("service_throttle_time"),
                    foreground=foreground)


def _load(config_directory: str) -> tuple[Config, list[Service]]:
    cfg = Config.load(config_directory)
    services = load_master_cf(os.path.join(cfg.config_directory, "master.cf"), cfg)
    return cfg, services


def _inet_host(cfg: Config) -> str:
    """The bind address for inet services without a host part (first inet_interfaces)."""
    interfaces = cfg.get_list("inet_interfaces")
    if not interfaces or interfaces[0] == "all":
        return ""
    if interfaces[0] == "loopback-only":
        return "127.0.0.1"
    return interfaces[0]


class Master:
    """The master process: pid lock, signals, selector loop around a Supervisor.

    The constructor does no I/O; start() does everything that can fail.
    """

    def __init__(self, config_directory: str, foreground: bool = False) -> None:
        self.config_directory = os.path.abspath(config_directory)
        self.foreground = foreground
        self.selector = selectors.DefaultSelector()
        self.pidfile: PidFile | None = None
        self.supervisor: Supervisor | None = None
        self._pending: list[int] = []
        self._sig_r = -1
        self._sig_w = -1
        self._watched: dict[int, str] = {}
        self._stop_deadline: float | None = None
        self._killed = False

    # --- start-up ---------------------------------------------------------------------
    def start(self, cfg: Config, services: list[Service]) -> None:
        """Lock the pid file, make directories, open endpoints, install signals.

        Raises:
            StartupError: already running, or a directory/endpoint cannot be made.
        """
        settings = settings_from(cfg, self.foreground)
        qdir = settings.queue_directory
        try:
            os.makedirs(os.path.join(qdir, "pid"), mode=0o700, exist_ok=True)
            pidfile = PidFile(pid_path(qdir))
            pidfile.acquire()
        except AlreadyRunning as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"open lock file {pid_path(qdir)}: {exc.strerror}") from None
        self.pidfile = pidfile
        try:
            make_queue_dirs(qdir, cfg.get("data_directory"))
            os.chdir(qdir)
            sup = Supervisor(PosixOs(self._forget, _inet_host(cfg)), settings)
            self.supervisor = sup
            sup.start(services)
        except (OSError, ValueError) as exc:
            self._shutdown_fds()
            raise StartupError(str(exc)) from None
        self._install_signals()
        setproctitle.setproctitle("qmgrd: master")
        setproctitle.setthreadtitle("qmgrd: master")
        log.info(f"daemon started -- version {VERSION}, configuration "
                 f"{self.config_directory}")

    def _install_signals(self) -> None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._sig_r = high_fd(r.detach())
        self._sig_w = high_fd(w.detach())
        self.selector.register(self._sig_r, selectors.EVENT_READ, _SIGNAL)
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, signal.SIGCHLD, *STOP_SIGNALS):
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: record only (the loop acts)."""
        self._pending.append(signum)

    # --- the loop ---------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; returns the exit code (0)."""
        sup = self.supervisor
        assert sup is not None
        while True:
            sup.run_timers()
            if self._stop_deadline is not None and self._stopping_done(sup):
                break
            self._sync(sup)
            events = self.selector.select(self._timeout(sup))
            ready = [(key.fd, key.data) for key, _ in events]
            for fd, kind in ready:
                if kind == _STATUS and fd in self._watched:
                    sup.on_status_ready(fd)
            self._handle_signals(sup)
            for fd, kind in ready:
                if kind == _LISTEN and fd in self._watched:
                    sup.on_listener_ready(fd)
                    self._sync(sup)
        self._shutdown_fds()
        return 0

    def _timeout(self, sup: Supervisor) -> float | None:
        deadlines = [t for t in (sup.next_deadline(), self._stop_deadline) if t is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - sup.os.monotonic())

    def _sync(self, sup: Supervisor) -> None:
        """Make the selector watch exactly the status channels and wanted listeners."""
        want = dict.fromkeys(sup.status_fds(), _STATUS)
        want.update(dict.fromkeys(sup.wanted_listeners(), _LISTEN))
        for fd in [fd for fd in self._watched if want.get(fd) != self._watched[fd]]:
            self._forget(fd)
        for fd, kind in want.items():
            if fd not in self._watched:
                self.selector.register(fd, selectors.EVENT_READ, kind)
                self._watched[fd] = kind

    def _forget(self, fd: int) -> None:
        """Stop watching ``fd`` (called before any descriptor is closed)."""
        if self._watched.pop(fd, None) is not None:
            self.selector.unregister(fd)

    def _handle_signals(self, sup: Supervisor) -> None:
        try:
            while os.read(self._sig_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        pending, self._pending = self._pending, []
        for signum in pending:
            if signum == signal.SIGCHLD:
                sup.reap()
            elif signum == signal.SIGHUP:
                if self._stop_deadline is None:
                    self._reload(sup)
            elif signum in STOP_SIGNALS and self._stop_deadline is None:
                log.info(f"terminating on signal {signum}")
                self._stop_deadline = sup.os.monotonic() + STOP_GRACE
                sup.stop()
                sup.reap()

    def _stopping_done(self, sup: Supervisor) -> bool:
        """During a stop: True once no child is left or the grace time is over."""
        assert self._stop_deadline is not None
        if not sup.children:
            return True
        now = sup.os.monotonic()
        if now < self._stop_deadline:
            return False
        if not self._killed:
            sup.kill_remaining()
            self._killed = True
            self._stop_deadline = now + KILL_GRACE
            return False
        return True

    def _reload(self, sup: Supervisor) -> None:
        try:
            cfg, services = _load(self.config_directory)
            settings = settings_from(cfg, self.foreground)
        except ConfigError as exc:
            log.warning(f"reload failed, keeping the current configuration: {exc}")
            return
        log.info(f"reload -- version {VERSION}, configuration {self.config_directory}")
        sup.reload(settings, services)

    def _shutdown_fds(self) -> None:
        if self.supervisor is not None:
            self.supervisor.close_all()
        if self._sig_r >= 0:
            signal.set_wakeup_fd(-1)
            self.selector.unregister(self._sig_r)
            for fd in (self._sig_r, self._sig_w):
                os.close(fd)
            self._sig_r = self._sig_w = -1
        self.selector.close()
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None


def run_master(config_directory: str, foreground: bool = False,
               notify: Callable[[str | None], None] | None = None) -> int:
    """Run the master from start-up to stop (module docstring); returns the exit code."""
    def fail(reason: str) -> NoReturn:
        if notify is not None:
            notify(reason)
        log.fatal(reason)

    try:
        cfg, services = _load(config_directory)
        maillog = cfg.get("maillog_file")
        syslog_name = cfg.get("syslog_name") or "qmgrd"
    except ConfigError as exc:
        fail(str(exc))
    try:
        log.setup("master", maillog, syslog_name, foreground=foreground)
    except OSError as exc:
        fail(f"open {maillog}: {exc.strerror}")
    master = Master(config_directory, foreground)
    try:
        master.start(cfg, services)
    except (StartupError, ConfigError) as exc:
        fail(str(exc))
    if notify is not None:
        notify(None)
    return master.run()
