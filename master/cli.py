"""qmgr-master - start, stop, reload and inspect the qmgrd master (postfix(1) for master).

Synopsis
    qmgr-master [-c DIR] start [--foreground]
    qmgr-master [-c DIR] stop | reload | check
    qmgr-master [-c DIR] status [--json]

Description
    ``-c DIR`` names the configuration directory (default ``$QMGRD_CONFIG_DIR``, else
    /etc/qmgrd) holding main.cf and master.cf.

    start      Check main.cf and master.cf first, as the master does
               (master.config.validate: syntax, every parameter value including each
               service's ``-o`` overrides, command modules, inet ports and hosts; a
               problem: ``qmgr-master: fatal: <file>, line <n>: ...`` on stderr, exit 1,
               nothing started; warnings - duplicate services, unused ``-o``
               parameters - as ``qmgr-master: warning: ...``); as root,
               refuse a mail_owner that does not exist or is privileged (``qmgr-master:
               fatal: <dir>/main.cf, line <n>: parameter mail_owner: unknown user name
               value: x``, exit 1); refuse when a master already runs (exit 1, the running one
               untouched).  Before the services start the master runs ``qmgr-ctl
               repair`` to its end (master.daemon.master; exit status 74, some files
               left out of place, is a warning in the mail log; any other failure
               fails the start).  Without --foreground, fork once: the child starts a
               new session, puts stdio on /dev/null and runs the master; the parent
               says ``qmgr-master: starting the qmgrd mail system (master pid <n>)``
               (postfix-script's "starting the Postfix mail system"; the master itself
               logs ``daemon started`` as before), then waits until the master reports
               that it started and exits 0 (1 with the reason if it failed, or was
               stopped during the repair).  The wait
               is START_TIMEOUT (10 s) from the last report: while the repair runs the
               master reports it every second (after the first), so a repair of a
               large queue is waited for however long it takes, after one line
               ``qmgr-master: waiting for the queue structure check (qmgr-ctl repair,
               pid <n>) before the services start``.  No report in time while the
               master still runs: ``warning: the master (pid <n>) did not report
               start-up within 10s; it is still starting: see its log, and check with
               'qmgr-master status'``, exit 75 (outcome unknown, as stop and reload:
               the master goes on starting in the background); the master gone
               without a report: ``fatal: the master exited during start-up (status
               <n>)``, exit 1.  With --foreground the master runs in this process
               (logging also to stderr) until stopped.
    stop       SIGTERM the master (``stopping the qmgrd mail system (master pid <n>)``,
               as postfix-script's "stopping the Postfix mail system") and wait until
               it and its services (its children) are gone - not the commands pipe(8)
               runs, which outlive their agent as under Postfix; a master that ended
               but is not yet reaped counts as gone; exit 0.  Not all gone within
               STOP_TIMEOUT (15 s; e.g. a master stopped with SIGSTOP): ``warning:
               still running after 15s: <pids>``, exit 75 (outcome unknown: the
               signal is pending).
               Not running: "the qmgrd mail system is not running", exit 1 (as
               ``postfix stop``).
    reload     Check both files as start does, then SIGHUP the master (``refreshing
               the qmgrd mail system (master pid <n>)``, as postfix-script's
               "refreshing the Postfix mail system") and wait (up to
               RELOAD_TIMEOUT, 10 s) for its verdict in ``pid/master.reload``: exit 0
               when it reloaded; exit 1 with ``the master refused the reload and keeps
               its configuration: <why>`` when its own check (in its environment: a
               user's transport module must be importable by the master) failed; no
               answer in time (a stopped or hung master): a warning, exit 75 (outcome
               unknown: the master acts on the signal when it runs again).  (A maillog_file that cannot be
               opened is such a refusal: the master logs ``warning: reload failed,
               keeping the current configuration: <main.cf>, line <n>: cannot open
               maillog_file ...`` in the log it keeps.)  A bad file: ``qmgr-master: fatal:
               <file>, line <n>: ...``, exit 1, the master is not signalled (it keeps
               its configuration; signalled directly it checks again and keeps it
               too).  Not running: exit 1.  stop and reload
               by a user who may not signal the master (it runs as root):
               ``qmgr-master: fatal: stop: permission denied (the master runs as root;
               run as root)``, exit 1.  For every command a missing configuration
               directory (-c) is one fatal line, exit 1.
    status     Exit 0 when running, 3 when not.  Shows every service (name, type,
               maxproc, throttled-until) and each of its processes: pid, busy/idle, uses
               (completed requests), uid, root directory (chroot) - the master's own state
               from its control socket (master.daemon.control), uid and root from /proc
               (psutil).  Without access to the control socket (another user's master)
               only the /proc part is shown, after a note.  --json prints one object:
               {"running", "pid", "master": <the master's reply or null>,
                "services": [{"name", "type", "maxproc", "throttled_until" (epoch s or
                  null), "generation", "endpoint", "unpriv", "chroot", "processes": [{"pid",
                  "state" ("idle"|"busy"), "uses", "generation", "uid", "user", "root",
                  "chrooted"}]}],
                "processes": [{"pid", "service", "title", "cmdline", "uid", "user", "root",
                  "chrooted", "state", "uses"}]}   (the master first, then every child).
    (broken main.cf) stop and status still find the master's pid file: after
               ``qmgr-master: warning: <file>, line <n>: ... (bad lines ignored to find
               the queue directory)`` they take queue_directory from the lines that
               parse, so status's 0 / 3 keep their meaning; only when even that fails
               (queue_directory itself cannot be expanded, or is empty or relative:
               master.config.Config.queue_directory): ``qmgr-master: fatal: cannot find
               the queue directory: <file>, line <n>: bad queue_directory parameter
               value "spool": not an absolute path``, exit 1 ("cannot tell").
    (queue_directory changed while running) when main.cf's queue_directory holds no
               running master's pid file but data_directory's master.lock is held by
               one (main.cf was edited while the master ran), start, stop, reload
               and status all say so, exit 1: ``qmgr-master: fatal: the qmgrd mail
               system is running (master pid <n>) with queue_directory <old>, not
               main.cf's <new> (changed while it ran?): put queue_directory = <old>
               back to stop or reload it, then change it``.  (Postfix has the same
               weakness - postfix-script finds the master by queue_directory - and
               just says "not running"; the master's own master.lock check made our
               start say "already running" meanwhile.)
    (no queue directory) status, stop and reload: ``qmgr-master: fatal: queue
               directory <path>: No such file or directory``, exit 1 (status too: a
               missing directory is a configuration or installation problem, not a
               stopped mail system).  start creates it when its parent exists.
    check      Create missing queue directories and data_directory, fix wrong owners and
               modes (master.daemon.queuedirs); one line per change on stderr; exit 0.
               Then a maillog_file that cannot be opened for appending (its directory
               missing or not writable: no directory is made for the log, as Postfix's
               postlogd makes none) is fatal, exit 1: ``qmgr-master: fatal:
               <main.cf>, line <n>: cannot open maillog_file "<path>": ...``
               (master.config.validate.check_maillog); start refuses it the same way.

Environment
    QMGRD_START_TIMEOUT, QMGRD_STOP_TIMEOUT, QMGRD_RELOAD_TIMEOUT: the waits above in
    seconds (a positive number; default 10, 15 and 10), for the test suite, which
    shortens them to see the "did not report", "still running" and "no answer" paths
    without waiting them out.  Unset or empty: the default; a bad value: a warning, and
    the default.  (Postfix's postfix(1) has no such knobs.)

Messages go to stderr as ``qmgr-master: <text>`` (``qmgr-master: fatal: <text>`` for
errors).  Exit codes: 0 success, 1 failure, 3 status "not running", 75 (EX_TEMPFAIL)
outcome not known yet: start, stop or reload whose wait for the master ended first.

Public API
    main: the click group (console script ``qmgr-master``).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from typing import Any, NoReturn

import click
import psutil  # type: ignore[import-untyped]

from master.config import Config, ConfigError, Service, describe, load_configuration
from master.daemon.control import control_path, query
from master.daemon.master import REPAIR_PROGRESS, run_master
from master.daemon.pidfile import (
    lock_path,
    pid_path,
    read_reload_verdict,
    running_elsewhere,
    running_pid,
)
from master.daemon.queuedirs import check_queue_dirs, directory_problem
from master.daemon.spawn import wait_child
from master.server.jail import Owner, OwnerError, lookup_mail_owner

__all__ = ["main"]

PROG = "qmgr-master"
START_TIMEOUT = 10.0  # s: how long start waits for the master's next report
RELOAD_TIMEOUT = 10.0  # s: how long reload waits for the master's verdict
STOP_TIMEOUT = 15.0  # s: how long stop waits for the master and every child to be gone
EX_TEMPFAIL = 75  # sysexits: the outcome of a start, stop or reload is not known yet
SELECT_SLICE = 3600.0  # s: the longest single select() of start's wait (a huge
#                        QMGRD_START_TIMEOUT such as 1e300 overflows select's time_t)


def _say(text: str) -> None:
    click.echo(f"{PROG}: {text}", err=True)


def _fatal(text: str) -> NoReturn:
    _say(f"fatal: {text}")
    sys.exit(1)


def _timeout(name: str, default: float) -> float:
    """The wait, in seconds, of start, stop or reload: ``$QMGRD_<name>`` (e.g.
    QMGRD_STOP_TIMEOUT=2, a positive number of seconds) when set and not empty, else
    ``default`` (START_TIMEOUT, STOP_TIMEOUT, RELOAD_TIMEOUT).  A knob for the test
    suite (waiting out 10-15 s to see the "no answer" paths); Postfix's postfix(1) has no
    such setting.  A bad value: a warning, and ``default``."""
    var = f"QMGRD_{name}"
    raw = os.environ.get(var, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        _say(f"warning: ignoring {var}={raw!r}: not a positive number of seconds; "
             f"using {default:g}")
        return default
    return value


def _default_config_dir() -> str:
    return os.environ.get("QMGRD_CONFIG_DIR") or "/etc/qmgrd"


def _config(ctx: click.Context) -> Config:
    try:
        return Config.load(ctx.obj)
    except ConfigError as exc:
        _fatal(str(exc))


def _checked_config(ctx: click.Context, warn: bool = True, modules: bool = True,
                    logfile: bool | None = None) -> tuple[Config, list[Service]]:
    """main.cf and master.cf fully checked (master.config.validate), as the master will
    check them (``modules`` False: without looking for the services' modules, or
    whether maillog_file can be opened - reload leaves both to the running master,
    whose environment may differ from ours and who logs its refusal in the log it
    keeps; ``logfile`` False: without the maillog_file check alone); warnings printed
    (with ``warn``); an error is fatal (exit 1)."""
    def say_warning(text: str) -> None:
        if warn:
            _say(f"warning: {text}")

    try:
        return load_configuration(ctx.obj, say_warning, modules=modules,
                                  logfile=modules if logfile is None else logfile)
    except ConfigError as exc:
        errors = [exc, *exc.others]  # every bad master.cf line in one run
        for bad in errors[:-1]:
            _say(f"fatal: {bad}")
        _fatal(str(errors[-1]))


def _queue_directory(ctx: click.Context) -> str:
    """queue_directory (Config.queue_directory: absolute) for stop and status, also from
    a broken main.cf: a warning, then the lines that parse are used; fatal (exit 1) if
    the value is bad (empty, relative) or cannot be expanded, or if the directory does
    not exist (_existing)."""
    try:
        cfg = Config.load(ctx.obj)
    except ConfigError as exc:
        _say(f"warning: {exc} (bad lines ignored to find the queue directory)")
        try:
            cfg, _ = Config.load_lenient(ctx.obj)
        except ConfigError as err:
            _fatal(f"cannot find the queue directory: {err}")
    try:
        qdir = cfg.queue_directory()
    except ConfigError as exc:
        _fatal(f"cannot find the queue directory: {exc}")
    _running_elsewhere(cfg, qdir)
    return _existing(qdir)


def _running_elsewhere(cfg: Config, queue_directory: str) -> None:
    """Fatal (exit 1) when a master of this configuration (data_directory's
    ``master.lock``) runs with another queue_directory than ``queue_directory``
    (master.daemon.pidfile.running_elsewhere, which qmgr-ctl config shares).  Nothing is
    said when the lock cannot be probed (data_directory bad or missing)."""
    try:
        lock = lock_path(cfg.data_directory())
    except ConfigError:
        return
    problem = running_elsewhere(queue_directory, [lock])
    if problem is not None:
        _fatal(problem)


def _existing(queue_directory: str) -> str:
    """``queue_directory``, when it is a directory; else fatal (exit 1): ``queue
    directory <path>: No such file or directory`` - a missing directory is not a
    stopped mail system (Postfix: fatal "chdir <path>: ...")."""
    problem = directory_problem(queue_directory)
    if problem is not None:
        _fatal(f"queue directory {queue_directory}: {problem}")
    return queue_directory


def _owner(cfg: Config) -> Owner:
    """mail_owner (as root) or the invoking user; a bad mail_owner is fatal."""
    try:
        return lookup_mail_owner(cfg)
    except OwnerError as exc:
        _fatal(str(exc))


def _running(queue_directory: str) -> int | None:
    """The master's pid (waiting briefly for a master that is still writing it)."""
    path = pid_path(queue_directory)
    deadline = time.monotonic() + 1.0
    pid = running_pid(path)
    while pid == 0 and time.monotonic() < deadline:
        select.select([], [], [], 0.02)
        pid = running_pid(path)
    return pid


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "config_dir", default=_default_config_dir, show_default="$QMGRD_CONFIG_DIR"
              " or /etc/qmgrd", help="configuration directory (main.cf, master.cf)")
@click.pass_context
def main(ctx: click.Context, config_dir: str) -> None:
    """Control the qmgrd master (the mail system's supervisor)."""
    ctx.obj = os.path.abspath(config_dir)
    if ctx.invoked_subcommand and not os.path.isdir(ctx.obj):
        _fatal(f"configuration directory {ctx.obj}: no such directory (give -c DIR or "
               "set QMGRD_CONFIG_DIR)")


def _denied(command: str) -> NoReturn:
    """One clear line instead of a traceback when a non-root user signals the master."""
    _fatal(f"{command}: permission denied (the master runs as root; run as root)")


@main.command()
@click.option("--foreground", is_flag=True, help="run the master in this process")
@click.pass_context
def start(ctx: click.Context, foreground: bool) -> None:
    """Start the mail system."""
    # --foreground: the master (this process) logs the warnings itself, to stderr too
    cfg, _ = _checked_config(ctx, warn=not foreground)
    _owner(cfg)
    qdir = cfg.queue_directory()
    pid = _running(qdir)
    if pid is not None:
        _fatal(f"the qmgrd mail system is already running (pid {pid})")
    _running_elsewhere(cfg, qdir)
    if foreground:
        sys.exit(run_master(cfg.config_directory, foreground=True))
    sys.exit(_start_background(cfg.config_directory))


def _start_background(config_dir: str) -> int:
    """Fork the master into its own session; wait for its start-up report."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the master-to-be
        os.close(r)
        code = 1
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            os.set_inheritable(w, False)

            def notify(reason: str | None) -> None:
                try:
                    os.write(w, b"ok\n" if reason is None else f"{reason}\n".encode())
                    os.close(w)
                except OSError:
                    pass

            def progress(text: str) -> None:
                try:
                    os.write(w, f"{text}\n".encode())
                except OSError:  # the parent is gone (interrupted): the start goes on
                    pass

            code = run_master(config_dir, foreground=False, notify=notify,
                              progress=progress)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    os.close(w)
    _say(f"starting the qmgrd mail system (master pid {pid})")
    try:
        return _wait_started(r, pid)
    finally:
        os.close(r)


def _wait_started(r: int, pid: int) -> int:
    """Read the master's reports (one line each) until its verdict: ``ok`` (0), a
    failure reason (1), the master gone without one (1), or nothing for START_TIMEOUT
    since the last report while the master still runs (EX_TEMPFAIL, 75: it goes on
    starting; a warning names ``qmgr-master status``).  A ``repairing <pid>`` report
    (the start-up repair runs) restarts the wait."""
    limit = _timeout("START_TIMEOUT", START_TIMEOUT)
    deadline = time.monotonic() + limit
    data = b""
    chunk = b"?"  # b"" once the pipe is at EOF
    waiting_said = False
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([r], [], [], min(left, SELECT_SLICE))
        if not ready:
            continue  # a slice ended; the loop's test ends the wait at the deadline
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
        while b"\n" in data:
            line, data = data.split(b"\n", 1)
            text = line.decode("utf-8", "replace").strip()
            word, _, repair_pid = text.partition(" ")
            if word == REPAIR_PROGRESS:
                deadline = time.monotonic() + limit
                if not waiting_said:
                    _say(f"waiting for the queue structure check (qmgr-ctl repair, pid "
                         f"{repair_pid}) before the services start")
                    waiting_said = True
                continue
            if text == "ok":
                return 0
            _say(f"fatal: {text or 'the master reported an empty start-up failure'}")
            return 1
    if data.strip():  # a reason without its newline: the master ended meanwhile
        _say(f"fatal: {data.decode('utf-8', 'replace').strip()}")
        return 1
    code = wait_child(pid)
    # EOF without a verdict: the master is ending (its end closes the pipe an instant
    # before it can be reaped), so it is waited for until the deadline rather than
    # said to be "still starting"
    while code is None and left > 0 and not chunk:
        time.sleep(min(0.01, left))
        code = wait_child(pid)
        left = deadline - time.monotonic()
    if code is None:
        # outcome unknown: the master still runs and goes on starting (as stop and
        # reload when their wait ends, EX_TEMPFAIL, not a failure)
        _say(f"warning: the master (pid {pid}) did not report start-up within "
             f"{limit:g}s; it is still starting: see its log, and check with "
             "'qmgr-master status'")
        return EX_TEMPFAIL
    _say(f"fatal: the master exited during start-up (status {code})")
    return 1


def _wait_gone(procs: list[psutil.Process], limit: float) -> list[psutil.Process]:
    """Wait up to ``limit`` seconds for ``procs`` to end; those still running. A zombie
    (ended, not yet reaped by its parent: a master started in the foreground by a
    process that has not waited for it yet) counts as ended."""
    deadline = time.monotonic() + limit
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        psutil.wait_procs(alive, timeout=min(0.1, max(0.0, deadline - time.monotonic())))


@main.command()
@click.pass_context
def stop(ctx: click.Context) -> None:
    """Stop the mail system: the master and every child."""
    pid = _running(_queue_directory(ctx))
    if not pid:
        _say("the qmgrd mail system is not running")
        sys.exit(1)
    try:
        proc = psutil.Process(pid)
        # the master and its services, not what they run: a pipe(8) command (in a
        # session of its own) is the user's, and outlives its agent as under Postfix,
        # whose "postfix stop" waits for the master alone
        procs = [proc, *proc.children(recursive=False)]
        proc.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        _say("the qmgrd mail system is not running")
        sys.exit(1)
    except (psutil.AccessDenied, PermissionError):
        _denied("stop")
    _say(f"stopping the qmgrd mail system (master pid {pid})")
    limit = _timeout("STOP_TIMEOUT", STOP_TIMEOUT)
    alive = _wait_gone(procs, limit)
    if alive:
        pids = " ".join(str(p.pid) for p in alive)
        # outcome unknown: the signal is pending (a stopped or hung master, a child
        # that has not ended yet)
        _say(f"warning: still running after {limit:g}s: {pids}")
        sys.exit(EX_TEMPFAIL)
    sys.exit(0)


@main.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Make the master re-read main.cf and master.cf."""
    cfg, _ = _checked_config(ctx, modules=False)
    qdir = cfg.queue_directory()
    _running_elsewhere(cfg, qdir)
    _existing(qdir)
    pid = _running(qdir)
    if not pid:
        _say("the qmgrd mail system is not running")
        sys.exit(1)
    before = read_reload_verdict(qdir)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        _say("the qmgrd mail system is not running")
        sys.exit(1)
    except PermissionError:
        _denied("reload")
    _say(f"refreshing the qmgrd mail system (master pid {pid})")
    # the master checks the files again, in its own environment: report its verdict
    limit = _timeout("RELOAD_TIMEOUT", RELOAD_TIMEOUT)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        verdict = read_reload_verdict(qdir)
        if verdict is not None and verdict != before and verdict[0] == pid:
            if verdict[2] is not None:
                _fatal(f"the master refused the reload and keeps its configuration: "
                       f"{verdict[2]}")
            if verdict[3] is not None:
                _fatal(f"the master reloaded, but could not start: {verdict[3]}")
            sys.exit(0)
        time.sleep(0.05)
    # outcome unknown (a stopped or hung master has the signal and acts when it runs)
    _say(f"warning: no answer from the master (pid {pid}) within {limit:g}s; "
         "see its log")
    sys.exit(EX_TEMPFAIL)


def _proc_info(proc: psutil.Process) -> dict[str, object]:
    """pid, service, title, cmdline, uid/user and root directory of a process.

    The title is the process title ``qmgrd: <service>`` once the child has set it (before
    that, early in start-up, the service comes from ``-n`` in the argv).  The root
    directory is /proc/<pid>/root ("?" when we may not read it)."""
    try:
        cmdline = [part for part in proc.cmdline() if part]
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        cmdline, name = [], ""
    joined = " ".join(cmdline)
    title = joined if joined.startswith("qmgrd: ") else name
    service = "?"
    if title.startswith("qmgrd: ") and title[7:].strip():
        service = title[7:].split()[0]
    elif "-n" in cmdline[:-1]:
        service = cmdline[cmdline.index("-n") + 1]
    uid: int | None = None
    user = "?"
    try:
        uid = int(proc.uids().effective)
        user = proc.username()
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        pass
    try:
        root = os.readlink(f"/proc/{proc.pid}/root")
    except OSError:
        root = "?"
    return {"pid": proc.pid, "service": service, "title": title,
            "cmdline": " ".join(cmdline), "uid": uid, "user": user, "root": root,
            "chrooted": None if root == "?" else root != "/"}


def _master_state(queue_directory: str) -> dict[str, Any] | None:
    """The master's reply to a status request, None (after a note) if unavailable."""
    path = control_path(queue_directory)
    try:
        reply = query(path, {"request": "status"})
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else describe(exc)
        _say(f"cannot ask the master ({path}: {reason}): process list only")
        return None
    if "error" in reply or not isinstance(reply.get("services"), list):
        _say(f"the master did not answer the status request: {reply.get('error', '?')}")
        return None
    return reply


def _status_data(queue_directory: str, pid: int) -> dict[str, Any] | None:
    """The --json object of a running system (module docstring); None if it vanished."""
    try:
        master = psutil.Process(pid)
        procs = [_proc_info(master), *(_proc_info(c) for c in master.children())]
    except psutil.NoSuchProcess:
        return None
    procs[0]["service"] = "master"
    by_pid = {int(str(p["pid"])): p for p in procs}
    state = _master_state(queue_directory)
    services: list[dict[str, Any]] = []
    for svc in (state or {}).get("services", []):
        rows = []
        for child in svc.get("processes", []):
            info = by_pid.get(child["pid"], {})
            row = {**child, "uid": info.get("uid"), "user": info.get("user", "?"),
                   "root": info.get("root", "?"), "chrooted": info.get("chrooted")}
            rows.append(row)
            if info:
                info.update(state=child["state"], uses=child["uses"])
        services.append({**svc, "processes": rows})
    return {"running": True, "pid": pid, "master": state, "services": services,
            "processes": procs}


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _print_status(data: dict[str, Any]) -> None:
    """The human-readable table: one line per process (a service without any: one line
    of dashes), the master first."""
    titles = {proc["pid"]: proc["title"] for proc in data["processes"]}
    click.echo(f"{'SERVICE':<12} {'TYPE':<5} {'MAXPROC':>7} {'THROTTLED-UNTIL':<19} "
               f"{'PID':>8} {'STATE':<5} {'USES':>5} {'UID':>6} {'ROOT':<24} TITLE")

    def line(head: str, pid: object, state: str, uses: object, uid: object,
             root: str) -> None:
        title = titles.get(pid, "-")
        click.echo(f"{head} {_cell(pid):>8} {state:<5} {_cell(uses):>5} {_cell(uid):>6} "
                   f"{root:<24} {title}")

    master = data["processes"][0]
    line(f"{'master':<12} {'-':<5} {'-':>7} {'-':<19}", master["pid"], "-", None,
         master["uid"], master["root"])
    listed = {master["pid"]}
    for svc in data["services"]:
        until = svc.get("throttled_until")
        throttled = "-" if until is None else time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(until))
        head = (f"{svc['name']:<12} {svc['type']:<5} {svc['maxproc'] or 'unlim':>7} "
                f"{throttled:<19}")
        if not svc["processes"]:
            line(head, None, "-", None, None, "-")
        for row in svc["processes"]:
            listed.add(row["pid"])
            line(head, row["pid"], row["state"], row["uses"], row["uid"], row["root"])
    for proc in data["processes"]:
        if proc["pid"] not in listed:  # no control socket, or not (yet) known to it
            line(f"{_cell(proc['service']):<12} {'?':<5} {'?':>7} {'?':<19}", proc["pid"],
                 "?", "?", proc["uid"], str(proc["root"]))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print a JSON object")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Tell whether the mail system runs (exit 0) or not (exit 3); show its services and
    processes."""
    qdir = _queue_directory(ctx)
    pid = _running(qdir)
    data = _status_data(qdir, pid) if pid else None
    if data is None:
        if as_json:
            click.echo(json.dumps({"running": False, "pid": None, "master": None,
                                   "services": [], "processes": []}))
        else:
            _say("the qmgrd mail system is not running")
        sys.exit(3)
    if as_json:
        click.echo(json.dumps(data))
    else:
        _say(f"the qmgrd mail system is running: pid {pid}")
        _print_status(data)
    sys.exit(0)


@main.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Check main.cf and master.cf as start does (Postfix's ``postfix check``: every bad
    line named by file and line, warnings printed, exit 1), then create missing queue
    directories and data_directory and fix owners and modes. A hash_queue_names that
    pickup cannot work with (maildrop, a name that is no queue directory:
    Config.hash_queue_names) is refused, naming main.cf's line. A main.cf parameter that
    nothing reads (a misspelt name) gets postconf's "unused parameter" warning."""
    from master.config.validate import check_maillog, unused_parameters

    cfg, services = _checked_config(ctx, logfile=False)  # maillog_file after the dirs
    for text in unused_parameters(cfg, services):
        _say(f"warning: {text}")
    owner = _owner(cfg)
    try:
        cfg.hash_queue_names()
        changes = check_queue_dirs(cfg.queue_directory(), cfg.data_directory(),
                                   owner)
    except (OSError, ConfigError) as exc:
        _fatal(describe(exc))
    for change in changes:
        _say(change)
    try:
        check_maillog(cfg)
    except ConfigError as exc:
        _fatal(str(exc))
    sys.exit(0)


if __name__ == "__main__":
    main()
