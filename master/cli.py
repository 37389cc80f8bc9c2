"""qmgr-master - start, stop, reload and inspect the qmgrd master (postfix(1) for master).

Synopsis
    qmgr-master [-c DIR] start [--foreground]
    qmgr-master [-c DIR] stop | reload | check
    qmgr-master [-c DIR] status [--json]

Description
    ``-c DIR`` names the configuration directory (default ``$QMGRD_CONFIG_DIR``, else
    /etc/qmgrd) holding main.cf and master.cf.

    start      Validate main.cf and master.cf first (a bad line: ``qmgr-master: fatal:
               <file>, line <n>: ...`` on stderr, exit 1, nothing started); refuse when a
               master already runs (exit 1, the running one untouched).  Without
               --foreground, fork once: the child starts a new session, puts stdio on
               /dev/null and runs the master; the parent waits up to 10 s until the
               child holds the pid file lock, then exits 0 (1 with the reason if the child
               failed).  With --foreground the master runs in this process (logging also
               to stderr) until stopped.
    stop       SIGTERM the master and wait until it and every child are gone; exit 0.
               Not running: "the qmgrd mail system is not running", exit 1 (as
               ``postfix stop``).
    reload     SIGHUP the master; exit 0 (1 if not running).
    status     Exit 0 when running, 3 when not; lists the master and each child (pid,
               service, process name ``qmgrd: <service>``); --json prints a JSON object
               {"running", "pid", "processes": [{"pid", "service", "title", "cmdline"}]}.
    check      Create the queue directories and data_directory where missing, exit 0.

Messages go to stderr as ``qmgr-master: <text>`` (``qmgr-master: fatal: <text>`` for
errors).  Exit codes: 0 success, 1 failure, 3 status "not running".

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
from typing import NoReturn

import click
import psutil  # type: ignore[import-untyped]

from master.config import Config, ConfigError, load_master_cf
from master.daemon.master import make_queue_dirs, run_master
from master.daemon.pidfile import pid_path, running_pid
from master.daemon.spawn import wait_child

__all__ = ["main"]

PROG = "qmgr-master"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0


def _say(text: str) -> None:
    click.echo(f"{PROG}: {text}", err=True)


def _fatal(text: str) -> NoReturn:
    _say(f"fatal: {text}")
    sys.exit(1)


def _default_config_dir() -> str:
    return os.environ.get("QMGRD_CONFIG_DIR") or "/etc/qmgrd"


def _config(ctx: click.Context) -> Config:
    try:
        return Config.load(ctx.obj)
    except ConfigError as exc:
        _fatal(str(exc))


def _pid_file(cfg: Config) -> str:
    return pid_path(cfg.get("queue_directory"))


def _running(cfg: Config) -> int | None:
    """The master's pid (waiting briefly for a master that is still writing it)."""
    path = _pid_file(cfg)
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


@main.command()
@click.option("--foreground", is_flag=True, help="run the master in this process")
@click.pass_context
def start(ctx: click.Context, foreground: bool) -> None:
    """Start the mail system."""
    cfg = _config(ctx)
    try:
        load_master_cf(os.path.join(cfg.config_directory, "master.cf"), cfg)
        cfg.get("queue_directory")
        cfg.get_int("default_process_limit")
        cfg.get_time("service_throttle_time")
    except ConfigError as exc:
        _fatal(str(exc))
    pid = _running(cfg)
    if pid is not None:
        _fatal(f"the qmgrd mail system is already running (pid {pid})")
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

            code = run_master(config_dir, foreground=False, notify=notify)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        return _wait_started(r, pid)
    finally:
        os.close(r)


def _wait_started(r: int, pid: int) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
        if data.endswith(b"\n"):
            break
    text = data.decode("utf-8", "replace").strip()
    if text == "ok":
        return 0
    if text:
        _say(f"fatal: {text}")
        return 1
    code = wait_child(pid)
    if code is None:
        _say(f"fatal: the master (pid {pid}) did not report start-up within "
             f"{START_TIMEOUT:.0f}s")
    else:
        _say(f"fatal: the master exited during start-up (status {code})")
    return 1


@main.command()
@click.pass_context
def stop(ctx: click.Context) -> None:
    """Stop the mail system: the master and every child."""
    cfg = _config(ctx)
    pid = _running(cfg)
    if not pid:
        _say("the qmgrd mail system is not running")
        sys.exit(1)
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        _say("the qmgrd mail system is not running")
        sys.exit(1)
    _say("stopping the qmgrd mail system")
    _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT)
    if alive:
        pids = " ".join(str(p.pid) for p in alive)
        _fatal(f"still running after {STOP_TIMEOUT:.0f}s: {pids}")
    sys.exit(0)


@main.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Make the master re-read main.cf and master.cf."""
    cfg = _config(ctx)
    pid = _running(cfg)
    if not pid:
        _say("the qmgrd mail system is not running")
        sys.exit(1)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        _say("the qmgrd mail system is not running")
        sys.exit(1)
    _say("refreshing the qmgrd mail system")
    sys.exit(0)


def _describe(proc: psutil.Process) -> dict[str, object]:
    """pid, service, title and cmdline of a process.

    The title is the process title ``qmgrd: <service>`` once the child has set it (before
    that, early in start-up, the service comes from ``-n`` in the argv)."""
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
    return {"pid": proc.pid, "service": service, "title": title,
            "cmdline": " ".join(cmdline)}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print a JSON object")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Tell whether the mail system runs (exit 0) or not (exit 3); list its processes."""
    cfg = _config(ctx)
    pid = _running(cfg)
    rows: list[dict[str, object]] = []
    if pid:
        try:
            master = psutil.Process(pid)
            rows.append({**_describe(master), "service": "master"})
            rows.extend(_describe(child) for child in master.children())
        except psutil.NoSuchProcess:
            pid = None
    if as_json:
        click.echo(json.dumps({"running": bool(pid), "pid": pid or None,
                               "processes": rows}))
    elif pid:
        _say(f"the qmgrd mail system is running: pid {pid}")
        click.echo(f"{'PID':>8}  {'SERVICE':<16} TITLE")
        for row in rows:
            click.echo(f"{row['pid']:>8}  {row['service']!s:<16} {row['title']}")
    else:
        _say("the qmgrd mail system is not running")
    sys.exit(0 if pid else 3)


@main.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Create missing queue directories and data_directory."""
    cfg = _config(ctx)
    try:
        make_queue_dirs(cfg.get("queue_directory"), cfg.get("data_directory"))
    except (OSError, ConfigError) as exc:
        _fatal(str(exc))
    sys.exit(0)


if __name__ == "__main__":
    main()
