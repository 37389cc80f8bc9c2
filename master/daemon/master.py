"""master.daemon.master - master(8): the resident supervisor process and its event loop.

Summary
    One process, one thread, one ``selectors`` loop (design.md §4 rules 1-3) over:
    a signal wakeup socket (``signal.set_wakeup_fd``; the handlers only record the
    signal), the status channel of every service, the listeners of services that may
    spawn on demand, and the timers (wakeups, throttles, the stop grace period).  The
    policy lives in master.daemon.supervisor; this module does the I/O around it.

    Start-up (run_master): read and check main.cf and master.cf (every value, the
    ``-o`` overrides, command modules, inet ports and hosts: master.config.validate; a
    problem is ``fatal: <file>, line <n>: ...`` with nothing started), open the log
    (created 0644 before any child exists: children open it before they drop
    privileges), log the configuration warnings (duplicate services, unused ``-o``
    parameters), look up mail_owner
    (as root it must exist and be unprivileged - "fatal: <dir>/main.cf, line <n>:
    parameter mail_owner: unknown user name value: x" - otherwise one warning that everything runs
    as the invoking user, master.server.jail), lock ``pid/master.pid`` (a second master
    gets "fatal: the qmgrd mail system is already running (pid N)" and exits 1 having
    touched nothing), create or repair the queue directories and data_directory
    (master.daemon.queuedirs; each fix logged), lock ``$data_directory/master.lock``,
    chdir to queue_directory, install the signal handlers, run ``qmgr-ctl repair`` to
    its end (REPAIR_COMMAND, as ``postfix start`` runs postsuper: queue files and logs
    left in the hash directories of an earlier hash_queue_names/hash_queue_depth are
    moved where the processes look for them; it takes as long as the queue needs, and
    every REPAIR_REPORT_INTERVAL (1 s) after the first the master tells its starter
    ``repairing <pid>`` (run_master's ``progress``), so that qmgr-master start waits
    for it however long it takes; exit status 74 - some files could not be renamed, the
    rest was done - is ``warning: queue structure check: qmgr-ctl repair exit status
    74: ...`` and the start goes on, as postsuper only warns about a failed rename; any
    other failure fails the start: ``fatal: queue structure check failed: qmgr-ctl
    repair exit status 75 (...)``; a stop signal meanwhile ends the repair (SIGTERM,
    SIGKILL after STOP_GRACE) and the master: ``terminating on signal <n> during the
    queue structure check (...)``, exit 0, nothing started), create every endpoint
    (owned by mail_owner;
    a failure is ``fatal: <master.cf>, line <n>: cannot open endpoint <endpoint>:
    <reason>``), open the control socket ``pid/master.ctl`` (master.daemon.control), set the process name
    ``qmgrd: master`` (see master.server.skeleton on titles), log ``daemon started --
    version 0.1, configuration <dir>``.

    The loop: re-assert both locks (one flock each), run due timers, then sleep in
    select() until a descriptor is ready or the next real timer (a wakeup, the end of a
    throttle, a control client's deadline, the stop grace) is due - never a polling
    timeout, so an idle master costs no CPU.

    Signals (postfix.md §3.7): SIGHUP reloads (main.cf and master.cf re-read and checked
    as at start-up; on any error the running configuration stays: ``warning: reload
    failed, keeping the current configuration: <file>, line <n>: ...``; else
    ``reload -- version 0.1, configuration <dir>``; when hash_queue_names or
    hash_queue_depth changed, ``qmgr-ctl repair`` is then started in the background, as
    ``postfix reload`` runs ``postsuper &`` after its SIGHUP, and reaped by the loop; a
    second change while it runs starts it once more after it ends).  SIGTERM, SIGINT,
    SIGQUIT stop: ``terminating on signal <n>``, every status channel closed, SIGTERM to
    every child (and to a running qmgr-ctl repair: the next start finishes its work),
    up to STOP_GRACE (5 s) of reaping, SIGKILL to the rest, pid file removed, exit 0.
    SIGCHLD reaps.

    inet services without a host part listen on every address of inet_interfaces (one
    socket each; the children get them all, ``-s N``).

Logs (besides master.daemon.supervisor's)
    warning: not started as root: every process runs as user <u> (uid <n>), ...
    created <dir> (mode 1733, owner <uid>:<gid>) / fixed <dir>: mode|owner <a> -> <b>
    warning: mail_owner <u> cannot reach queue_directory <q>: no search permission on <d>
    warning: <master.cf>, line <n>: duplicate service <name>/<type>, overrides line <m>
    warning: <master.cf>, line <n>: unused parameter: -o <name>=<value>
    warning: reload failed, keeping the current configuration: <file>, line <n>: <what>
    fatal: refresh exclusive lock <file>: <error>;  fatal: <start-up failure>
    hash_queue_names or hash_queue_depth changed: qmgr-ctl repair (pid <n>) moves the
        queue files into place
    warning: qmgr-ctl repair pid <n> exit status <s>: some queue files may still be out
        of place (...)

Public API
    VERSION = "0.1"
    settings_from(cfg, foreground, services=(), privileged=False) -> Settings
        raises ConfigError (a bad watchdog time)
    Master(config_directory, foreground=False): start() (raises StartupError), run() -> int
    StartupError: start-up failed (str = the reason, without "fatal: ")
    StartupStopped(StartupError): a stop signal during the start-up repair (.signum, .pid)
    run_master(config_directory, foreground=False, notify=None, progress=None) -> int
    close_inherited()    close the inheritable descriptors above 2 (run_master does it
                         first: nothing the starter left open reaches a child)
        the whole master life; ``notify(None)`` once started, ``notify(reason)`` when
        start-up failed or was stopped (the CLI's background parent waits for this);
        ``progress("repairing <pid>")`` every REPAIR_REPORT_INTERVAL while the start-up
        repair runs, after its first second.  Returns 0 after a stop (also one during
        the start-up repair); a failed start-up logs ``fatal: <reason>`` and raises
        SystemExit(1).
    REPAIR_INCOMPLETE = 74   qmgr-ctl repair's exit status for "some files could not be
                             renamed" (qmgrd.ctl.change): a warning, not a failure
    REPAIR_PROGRESS = "repairing"   the first word of a progress report
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

import setproctitle

from master import log
from master.config import Config, ConfigError, Service, describe, load_configuration
from master.config.validate import inet_hosts
from master.daemon import control
from master.daemon.pidfile import (
    AlreadyRunning,
    PidFile,
    lock_path,
    pid_path,
    write_reload_verdict,
)
from master.daemon.queuedirs import check_queue_dirs, require_parent, unreachable_by
from master.daemon.spawn import PosixOs, child_argv, command_argv, describe_exit, high_fd
from master.daemon.supervisor import EndpointError, Settings, Supervisor
from master.server.jail import Owner, OwnerError, lookup_mail_owner, unprivileged_warning
from master.server.watchdog import watchdog_timeout

__all__ = [
    "REPAIR_COMMAND",
    "REPAIR_INCOMPLETE",
    "REPAIR_PROGRESS",
    "REPAIR_REPORT_INTERVAL",
    "STOP_GRACE",
    "VERSION",
    "Master",
    "StartupError",
    "run_master",
    "settings_from",
]

VERSION = "0.1"
#: Postfix's postsuper as postfix-script runs it: the queue structure check and repair
#: (qmgrd.spool.structure), a command of the layer above, named, never imported
REPAIR_COMMAND = ("qmgrd.ctl", "repair")
#: its exit status when some files could not be renamed into place and the rest was done
#: (EX_IOERR; qmgrd.ctl.change): postsuper warns about a failed rename and goes on
REPAIR_INCOMPLETE = 74
REPAIR_PROGRESS = "repairing"
REPAIR_REPORT_INTERVAL = 1.0  # s: how often the start-up repair is reported as running
STOP_GRACE = 5.0
KILL_GRACE = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
_LISTEN = "listen"
_STATUS = "status"
_SIGNAL = "signal"


class StartupError(Exception):
    """The master cannot start (str = the reason)."""


def settings_from(cfg: Config, foreground: bool, services: Sequence[Service] = (),
                  privileged: bool = False) -> Settings:
    """The Settings of the master's policy from main.cf (and each service's watchdog
    time, with its -o overrides).  Raises ConfigError."""
    watchdog = {svc.service_key: watchdog_timeout(svc.child_config(cfg),
                                                  svc.module.rpartition(".")[2])
                for svc in services}
    return Settings(config_directory=cfg.config_directory,
                    queue_directory=cfg.queue_directory(),
                    default_process_limit=cfg.get_int("default_process_limit"),
                    service_throttle_time=cfg.get_time("service_throttle_time"),
                    foreground=foreground, privileged=privileged, watchdog=watchdog)


def _load(config_directory: str, warnings: list[str]) -> tuple[Config, list[Service]]:
    """main.cf and master.cf, fully checked (master.config.validate); the warnings found
    (duplicate services, unused -o parameters) are appended to ``warnings``.  Raises
    ConfigError."""
    return load_configuration(config_directory, warnings.append)


class StartupStopped(StartupError):
    """A stop signal (``signum``) came while the start-up repair (pid ``pid``) ran: it
    was ended and nothing was started."""

    def __init__(self, signum: int, pid: int) -> None:
        self.signum = signum
        self.pid = pid
        super().__init__(f"stopped by signal {signum} during the queue structure check "
                         "(qmgr-ctl repair), before any service started")


class Master:
    """The master process: locks, signals, selector loop around a Supervisor.

    The constructor does no I/O; start() does everything that can fail.  ``progress``
    receives ``repairing <pid>`` while the start-up repair runs (see run_master).
    """

    def __init__(self, config_directory: str, foreground: bool = False,
                 progress: Callable[[str], None] | None = None) -> None:
        self.config_directory = os.path.abspath(config_directory)
        self.foreground = foreground
        self.progress = progress
        self.selector = selectors.DefaultSelector()
        self.pidfile: PidFile | None = None
        self._reloads = 0  # SIGHUPs handled (the serial of pid/master.reload)
        self.lockfile: PidFile | None = None
        self.supervisor: Supervisor | None = None
        self.control: control.ControlServer | None = None
        self.owner: Owner | None = None
        self.started = 0.0
        self._pending: list[int] = []
        self._sig_r = -1
        self._sig_w = -1
        self._watched: dict[int, str] = {}
        self._stop_deadline: float | None = None
        self._killed = False
        self._posix: PosixOs | None = None
        self._hashing: tuple[tuple[str, ...], int] | None = None  # as the queue is laid out
        self._repair_pid: int | None = None  # a qmgr-ctl repair started at a reload
        self._repair_again = False  # the hashing changed again while it ran

    # --- start-up ---------------------------------------------------------------------
    def start(self, cfg: Config, services: list[Service]) -> None:
        """Check mail_owner, lock the pid file, make/repair directories, open endpoints
        and the control socket, install signals.

        Raises:
            StartupError: bad mail_owner, already running, a directory, lock or
                endpoint cannot be made, or data_directory is not an absolute path (a
                Config that passed cfg.check() has one).
        """
        try:
            owner = lookup_mail_owner(cfg)
        except OwnerError as exc:
            raise StartupError(str(exc)) from None
        self.owner = owner
        if not owner.privileged:
            log.warning(unprivileged_warning(owner))
        settings = settings_from(cfg, self.foreground, services, owner.privileged)
        qdir = settings.queue_directory
        try:  # run_master checked that queue_directory's parent exists (require_parent)
            os.makedirs(os.path.join(qdir, "pid"), mode=0o755, exist_ok=True)
            pidfile = PidFile(pid_path(qdir))
            pidfile.acquire()
        except AlreadyRunning as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"open lock file {pid_path(qdir)}: {exc.strerror}") from None
        self.pidfile = pidfile
        try:
            self._prepare(cfg, owner, qdir)
            os.chdir(qdir)
            endpoint_owner = (owner.uid, owner.gid) if owner.privileged else None
            posix = PosixOs(self._forget, inet_hosts(cfg), endpoint_owner)
            self._posix = posix
            self._install_signals()  # a stop during the repair is the loop's to handle

            def preload() -> None:
                # every module before the first fork (PosixOs.preload), loaded while the
                # repair runs: on two CPUs the two overlap (issue 8, scenario H counts
                # the start)
                for svc in services:
                    posix.preload(child_argv(svc, settings.config_directory,
                                             settings.foreground, settings.privileged))

            self._repair_structure(cfg, posix, preload)
            sup = Supervisor(posix, settings)
            self.supervisor = sup
            sup.start(services)
            self.control = control.ControlServer(control.control_path(qdir),
                                                 self._control_request, self.selector)
            self.control.open()
        except StartupError:
            self._shutdown_fds()
            raise
        except (AlreadyRunning, EndpointError, ConfigError) as exc:
            self._shutdown_fds()
            raise StartupError(str(exc)) from None
        except (OSError, ValueError) as exc:
            self._shutdown_fds()
            raise StartupError(describe(exc)) from None
        setproctitle.setproctitle("qmgrd: master")
        setproctitle.setthreadtitle("qmgrd: master")
        self.started = time.time()
        log.info(f"daemon started -- version {VERSION}, configuration "
                 f"{self.config_directory}")

    def _prepare(self, cfg: Config, owner: Owner, qdir: str) -> None:
        """Repair the queue tree (logging each change), take master.lock, warn when
        mail_owner cannot reach the queue directory.  Raises OSError, AlreadyRunning,
        ConfigError (Config.data_directory)."""
        data_directory = cfg.data_directory()
        for change in check_queue_dirs(qdir, data_directory, owner):
            log.info(change)
        lock = PidFile(lock_path(data_directory))
        lock.acquire()
        self.lockfile = lock
        if owner.privileged:
            blocked = unreachable_by(qdir, owner.uid, owner.gid)
            if blocked is not None:
                log.warning(f"mail_owner {owner.name} cannot reach queue_directory {qdir}:"
                            f" no search permission on {blocked}")

    def _repair_structure(self, cfg: Config, posix: PosixOs,
                          meanwhile: Callable[[], None] | None = None) -> None:
        """Run ``qmgr-ctl repair`` (REPAIR_COMMAND) to its end before any service starts,
        as ``postfix start`` runs postsuper: queue files and logs left in the hash
        directories of an earlier hash_queue_names/hash_queue_depth are moved where
        every process will look for them (it logs what it did; it drops to mail_owner
        itself).  ``meanwhile`` (the service modules' preload) runs while it does; the
        repair is ended if that raises.  However long it takes: ``progress`` is told it
        runs every REPAIR_REPORT_INTERVAL after the first.  The signal handlers must be installed:
        a stop signal meanwhile ends it.  Exit status REPAIR_INCOMPLETE (some files
        could not be renamed) logs a warning and the start goes on.

        Raises:
            StartupError: it failed (Postfix: "Postfix integrity check failed!").
            StartupStopped: a stop signal came meanwhile (the repair was ended).
            OSError: it could not be started.  ConfigError: bad hashing parameters.
        """
        self._hashing = _hashing(cfg)
        pid = posix.start_command(self._repair_argv())
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                self._end_command(posix, pid)
                raise
        code = self._wait_repair(posix, pid)
        if code == REPAIR_INCOMPLETE:
            log.warning(f"queue structure check: qmgr-ctl repair {describe_exit(code)}: "
                        "some queue files could not be moved into place (see its "
                        "warnings above; run qmgr-ctl repair once the cause is fixed); "
                        "starting anyway")
        elif code != 0:
            raise StartupError(f"queue structure check failed: qmgr-ctl repair "
                               f"{describe_exit(code)} (see its lines in the mail log)")

    def _wait_repair(self, posix: PosixOs, pid: int) -> int:
        """Wait for the start-up repair ``pid`` to end (SIGCHLD, through the signal
        wakeup socket), reporting it to ``progress`` meanwhile; its exit code.  Raises
        StartupStopped on a stop signal, after ending it."""
        started = time.monotonic()
        report_at = started + REPAIR_REPORT_INTERVAL
        while True:
            code = posix.wait_command(pid)
            if code is not None:
                return code
            stop = next((s for s in self._pending if s in STOP_SIGNALS), None)
            if stop is not None:
                self._end_command(posix, pid)
                raise StartupStopped(stop, pid)
            now = time.monotonic()
            if now >= report_at:
                if self.progress is not None:
                    self.progress(f"{REPAIR_PROGRESS} {pid}")
                report_at = now + REPAIR_REPORT_INTERVAL
            select.select([self._sig_r], [], [], max(0.0, report_at - now))
            self._drain_wakeups()

    def _end_command(self, posix: PosixOs, pid: int) -> None:
        """SIGTERM the one-shot command ``pid``, SIGKILL after STOP_GRACE; reap it."""
        posix.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while posix.wait_command(pid) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                posix.kill(pid, signal.SIGKILL)
                posix.wait_command(pid, block=True)
                return
            select.select([self._sig_r], [], [], min(left, 0.1))
            self._drain_wakeups()

    def _repair_after_reload(self, cfg: Config) -> None:
        """After a reload that changed hash_queue_names or hash_queue_depth, start
        ``qmgr-ctl repair`` in the background (postfix reload runs ``postsuper &`` after
        signalling the master); the loop goes on meanwhile and reaps it."""
        try:
            hashing = _hashing(cfg)
        except ConfigError:  # not reached: the reload checked every value
            return
        if hashing == self._hashing or self._posix is None:
            return
        self._hashing = hashing
        if self._repair_pid is not None:
            self._repair_again = True  # after the one running (it has the old setting)
            return
        self._start_repair()

    def _repair_argv(self) -> list[str]:
        """The command line of ``qmgr-ctl repair`` for this configuration."""
        return command_argv(REPAIR_COMMAND[0], self.config_directory, *REPAIR_COMMAND[1:])

    def _start_repair(self) -> None:
        assert self._posix is not None
        try:
            self._repair_pid = self._posix.start_command(self._repair_argv())
        except OSError as exc:
            log.warning(f"cannot run qmgr-ctl repair: {exc}: queue files in the hash "
                        "directories of the former hashing are not found until it runs")
            return
        log.info(f"hash_queue_names or hash_queue_depth changed: qmgr-ctl repair (pid "
                 f"{self._repair_pid}) moves the queue files into place")

    def _reaped(self, ended: list[tuple[int, int]]) -> None:
        """Report the one-shot commands that ended (Supervisor.reap's leftovers)."""
        for pid, code in ended:
            if pid != self._repair_pid:
                continue
            self._repair_pid = None
            stopped = self._stop_deadline is not None and code == -signal.SIGTERM
            if code != 0 and not stopped:
                log.warning(f"qmgr-ctl repair pid {pid} {describe_exit(code)}: some queue "
                            "files may still be out of place (see its lines above; run "
                            "qmgr-ctl repair)")
            if self._repair_again and self._stop_deadline is None:
                self._repair_again = False
                self._start_repair()

    def _control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's handler (master.daemon.control)."""
        sup = self.supervisor
        if request.get("request") != "status" or sup is None:
            return {"error": "unknown request"}
        reply = sup.snapshot(time.time() - sup.os.monotonic())
        owner = self.owner
        reply.update(pid=os.getpid(), version=VERSION, started=round(self.started, 3),
                     config_directory=self.config_directory,
                     queue_directory=sup.settings.queue_directory,
                     mail_owner=owner.name if owner else "",
                     mail_owner_uid=owner.uid if owner else -1)
        return reply

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
        ctl = self.control
        assert ctl is not None
        while True:
            self._reassert_locks()
            sup.run_timers()
            ctl.run_timers()
            if self._stop_deadline is not None and self._stopping_done(sup):
                break
            self._sync(sup)
            events = self.selector.select(self._timeout(sup))
            ready = [(key.fd, key.data) for key, _ in events]
            for fd, kind in ready:
                if kind == _STATUS and fd in self._watched:
                    sup.on_status_ready(fd)
            self._handle_signals(sup)
            for key, mask in events:
                if key.data == control.KIND:
                    ctl.on_ready(key.fd, mask)
            for fd, kind in ready:
                if kind == _LISTEN and fd in self._watched:
                    sup.on_listener_ready(fd)
                    self._sync(sup)
        self._shutdown_fds()
        return 0

    def _reassert_locks(self) -> None:
        """Postfix re-asserts its locks in every loop iteration; so do we (cheap)."""
        for lock in (self.pidfile, self.lockfile):
            if lock is not None:
                try:
                    lock.reassert()
                except OSError as exc:
                    log.fatal(f"refresh exclusive lock {lock.path}: {exc.strerror}")

    def _timeout(self, sup: Supervisor) -> float | None:
        ctl_deadline = self.control.next_deadline() if self.control is not None else None
        deadlines = [t for t in (sup.next_deadline(), self._stop_deadline, ctl_deadline)
                     if t is not None]
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

    def _drain_wakeups(self) -> None:
        """Empty the signal wakeup socket (the signals are in ``_pending``)."""
        try:
            while os.read(self._sig_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _handle_signals(self, sup: Supervisor) -> None:
        self._drain_wakeups()
        pending, self._pending = self._pending, []
        for signum in pending:
            if signum == signal.SIGCHLD:
                self._reaped(sup.reap())
            elif signum == signal.SIGHUP:
                if self._stop_deadline is None:
                    self._reload(sup)
            elif signum in STOP_SIGNALS and self._stop_deadline is None:
                log.info(f"terminating on signal {signum}")
                self._stop_deadline = sup.os.monotonic() + STOP_GRACE
                sup.stop()
                if self._repair_pid is not None:  # interrupted, it loses nothing: the
                    sup.os.kill(self._repair_pid, signal.SIGTERM)  # next start runs it
                self._reaped(sup.reap())

    def _stopping_done(self, sup: Supervisor) -> bool:
        """During a stop: True once no child is left or the grace time is over."""
        assert self._stop_deadline is not None
        if not sup.children:
            return True
        now = sup.os.monotonic()
        if now < self._stop_deadline:
            return False
        if not self._killed:
            sup.kill_remaining(STOP_GRACE)
            self._killed = True
            self._stop_deadline = now + KILL_GRACE
            return False
        return True

    def _reload(self, sup: Supervisor) -> None:
        """SIGHUP: re-read and check both files; on any error keep what runs. The verdict
        goes to ``pid/master.reload`` (pidfile.write_reload_verdict) for qmgr-master."""
        warnings: list[str] = []
        self._reloads += 1
        qdir = sup.settings.queue_directory
        try:
            cfg, services = _load(self.config_directory, warnings)
            settings = settings_from(cfg, self.foreground, services,
                                     sup.settings.privileged)
        except ConfigError as exc:
            for text in warnings:
                log.warning(text)
            log.warning(f"reload failed, keeping the current configuration: {exc}")
            self._verdict(qdir, str(exc))
            return
        self._reopen_log(cfg)
        for text in warnings:
            log.warning(text)
        log.info(f"reload -- version {VERSION}, configuration {self.config_directory}")
        problems = sup.reload(settings, services)
        self._verdict(qdir, None, "; ".join(problems) or None)
        self._repair_after_reload(cfg)

    def _reopen_log(self, cfg: Config) -> None:
        """At a reload, open maillog_file again (its new value, or the same path): a log
        rotated by renaming the file gets the master's lines from then on, as every
        child's (each opens the log when it starts, and a reload replaces them all).
        Postfix's postlogd, which writes maillog_file for all its processes, does the
        same when ``postfix reload`` restarts it. When the file cannot be opened the
        master keeps the descriptor it has and logs a warning there."""
        try:
            _open_log(cfg, self.foreground)
        except OSError as exc:  # log.setup keeps the log it had
            log.warning(f"reload: cannot open {cfg.maillog_file()}: {exc.strerror} "
                        "(logging on to the file opened before)")

    def _verdict(self, queue_directory: str, error: str | None,
                 incomplete: str | None = None) -> None:
        try:
            write_reload_verdict(queue_directory, self._reloads, error, incomplete)
        except OSError as exc:
            log.warning(f"cannot record the reload verdict: {exc}")

    def _shutdown_fds(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.supervisor is not None:
            self.supervisor.close_all()
        if self._sig_r >= 0:
            signal.set_wakeup_fd(-1)
            self.selector.unregister(self._sig_r)
            for fd in (self._sig_r, self._sig_w):
                os.close(fd)
            self._sig_r = self._sig_w = -1
        self.selector.close()
        if self.lockfile is not None:
            self.lockfile.release()
            self.lockfile = None
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None


def _hashing(cfg: Config) -> tuple[tuple[str, ...], int]:
    """The queue layout ``cfg`` asks for: (hashed queue names, lower case and sorted;
    hash_queue_depth).  Raises ConfigError."""
    names = sorted(set(cfg.hash_queue_names()))
    return tuple(names), cfg.get_int("hash_queue_depth")


def _log_early(config_directory: str, foreground: bool) -> None:
    """Best effort, for a configuration error at start: open the log that main.cf names
    (read leniently), so that the fatal line reaches the maillog as well as stderr."""
    try:
        cfg, _errors = Config.load_lenient(config_directory)
        _open_log(cfg, foreground)
    except (ConfigError, OSError):
        return


def _open_log(cfg: Config, foreground: bool) -> None:
    """The master's log: maillog_file (created 0644 if new, _create_maillog) or syslog,
    under syslog_name.  Raises OSError (the file cannot be made or opened; a log opened
    before is kept) or ConfigError (a value cannot be expanded, or maillog_file is a
    relative path: Config.maillog_file)."""
    maillog = cfg.maillog_file()
    if maillog:
        _create_maillog(maillog)
    log.setup("master", maillog, cfg.get("syslog_name") or "qmgrd", foreground=foreground)


def _create_maillog(path: str) -> None:
    """Create the log file 0644 whatever the umask (a new file only).  Children open it
    before they drop privileges, so root ownership is fine; readers need not be root.
    Its directory is never created (Postfix's postlogd neither): a missing one raises
    FileNotFoundError (load_configuration refuses such a maillog_file before)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)


def close_inherited() -> None:
    """Close every descriptor above 2 that whoever started the master left inheritable
    (a shell's ``9>file``, the pipe of ``$(...)`` or of an ssh session): no child of the
    master - chrooted and unprivileged ones included - may get them, and the caller's
    pipe must see its end when ``qmgr-master start`` returns. Our own descriptors are
    close-on-exec (PEP 446) and are kept."""
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    for name in os.listdir(fd_dir):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if os.get_inheritable(fd):
                os.close(fd)
        except OSError:
            pass  # the listing's own descriptor, closed by now


def run_master(config_directory: str, foreground: bool = False,
               notify: Callable[[str | None], None] | None = None,
               progress: Callable[[str], None] | None = None) -> int:
    """Run the master from start-up to stop (module docstring); returns the exit code."""
    def fail(reason: str) -> NoReturn:
        if notify is not None:
            notify(reason)
        log.fatal(reason)

    close_inherited()
    warnings: list[str] = []
    try:
        cfg, services = _load(config_directory, warnings)  # cfg.check(): values expand
    except ConfigError as exc:
        _log_early(config_directory, foreground)
        fail(str(exc))
    try:  # before the log's directories are made: they could make a typo's parent exist
        require_parent(cfg.queue_directory(), "queue_directory")
    except FileNotFoundError as exc:
        fail(str(exc.strerror))
    try:
        _open_log(cfg, foreground)
    except OSError as exc:
        fail(f"open {cfg.maillog_file()}: {exc.strerror}")
    for text in warnings:
        log.warning(text)
    master = Master(config_directory, foreground, progress)
    try:
        master.start(cfg, services)
    except StartupStopped as exc:
        if notify is not None:
            notify(str(exc))
        log.info(f"terminating on signal {exc.signum} during the queue structure check "
                 f"(qmgr-ctl repair pid {exc.pid} ended; the next start runs it again)")
        return 0
    except (StartupError, ConfigError) as exc:
        fail(str(exc))
    if notify is not None:
        notify(None)
    return master.run()
