"""master.server.skeleton - the child side of master(8): what every qmgrd daemon runs in.

Summary
    A daemon is a parameter table plus callbacks into a skeleton (design.md §4 rule 5).
    The master starts a child as (docs/contracts.md "master/server")::

        python -m <module> -c <config_dir> -n <service> -t <type> [-d]
            [--unpriv] [--chroot] [-o name=value ...] [-s N] [-l PATH] [-- args...]

    The options end at ``--`` or at the first word that is not an option (POSIX getopt,
    as Postfix's daemons parse theirs: :func:`split_argv`); the words after them reach
    ``ServerContext.args`` verbatim, so that a pipe service's
    ``argv=/usr/bin/cmd -f ${sender} -- ${recipient}`` keeps its ``-f`` and ``--``.
    The master always puts ``--`` before a service's arguments.

    It runs with ``GENERATION=<n>`` in the environment, fd 3/4 the flow-control pipe, fd 5 the
    service's status socket and fd 6 .. 6+N-1 the listeners (``-s N``, default 1, as
    Postfix).  Without fd 5 (or GENERATION) the process is in stand-alone mode:
    ``-l PATH`` creates its own listener (a UNIX socket, FIFO or ``host:port`` by
    ``-t``) and busy()/idle() do nothing.

    Start-up: parse argv, process name ``qmgrd: <service>``, check fds 5/6..,
    ``Config.load(config_dir, {service_name, process_name, -o...})``,
    ``log.setup(process_name, maillog_file, syslog_name, foreground=-d)`` - the log tag
    is ``<syslog_name>/<program>`` whatever the service's name, as Postfix's (a
    ``relay ... smtp`` service logs as ``qmgrd/smtp``, and with ``-o
    syslog_name=postfix/$service_name`` as ``postfix/relay/smtp``: what pflogsumm
    looks for); the log is open
    before the jail, so a child that drops privileges still writes it), mail_owner looked
    up (``--unpriv``), the watchdog time read, ``pre_jail(ctx)`` (cwd and
    ``ctx.queue_directory`` = the queue directory's absolute path), then the jail
    (master.server.jail): ``--chroot`` chroots into queue_directory and chdirs to "/"
    (``ctx.queue_directory`` becomes "/"), ``--unpriv`` drops to mail_owner and verifies
    that root cannot be regained - any failure is ``fatal:``, exit 1; from then on every
    module import is logged as ``warning: <service>: module <name> imported after the
    jail (import it before: pre_jail)`` (design.md §4 rule 5).  Then
    ``post_jail(ctx)`` and the service loop.  The master passes ``--unpriv`` /
    ``--chroot`` (Postfix: ``-u`` / ``-c``) only when it runs as root.

    Watchdog (master.server.watchdog): ``alarm(daemon_timeout)`` around each request of
    single_server / trigger_server, re-armed every few seconds by a task of
    async_server's loop (``qmgr_daemon_timeout`` for the qmgr); SIGALRM keeps its default
    action, so a wedged process is killed by the kernel and the master logs it.

    Status (postfix.md §3.4): busy() / idle() write ``struct.pack("=iIi", pid, gen,
    avail)`` to fd 5 (0 busy, 1 idle); uses(n) writes avail ``-n``: n more requests
    completed, no change of state (multi_server, about once a second).  EOF (or anything readable) on fd 5 means the
    master is gone or reloaded: finish the request in hand and exit 0.

    * single_server(handler): delivery agents.  One connection at a time:
      busy(), accept, handler(conn, ctx), idle(), close.  Exit 0 after max_use
      connections (0 = unlimited), after max_idle seconds without one (0 = never), on
      fd-5 EOF, or on SIGTERM (checked between requests; a handler that takes long can
      look at ``ctx.terminating``, which SIGTERM sets at once).  ``timer(final)`` (optional,
      the smtp agent's connection cache): called with False before each wait for a
      request, returning the seconds after which it wants to be called again (None =
      no wish; it is not a request, so max_idle still counts), and once with True when
      the loop ends for any of the reasons above.
    * trigger_server(handler): pickup-like services.  Each read of up to 1024 bytes from
      the FIFO (or the bytes of one connection to a UNIX socket, sent by
      qmgrd.trigger.send_trigger with a trailing NUL) is one handler(data, ctx) call
      between busy() and idle(); same exits.
    * multi_server(handler, limit=...): the smtp agent.  Up to ``limit(ctx)``
      connections at once in one asyncio loop, each ``await handler(conn, ctx)``;
      "busy" only while at the limit (or closing), so the master starts another process
      only when one is full.  Same exits as single_server, max_use counting per slot
      (max_use x limit connections); an async ``timer(final)`` as single_server's.
    * async_server(main): the qmgr (and later smtpd).  ``asyncio.run(main(ctx))`` with
      ``ctx.stopping`` set on fd-5 EOF or SIGTERM; reporting busy/idle is main's business.

    Process title: ``qmgrd: <service>`` via setproctitle — both the command line that
    ``ps ax`` shows and the kernel's process name (comm, what ``ps -e``, ``top`` and
    ``pgrep`` show).  ``qmgr-master status`` reads the service from it.

    Errors: an Exception escaping the service (or start-up) is caught here only: the
    traceback goes to the log, then ``fatal: <service>: <exc>`` (an OSError as
    ``<file>: <strerror>``, master.config.describe) and exit 1 (the master throttles a
    service whose children die before their first request).  A ConfigError is bad
    input, not a bug: one line ``fatal: <file>, line <n>: <what>``, no traceback.

Public API
    ServerContext (dataclass): service, config, queue_directory, listen_fds, generation,
        args, service_type, foreground, status_fd, stopping, unpriv, chroot, owner,
        watchdog, terminating (SIGTERM came: for a long handler of the synchronous
        servers, which never import asyncio); busy(), idle(), uses(count),
        status_closed() -> bool
    single_server(handler, *, pre_jail=None, post_jail=None, argv=None, watchdog=None,
                  timer=None)
    trigger_server(handler, *, pre_jail=None, post_jail=None, argv=None, watchdog=None)
    async_server(main, *, pre_jail=None, post_jail=None, argv=None, watchdog=None)
    multi_server(handler, *, limit, pre_jail=None, post_jail=None, timer=None, argv=None,
                 watchdog=None)
        all -> NoReturn; ``watchdog`` names the timeout parameter (default:
        ``<process_name>_daemon_timeout`` if known, else ``daemon_timeout``)
    watch_listeners(loop, listeners, on_ready)     an asyncio server's listeners on/off
    split_argv(argv) -> (options, arguments)       how a child's command line is split
    Handler types: ConnHandler, TriggerHandler, AsyncMain, AsyncConnHandler, JailHook,
        TimerHook, AsyncTimerHook
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import setproctitle

from master import log
from master.config import Config, ConfigError, describe
from master.server.jail import (
    JailError,
    Owner,
    OwnerError,
    enter_jail,
    lookup_mail_owner,
    prime_for_jail,
    watch_late_imports,
)
from master.server.watchdog import Watchdog, watchdog_timeout

if TYPE_CHECKING:  # asyncio costs ~50 ms at start; only async_server's children load it
    import asyncio

__all__ = [
    "AsyncConnHandler",
    "AsyncMain",
    "AsyncTimerHook",
    "ConnHandler",
    "JailHook",
    "ServerContext",
    "TimerHook",
    "async_server",
    "multi_server",
    "single_server",
    "split_argv",
    "trigger_server",
    "watch_listeners",
]

STATUS_FD = 5
FIRST_LISTEN_FD = 6
TRIGGER_READ_SIZE = 1024
TRIGGER_CONN_TIMEOUT = 1.0
_STATUS = struct.Struct("=iIi")
_CURRENT = [""]  # the service name, for the fatal message at the skeleton boundary


@dataclass(eq=False)
class ServerContext:
    """What a service callback gets: its identity, configuration and descriptors."""

    service: str
    config: Config
    queue_directory: str
    listen_fds: list[int]
    generation: int
    args: list[str]
    service_type: str = "unix"
    foreground: bool = False
    status_fd: int | None = None
    _stopping: asyncio.Event | None = field(default=None, repr=False)
    unpriv: bool = False
    chroot: bool = False
    owner: Owner | None = None
    watchdog: Watchdog = field(default_factory=lambda: Watchdog(18000))
    _status_broken: bool = False
    terminating: bool = False  # SIGTERM came (single_server, trigger_server)

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the service must stop (async_server: fd-5 EOF or SIGTERM); made on
        first use, so that the synchronous servers never import asyncio."""
        if self._stopping is None:
            import asyncio

            self._stopping = asyncio.Event()
        return self._stopping

    @stopping.setter
    def stopping(self, event: asyncio.Event) -> None:
        self._stopping = event

    def _report(self, avail: int) -> None:
        if self.status_fd is None or self._status_broken:
            return
        try:
            os.write(self.status_fd, _STATUS.pack(os.getpid(), self.generation, avail))
        except OSError:
            self._status_broken = True  # the master went away or reloaded: EOF follows

    def busy(self) -> None:
        """Tell the master this process is handling a request (no-op stand-alone)."""
        self._report(0)

    def idle(self) -> None:
        """Tell the master this process is free again (no-op stand-alone)."""
        self._report(1)

    def uses(self, count: int) -> None:
        """Tell the master that ``count`` (> 0) more requests were completed, with no
        change of state: one record whose avail is ``-count`` (multi_server, whose
        processes are not busy per request; no-op stand-alone)."""
        if count > 0:
            self._report(-count)

    def status_closed(self) -> bool:
        """True when fd 5 is readable (EOF: the master left or reloaded).  Never blocks."""
        if self.status_fd is None:
            return False
        with selectors.DefaultSelector() as sel:
            sel.register(self.status_fd, selectors.EVENT_READ)
            return bool(sel.select(0))


ConnHandler = Callable[[socket.socket, ServerContext], None]
TriggerHandler = Callable[[bytes, ServerContext], None]
AsyncMain = Callable[[ServerContext], Awaitable[None]]
JailHook = Callable[[ServerContext], None]
TimerHook = Callable[[bool], float | None]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("-c", dest="config_dir")
    parser.add_argument("-n", dest="service", default="")
    parser.add_argument("-t", dest="type", default="unix", choices=("unix", "fifo", "inet"))
    parser.add_argument("-d", dest="foreground", action="store_true")
    parser.add_argument("-o", dest="overrides", action="append", default=[])
    parser.add_argument("-l", dest="listen", default="")
    parser.add_argument("-s", dest="sockets", type=int, default=1)
    parser.add_argument("--unpriv", action="store_true")
    parser.add_argument("--chroot", action="store_true")
    return parser


# the options of _build_parser that take a value (getopt's "c:n:t:o:l:s:")
_VALUE_OPTIONS = frozenset({"-c", "-n", "-t", "-o", "-l", "-s"})


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(options, arguments) of a child's command line, split as POSIX getopt (and so
    Postfix's daemons) splits it: the options end at ``--`` (dropped) or at the first
    word that is not an option; everything after that is the service's arguments,
    verbatim - a pipe line's ``argv=/usr/bin/cmd -f ${sender} -- ${recipient}`` keeps
    its ``-f`` and its ``--``.  argparse would instead take an option-like word among
    the arguments for one of ours when no ``--`` comes first."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return list(argv[:i]), list(argv[i + 1:])
        if arg == "-" or not arg.startswith("-"):
            break
        i += 2 if arg in _VALUE_OPTIONS else 1
    return list(argv[:i]), list(argv[i:])


def _parse_options(argv: Sequence[str]) -> argparse.Namespace:
    """argparse for the options (errors: usage and exit 2), split_argv for the rest."""
    options, rest = split_argv(argv)
    args = _PARSER.parse_args(options)
    args.args = rest
    return args


# Built once, at import: a child forked from the master (master.daemon.forkspawn) finds it
# made instead of spending 2 ms of CPU on it.
_PARSER = _build_parser()


_PREPARSED: dict[tuple[str, ...], argparse.Namespace] = {}


def preparse(argv: Sequence[str]) -> None:
    """Parse a child's command line in the master, before it forks the child
    (master.daemon.forkspawn): the child then finds the result instead of running
    argparse, which made every forked child copy about 0.7 MiB of the master's pages.
    A command line argparse refuses is left to the child, which reports it."""
    key = tuple(argv)
    if key in _PREPARSED:
        return
    if len(_PREPARSED) >= 64:  # services x generations: a handful in practice
        _PREPARSED.clear()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _PREPARSED[key] = _parse_options(argv)
    except SystemExit:
        pass


def _parse_argv(argv: Sequence[str]) -> argparse.Namespace:
    done = _PREPARSED.get(tuple(argv))
    if done is not None:
        args = argparse.Namespace(**vars(done))  # the cached one stays as parsed
        args.args = list(done.args)
    else:
        _PARSER.prog = os.path.basename(sys.argv[0] or "qmgrd")
        args = _parse_options(argv)
    if args.config_dir is None:
        args.config_dir = os.environ.get("QMGRD_CONFIG_DIR", "/etc/qmgrd")
    return args


def _fd_is(fd: int, test: Callable[[int], bool]) -> bool:
    try:
        return test(os.fstat(fd).st_mode)
    except OSError:
        return False


def _master_fds(count: int) -> tuple[int | None, list[int]]:
    """(status fd, the ``count`` listen fds) when started by the master, else (None, [])."""
    if "GENERATION" not in os.environ or not _fd_is(STATUS_FD, stat.S_ISSOCK):
        return None, []
    fds = list(range(FIRST_LISTEN_FD, FIRST_LISTEN_FD + count))
    for fd in fds:
        if not _fd_is(fd, lambda mode: True):
            raise RuntimeError(f"listen descriptor {fd} is not open")
    return STATUS_FD, fds


def _standalone_listener(path: str, stype: str) -> int:
    """Create the listener of stand-alone mode (``-l PATH``).  A UNIX socket or FIFO is
    made under a temporary name and renamed into place once it is ready, so that its
    appearance at PATH means it can be used."""
    if stype == "inet":
        host, _, port = path.rpartition(":")
        sock = socket.create_server((host or "127.0.0.1", int(port)))
        sock.setblocking(False)
        return sock.detach()
    tmp = f"{path}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    if stype == "fifo":
        os.mkfifo(tmp, 0o622)
        fd = os.open(tmp, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(tmp)
        sock.listen(100)
        sock.setblocking(False)
        fd = sock.detach()
    os.replace(tmp, path)
    return fd


def _prepare_jail(ctx: ServerContext) -> None:
    """Before pre_jail: chdir to the queue directory, look mail_owner up (--unpriv) and
    prime the standard library for the chroot.  A problem is fatal (exit 1; a missing
    queue directory only when started by the master or jailed)."""
    try:
        os.chdir(ctx.queue_directory)  # as Postfix's daemons; the master's cwd anyway
    except OSError as exc:
        if ctx.status_fd is not None or ctx.unpriv or ctx.chroot:
            log.fatal(f"chdir {ctx.queue_directory}: {exc.strerror}")
    if not (ctx.unpriv or ctx.chroot):
        return
    if os.geteuid() != 0:
        log.fatal("--unpriv/--chroot given, but this process does not run as root")
    if ctx.unpriv:
        try:
            ctx.owner = lookup_mail_owner(ctx.config)
        except OwnerError as exc:
            log.fatal(str(exc))
    prime_for_jail()


def _enter_jail(ctx: ServerContext) -> None:
    """After pre_jail: chroot(queue_directory) for --chroot, drop to mail_owner for
    --unpriv (master.server.jail).  A failure is fatal (exit 1)."""
    if not (ctx.unpriv or ctx.chroot):
        return
    root = os.path.abspath(ctx.queue_directory) if ctx.chroot else None
    try:
        enter_jail(root, ctx.owner if ctx.unpriv else None)
    except JailError as exc:
        log.fatal(f"{ctx.service}: {exc}")
    if ctx.chroot:
        ctx.queue_directory = "/"
    service = ctx.service
    watch_late_imports(lambda name: log.warning(
        f"{service}: module {name} imported after the jail (import it before: pre_jail)"))


def _setup(argv: Sequence[str] | None, pre_jail: JailHook | None,
           post_jail: JailHook | None, watchdog: str | None = None) -> ServerContext:
    opts = _parse_argv(sys.argv[1:] if argv is None else argv)
    module = sys.modules["__main__"].__spec__
    module_name = module.name.removesuffix(".__main__") if module is not None else ""
    process_name = module_name.rpartition(".")[2] or os.path.basename(sys.argv[0])
    service = opts.service or process_name
    _CURRENT[0] = service
    setproctitle.setproctitle(f"qmgrd: {service}")
    setproctitle.setthreadtitle(f"qmgrd: {service}")
    overrides = {"service_name": service, "process_name": process_name}
    for item in opts.overrides:
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f'bad -o option "{item}" (expected name=value)')
        overrides[name.strip()] = value.strip()
    status_fd, listen_fds = _master_fds(opts.sockets)  # before anything opens a file
    cfg = Config.load(opts.config_dir, overrides)
    log.setup(process_name, cfg.maillog_file(), cfg.get("syslog_name") or "qmgrd",
              foreground=opts.foreground)
    if status_fd is None and opts.listen:
        listen_fds = [_standalone_listener(opts.listen, opts.type)]
    ctx = ServerContext(service=service, config=cfg,
                        queue_directory=cfg.queue_directory(), listen_fds=listen_fds,
                        generation=int(os.environ.get("GENERATION", "0") or 0),
                        args=list(opts.args), service_type=opts.type,
                        foreground=opts.foreground, status_fd=status_fd,
                        unpriv=opts.unpriv, chroot=opts.chroot,
                        watchdog=Watchdog(watchdog_timeout(cfg, process_name, watchdog)))
    _prepare_jail(ctx)
    if pre_jail is not None:
        pre_jail(ctx)
    _enter_jail(ctx)
    if post_jail is not None:
        post_jail(ctx)
    return ctx


def _run(body: Callable[[], None]) -> NoReturn:
    """The skeleton boundary: the one place that catches Exception."""
    try:
        body()
    except ConfigError as exc:  # expected input, not a bug: one line, no traceback
        log.fatal(str(exc))
    except Exception as exc:  # noqa: BLE001 - skeleton boundary (design.md §4 rule 6)
        service = _CURRENT[0] or _service_name()
        for line in traceback.format_exc().rstrip().splitlines():
            log.info(line)
        log.fatal(f"{service}: {describe(exc)}")
    sys.exit(0)


def _service_name() -> str:
    argv = sys.argv[1:]
    for i, arg in enumerate(argv[:-1]):
        if arg == "-n":
            return argv[i + 1]
    return os.path.basename(sys.argv[0] or "qmgrd")


class _Loop:
    """The shared select loop of single_server and trigger_server."""

    def __init__(self, ctx: ServerContext, timer: TimerHook | None = None) -> None:
        self.ctx = ctx
        self.timer = timer
        self.terminate = False
        self.sig_fd = -1
        self.uses = 0
        self.max_use = ctx.config.get_int("max_use")
        self.max_idle = ctx.config.get_time("max_idle")
        self.arm_watchdog = True  # around on_ready; False: on_ready arms it itself

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.terminate = True
        self.ctx.terminating = True  # for a long handler to look at

    def serve(self, on_ready: Callable[[int], bool]) -> None:
        """Select on listeners, fd 5 and the signal socket; ``on_ready(fd)`` handles one
        readable listener and returns True if it served a request."""
        ctx = self.ctx
        if not ctx.listen_fds:
            raise RuntimeError("no listener (started outside the master without -l)")
        sig_r, sig_w = socket.socketpair()
        sig_r.setblocking(False)
        sig_w.setblocking(False)
        self.sig_fd = sig_r.fileno()
        signal.set_wakeup_fd(sig_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._record)
        sel = selectors.DefaultSelector()
        try:
            sel.register(sig_r, selectors.EVENT_READ, "signal")
            if ctx.status_fd is not None:
                sel.register(ctx.status_fd, selectors.EVENT_READ, "status")
            for fd in ctx.listen_fds:
                sel.register(fd, selectors.EVENT_READ, "listen")
            self._loop(sel, on_ready)
        finally:
            if self.timer is not None:
                self.timer(True)
            signal.set_wakeup_fd(-1)
            sel.close()
            sig_r.close()
            sig_w.close()

    def _loop(self, sel: selectors.BaseSelector, on_ready: Callable[[int], bool]) -> None:
        last = time.monotonic()
        while not self.terminate:
            timeout = None
            if self.max_idle > 0:
                timeout = max(0.0, last + self.max_idle - time.monotonic())
            wake = self.timer(False) if self.timer is not None else None
            if wake is not None:
                timeout = wake if timeout is None else min(timeout, wake)
            events = sel.select(timeout)
            if not events and self.max_idle > 0 and time.monotonic() >= last + self.max_idle:
                return
            kinds = {key.data for key, _ in events}
            if "signal" in kinds:
                _drain(self.sig_fd)
            if "status" in kinds or self.terminate:
                return
            for key, _ in events:
                if key.data != "listen":
                    continue
                if self.arm_watchdog:
                    self.ctx.watchdog.arm()
                served = on_ready(key.fd)
                if self.arm_watchdog:
                    self.ctx.watchdog.disarm()
                if not served:
                    continue
                last = time.monotonic()
                self.uses += 1
                if self.max_use > 0 and self.uses >= self.max_use:
                    return
                break  # look at fd 5 and signals again before the next request


def single_server(handler: ConnHandler, *, pre_jail: JailHook | None = None,
                  post_jail: JailHook | None = None,
                  argv: Sequence[str] | None = None, watchdog: str | None = None,
                  timer: TimerHook | None = None) -> NoReturn:
    """Serve one connection at a time on the listener(s) until a limit or EOF on fd 5.

    ``handler(conn, ctx)`` gets a blocking connected socket; the skeleton closes it
    afterwards.  ``argv`` defaults to sys.argv[1:].  ``timer``: see the module
    docstring.  Exits the process (0, or 1 after an exception, logged as fatal).
    """
    def body() -> None:
        ctx = _setup(argv, pre_jail, post_jail, watchdog)

        # One non-blocking socket object per listener, made once: every idle process
        # of the service wakes for each connection and all but one find nothing to
        # accept, so that miss must cost one accept(2), not a new socket object.
        listeners: dict[int, socket.socket] = {}
        for fd in ctx.listen_fds:
            listeners[fd] = socket.socket(fileno=os.dup(fd))
            listeners[fd].setblocking(False)

        def on_ready(fd: int) -> bool:
            try:
                conn, _ = listeners[fd].accept()
            except (BlockingIOError, InterruptedError):
                return False  # another process took it
            ctx.watchdog.arm()
            with conn:
                conn.setblocking(True)
                ctx.busy()
                handler(conn, ctx)
                ctx.idle()
            ctx.watchdog.disarm()
            return True

        loop = _Loop(ctx, timer)
        loop.arm_watchdog = False
        try:
            loop.serve(on_ready)
        finally:
            for listener in listeners.values():
                listener.close()

    _run(body)


def trigger_server(handler: TriggerHandler, *, pre_jail: JailHook | None = None,
                   post_jail: JailHook | None = None,
                   argv: Sequence[str] | None = None,
                   watchdog: str | None = None) -> NoReturn:
    """Serve triggers: each read of the FIFO (up to 1024 bytes), or the bytes of one
    connection to a UNIX/inet listener, is one ``handler(data, ctx)`` call between
    busy() and idle().  Same limits and exits as single_server."""
    def body() -> None:
        ctx = _setup(argv, pre_jail, post_jail, watchdog)

        def on_ready(fd: int) -> bool:
            if _fd_is(fd, stat.S_ISSOCK):
                data = _read_connection(fd)
            else:
                try:
                    data = os.read(fd, TRIGGER_READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    return False
            if not data:
                return False
            ctx.busy()
            handler(data, ctx)
            ctx.idle()
            return True

        _Loop(ctx).serve(on_ready)

    _run(body)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except OSError:
        pass


def _read_connection(fd: int) -> bytes:
    listener = socket.socket(fileno=os.dup(fd))
    try:
        listener.setblocking(False)
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return b""
    finally:
        listener.close()
    with conn:
        conn.settimeout(TRIGGER_CONN_TIMEOUT)
        chunks: list[bytes] = []
        size = 0
        try:
            while size < TRIGGER_READ_SIZE:
                chunk = conn.recv(TRIGGER_READ_SIZE - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError:
            pass  # timeout or reset: use what arrived
    return b"".join(chunks)


def async_server(main: AsyncMain, *, pre_jail: JailHook | None = None,
                 post_jail: JailHook | None = None,
                 argv: Sequence[str] | None = None, watchdog: str | None = None) -> NoReturn:
    """Run ``asyncio.run(main(ctx))``; ``ctx.stopping`` is set on fd-5 EOF or SIGTERM.
    A task of the loop keeps the watchdog armed while main runs.  Exits 0 when main
    returns (1 after an exception, logged as fatal)."""
    import asyncio  # before the jail: everything is imported by then

    def body() -> None:
        ctx = _setup(argv, pre_jail, post_jail, watchdog)

        async def runner() -> None:
            loop = asyncio.get_running_loop()
            ctx.stopping = asyncio.Event()
            loop.add_signal_handler(signal.SIGTERM, ctx.stopping.set)
            status_fd = ctx.status_fd
            if status_fd is not None:
                def on_status() -> None:
                    loop.remove_reader(status_fd)
                    ctx.stopping.set()
                loop.add_reader(status_fd, on_status)
            keepalive = loop.create_task(ctx.watchdog.keepalive())
            try:
                await main(ctx)
            finally:
                keepalive.cancel()
                ctx.watchdog.disarm()
                if status_fd is not None:
                    loop.remove_reader(status_fd)
                loop.remove_signal_handler(signal.SIGTERM)

        factory = event_loop_factory(ctx.config)
        if factory is None:
            asyncio.run(runner())
        else:
            with asyncio.Runner(loop_factory=factory) as run:
                run.run(runner())

    _run(body)


def event_loop_factory(cfg: Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop async_server runs on, from ``async_event_loop``: ``uvloop`` (the
    default) -> ``uvloop.new_event_loop`` (libuv's loop, written in C: less CPU per
    message in every asyncio service than the standard library's selector loop, the same
    asyncio API); ``asyncio`` -> None (``asyncio.run``'s own loop). When uvloop is not
    installed: warning ``async_event_loop = uvloop: uvloop is not installed: using
    asyncio's event loop`` and None. A value outside master.config.params.EVENT_LOOPS never gets here: the
    master refuses it at start and reload (master.config.validate.check_event_loop).
    uvloop is imported before the jail (the master loads it with the service modules:
    master.daemon.forkspawn.preload), so a chrooted child needs no file for it."""
    if cfg.get("async_event_loop").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("async_event_loop = uvloop: uvloop is not installed: "
                    "using asyncio's event loop")
        return None
    return uvloop.new_event_loop


def preload_event_loop() -> None:
    """Import uvloop, when installed, in a process that forks asyncio services (the
    master: master.daemon.forkspawn), so that its pages are shared with them."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pass


AsyncConnHandler = Callable[[socket.socket, ServerContext], Awaitable[None]]
AsyncTimerHook = Callable[[bool], Awaitable[float | None]]


def watch_listeners(loop: asyncio.AbstractEventLoop, listeners: Sequence[socket.socket],
                    on_ready: Callable[[socket.socket], None] | None) -> None:
    """Call ``on_ready(listener)`` when one of ``listeners`` is readable, or stop
    watching them (``on_ready`` None): how an asyncio server stops taking connections
    at its limit and leaves them to the other processes of its service."""
    for lsock in listeners:
        if on_ready is None:
            loop.remove_reader(lsock.fileno())
        else:
            loop.add_reader(lsock.fileno(), on_ready, lsock)


class _MultiLoop:
    """multi_server's accept loop (see :func:`multi_server`)."""

    def __init__(self, ctx: ServerContext, handler: AsyncConnHandler, limit: int,
                 timer: AsyncTimerHook | None) -> None:
        import asyncio

        self.ctx = ctx
        self.loop: asyncio.AbstractEventLoop  # serve()'s running loop
        self.handler = handler
        self.limit = max(1, limit)
        self.timer = timer
        max_use = ctx.config.get_int("max_use")
        self.max_use = max_use * self.limit if max_use > 0 else 0
        self.max_idle = ctx.config.get_time("max_idle")
        self.active = 0
        self.accepted = 0
        self.completed = 0
        self.unreported = 0  # completed connections the master has not been told of
        self.busy = False
        self.reading = False
        self.closed = False
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()  # strong references (the loop's are weak)
        self.listeners: list[socket.socket] = []
        self.last = 0.0

    def _closing(self) -> bool:
        """True once no new connection may be taken (a limit, SIGTERM or fd-5 EOF)."""
        if self.ctx.stopping.is_set():
            self.closed = True
        return self.closed

    def _refresh(self) -> None:
        """Watch the listeners only below the limit; busy at the limit or closing."""
        reading = not self._closing() and self.active < self.limit
        if reading != self.reading:
            self.reading = reading
            watch_listeners(self.loop, self.listeners, self._accept if reading else None)
        busy = self.closed or self.active >= self.limit
        if busy != self.busy:
            self.busy = busy
            if busy:
                self.ctx.busy()
            else:
                self.ctx.idle()

    def _accept(self, lsock: socket.socket) -> None:
        while self.active < self.limit and not self._closing():
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                break  # another process took it, or nothing is left
            except OSError as exc:
                log.warning(f"accept: {exc.strerror or exc}")
                break
            conn.setblocking(False)
            self.active += 1
            self.accepted += 1
            if self.max_use and self.accepted >= self.max_use:
                self.closed = True
            task = self.loop.create_task(self._one(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self._refresh()

    async def _one(self, conn: socket.socket) -> None:
        try:
            with conn:
                await self.handler(conn, self.ctx)
        except Exception as exc:  # noqa: BLE001 - one connection's bug ends only it
            trace = traceback.format_exc().replace("\n", " | ")
            log.error(f"{self.ctx.service}: connection handler failed: {describe(exc)}: "
                      f"{trace}")
        finally:
            self.active -= 1
            self.completed += 1
            self.unreported += 1
            self.last = self.loop.time()
            if self.completed == 1:
                # at once: from this use on, a crash is a crash, not "bad command startup"
                self._report_uses()
            self._refresh()
            if not self.active:  # the serve loop only acts at none in hand: idle, exit
                self.wake.set()

    def _report_uses(self) -> None:
        if self.unreported:
            self.ctx.uses(self.unreported)
            self.unreported = 0

    async def _reporter(self) -> None:
        """The uses of the last second in one record (not a record per connection)."""
        import asyncio

        while True:
            await asyncio.sleep(1.0)
            self._report_uses()

    async def _timer_loop(self) -> None:
        import asyncio

        assert self.timer is not None
        while True:
            delay = await self.timer(False)
            await asyncio.sleep(1.0 if delay is None else min(max(delay, 0.05), 1.0))

    async def serve(self) -> None:
        import asyncio

        ctx = self.ctx
        self.loop = loop = asyncio.get_running_loop()
        if not ctx.listen_fds:
            raise RuntimeError("no listener (started outside the master without -l)")
        self.listeners = [socket.socket(fileno=os.dup(fd)) for fd in ctx.listen_fds]
        for lsock in self.listeners:
            lsock.setblocking(False)
        self.last = loop.time()
        timer = loop.create_task(self._timer_loop()) if self.timer is not None else None
        reporter = loop.create_task(self._reporter())
        stopping = loop.create_task(ctx.stopping.wait())
        self._refresh()
        try:
            while True:
                self.wake.clear()
                if stopping.done():
                    self._refresh()
                if self.closed and not self.active:
                    return
                timeout = None
                if not self.active and self.max_idle > 0:
                    timeout = self.last + self.max_idle - loop.time()
                    if timeout <= 0:
                        return
                waiter = loop.create_task(self.wake.wait())
                # a stop already seen is not waited for again: asyncio.wait would return
                # at once, a busy loop until the last connection in hand ends
                await asyncio.wait({waiter} if stopping.done() else {waiter, stopping},
                                   timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            if timer is not None:
                timer.cancel()
            reporter.cancel()
            stopping.cancel()
            self._report_uses()
            self.closed = True
            self._refresh()
            for lsock in self.listeners:
                lsock.close()
            if self.timer is not None:
                await self.timer(True)


def multi_server(handler: AsyncConnHandler, *, limit: Callable[[ServerContext], int],
                 pre_jail: JailHook | None = None, post_jail: JailHook | None = None,
                 timer: AsyncTimerHook | None = None, argv: Sequence[str] | None = None,
                 watchdog: str | None = None) -> NoReturn:
    """Serve up to ``limit(ctx)`` connections at once in one asyncio loop (Postfix's
    multi_server, with a cap): ``await handler(conn, ctx)`` gets a non-blocking
    connected socket, closed by the skeleton afterwards.

    * ``limit(ctx)`` is asked once, after pre_jail (the service reads its parameter
      there); at the limit the listeners are not watched and the master is told
      "busy", so it starts another process when a connection waits; below it the
      process is "idle" (available). 1 is the one-at-a-time behaviour of single_server.
    * Exits 0 after ``max_use`` x limit connections (0 = unlimited) once the last one
      is done, after ``max_idle`` seconds with none in hand (0 = never), and on fd-5
      EOF or SIGTERM (no new connection is taken; those in hand are finished - after a
      reload as long as they take; at a stop the master kills what is still running
      after its grace period of 5 s, so a delivery caught then may be repeated later,
      as with Postfix's smtp(8)).
    * ``timer(final)`` (optional, a coroutine function): awaited with False about once
      a second or when the seconds it returned are up (None: no wish), and once with
      True when the loop ends for any of the reasons above.

    Exits the process (0, or 1 after an exception, logged as fatal).
    """
    async def main(ctx: ServerContext) -> None:
        await _MultiLoop(ctx, handler, limit(ctx), timer).serve()

    async_server(main, pre_jail=pre_jail, post_jail=post_jail, argv=argv, watchdog=watchdog)
