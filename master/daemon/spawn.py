"""master.daemon.spawn - the OS layer under the master: spawn, reap, kill, endpoints.

Summary
    Everything the master's policy (master.daemon.supervisor) asks of the operating system
    goes through one small interface, :class:`OsLayer`, so that the spawn / reap /
    throttle / on-demand policy runs in tests against a fake OS and a fake clock.
    :class:`PosixOs` is the real implementation.  This module holds the ONLY
    ``os.waitpid`` and the ONLY ``os.posix_spawn`` of the code base (design.md §2). The
    children of our own services are forked from the master instead (no interpreter
    start, no imports: master.daemon.forkspawn, called from :meth:`PosixOs.spawn` only);
    what they get is the same.

    A child is started as (postfix.md §3.2, docs/contracts.md "master/server")::

        <sys.executable> -P -m <service.module> -c <config_dir> -n <service> -t <type>
            [-d] [--unpriv] [--chroot] [-s N] [-o name=value ...] [-- args...]

    (``--unpriv`` / ``--chroot``, Postfix's ``-u`` / ``-c``, only when the master runs as
    root and the service's master.cf column says so; ``-s N`` when the service has
    N > 1 listeners - an inet service on several inet_interfaces addresses - as Postfix.)

    with the parent's environment plus ``GENERATION=<n>`` (decimal) and, when the code
    is not installed in site-packages, the directory holding the ``master`` package
    prepended to ``PYTHONPATH`` (``-P`` keeps the working directory out of sys.path).
    The child gets its own process group (``setpgroup=0``: a Ctrl-C on the master's
    terminal reaches the master only) and the descriptors of postfix.md §3.3: 3/4 the
    flow-control pipe, 5 the service's status socket (child end), 6.. the listeners.
    The master keeps its own descriptors at 10 and above (F_DUPFD_CLOEXEC) so the
    ``dup2`` file actions can never overwrite a source descriptor.  SIGPIPE, SIGXFSZ and
    SIGALRM are reset to their default action in the child (SIGALRM: the watchdog, see
    master.server.watchdog).

    Endpoints (postfix.md §3.5): UNIX sockets mode 0666, FIFOs 0622, both handed to
    mail_owner (``PosixOs(owner=(uid, gid))``) when the master runs as root; access is
    governed by the private/ (0700) and public/ (0755) directories.

Public API
    OsLayer (Protocol): monotonic(), spawn(argv, generation, fds) -> pid,
        reap() -> list[(pid, exitcode)], kill(pid, sig), open_listeners(service,
        queue_directory, backlog) -> [fd, ...], close_listeners(service, queue_directory,
        fds),
        open_status() -> (master_fd, child_fd), open_flow() -> (read_fd, write_fd),
        close(fd), read_status(fd) -> bytes | None, wakeup(service, queue_directory, fd)
    PosixOs(before_close=None, inet_hosts=("",), owner=None): the real OsLayer
        (``before_close(fd)`` is called before a descriptor is closed, so the event loop
        can unregister it first; ``inet_hosts``: the addresses an inet service without a
        host part listens on, one socket each (inet_interfaces); ``owner`` = (uid, gid)
        of the endpoints, None = ours)
    child_argv(service, config_directory, foreground, privileged=False, sockets=1)
        -> list[str]
    command_argv(module, config_directory, *args) -> list[str]    a one-shot command
    PosixOs.start_command(argv) -> pid; PosixOs.wait_command(pid, block=False)
        -> exit code or None (still running)
        one-shot commands (``qmgr-ctl repair`` at start and reload: master.daemon.master),
        always posix_spawn'ed; wait_command reaps one (start-up only: the loop reaps
        with reap())
    describe_exit(exitcode) -> str       "exit status 1" / "killed by signal 9"
    wait_child(pid) -> int | None        exit code of one child if it has ended (no wait)
    high_fd(fd) -> int                   move a descriptor to >= 10, close-on-exec

Raises
    OSError from the system calls (the supervisor logs and throttles on spawn failure).
    Nothing here logs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import site
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from master.config import Service
from master.daemon.forkspawn import fork_child, forkable

__all__ = [
    "FD_BASE",
    "OsLayer",
    "PosixOs",
    "child_argv",
    "command_argv",
    "describe_exit",
    "high_fd",
    "parse_inet",
    "wait_child",
]

FD_BASE = 10
STATUS_READ_SIZE = 12 * 256


class OsLayer(Protocol):
    """What the supervisor needs from the operating system.  Descriptors are plain ints."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def spawn(self, argv: Sequence[str], generation: int, fds: Sequence[int]) -> int:
        """Start a child running ``argv``; ``fds[i]`` becomes the child's fd ``3 + i``.
        Returns the pid.  Raises OSError."""
        ...

    def reap(self) -> list[tuple[int, int]]:
        """Collect every ended child without waiting: ``(pid, exitcode)`` with a negative
        exitcode ``-N`` for death by signal N."""
        ...

    def kill(self, pid: int, sig: int) -> None:
        """Send ``sig`` to ``pid``; a pid that is already gone is not an error."""
        ...

    def open_listeners(self, service: Service, queue_directory: str,
                       backlog: int) -> list[int]:
        """Create the service's endpoint(s) and return the descriptors (one, or one per
        address of an inet service).  Raises OSError or ValueError (bad inet address);
        nothing stays open then."""
        ...

    def close_listeners(self, service: Service, queue_directory: str,
                        fds: Sequence[int]) -> None:
        """Close listeners for good (the service was removed): also unlink the path."""
        ...

    def open_status(self) -> tuple[int, int]:
        """A status channel: (master end, non-blocking; child end)."""
        ...

    def open_flow(self) -> tuple[int, int]:
        """The flow-control pipe: (read end, write end)."""
        ...

    def close(self, fd: int) -> None:
        """Close a descriptor."""
        ...

    def read_status(self, fd: int) -> bytes | None:
        """Read what is available on a status channel: None = nothing, b"" = EOF."""
        ...

    def wakeup(self, service: Service, queue_directory: str, fd: int) -> None:
        """Send the ``W`` wakeup trigger to a service (postfix.md §3.6).  Never raises:
        a wakeup that cannot be delivered now is simply skipped."""
        ...


def high_fd(fd: int) -> int:
    """Move ``fd`` to the lowest free number >= FD_BASE with close-on-exec; returns it."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FD_BASE)
    os.close(fd)
    return new


def child_argv(service: Service, config_directory: str, foreground: bool,
               privileged: bool = False, sockets: int = 1) -> list[str]:
    """The command line of a child of ``service`` (module docstring)."""
    argv = [sys.executable, "-P", "-m", service.module, "-c", config_directory,
            "-n", service.name, "-t", service.type]
    if foreground:
        argv.append("-d")
    if privileged and service.unpriv:
        argv.append("--unpriv")
    if privileged and service.chroot:
        argv.append("--chroot")
    if sockets > 1:
        argv += ["-s", str(sockets)]
    for name, value in service.overrides.items():
        argv += ["-o", f"{name}={value}"]
    if service.args:
        argv.append("--")
        argv += service.args
    return argv


def command_argv(module: str, config_directory: str, *args: str) -> list[str]:
    """The command line of a one-shot command the master runs: ``<sys.executable> -P -m
    <module> -c <config_directory> args...`` (PosixOs.start_command, run_command)."""
    return [sys.executable, "-P", "-m", module, "-c", config_directory, *args]


def describe_exit(exitcode: int) -> str:
    """Postfix's wording for an abnormal end: ``exit status N`` / ``killed by signal N``."""
    if exitcode < 0:
        return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def wait_child(pid: int) -> int | None:
    """Exit code of our child ``pid`` if it has ended (reaping it), else None.  A pid that
    is not our child (already reaped) reads as exit code 1."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 1
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def parse_inet(name: str, default_host: str = "") -> tuple[str, int]:
    """Split an inet service name ``[host:]port`` / ``[v6addr]:port`` into (host, port).
    A symbolic port is looked up in /etc/services.  Raises ValueError."""
    host, sep, port = name.rpartition(":")
    if not sep:
        host = default_host
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if port.isdigit():
        number = int(port)
    else:
        try:
            number = socket.getservbyname(port, "tcp")
        except OSError:
            raise ValueError(f"unknown service port: {port!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"bad port number: {port!r}")
    return host, number


def _import_root() -> str | None:
    """The directory holding the ``master`` package, unless it is a site directory."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sites = set(site.getsitepackages()) | {site.getusersitepackages()}
    return None if root in sites else root


class PosixOs:
    """The real OsLayer (see the module docstring).  The constructor does no I/O."""

    def __init__(self, before_close: Callable[[int], None] | None = None,
                 inet_hosts: Sequence[str] = ("",),
                 owner: tuple[int, int] | None = None, fork: bool = True) -> None:
        self._before_close = before_close
        self._fork = fork
        self._inet_hosts = list(inet_hosts) or [""]
        self._owner = owner
        self._env = dict(os.environ)
        root = _import_root()
        if root is not None:
            paths = [p for p in self._env.get("PYTHONPATH", "").split(os.pathsep) if p]
            if root not in paths:
                self._env["PYTHONPATH"] = os.pathsep.join([root, *paths])

    def monotonic(self) -> float:
        return time.monotonic()

    def preload(self, argv: Sequence[str]) -> None:
        """Load the module of a child command line in the master now (forkspawn.preload),
        before any child is forked: all children then share one image of the master's
        memory. A module loaded after the first fork makes the master write to pages
        that the children forked before it share, and every such page becomes private
        to them (an idle pickup forked first had 7.8 MiB of its own, 4.x when it is
        forked after every module is loaded)."""
        if self._fork:
            forkable(argv)

    def spawn(self, argv: Sequence[str], generation: int, fds: Sequence[int]) -> int:
        module = forkable(argv) if self._fork else None
        if module is not None:  # one of ours, loaded in the master: fork (forkspawn)
            return fork_child(module, argv, generation, fds, self._env)
        env = dict(self._env)
        env["GENERATION"] = str(generation)
        actions = [(os.POSIX_SPAWN_DUP2, src, 3 + i) for i, src in enumerate(fds)]
        return os.posix_spawn(argv[0], list(argv), env, file_actions=actions, setpgroup=0,
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGALRM),
                              setsigmask=())

    def start_command(self, argv: Sequence[str]) -> int:
        """Start a one-shot command (not a service child: never forked from the master,
        descriptors 0-2 only, its own process group, the children's environment without
        GENERATION); returns its pid, which reap() collects. Raises OSError."""
        return os.posix_spawn(argv[0], list(argv), self._env, setpgroup=0,
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGALRM),
                              setsigmask=())

    def wait_command(self, pid: int, block: bool = False) -> int | None:
        """The exit code of the one-shot command ``pid`` (``-N``: killed by signal N),
        reaping it; None while it runs (``block``: wait for its end).  For start-up,
        before the event loop; 1 for a pid that is not (or no longer) our child."""
        if not block:
            return wait_child(pid)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 1
        return os.waitstatus_to_exitcode(status)

    def reap(self) -> list[tuple[int, int]]:
        ended: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ended.append((pid, os.waitstatus_to_exitcode(status)))
        return ended

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def open_listeners(self, service: Service, queue_directory: str,
                       backlog: int) -> list[int]:
        if service.type == "inet":
            fds: list[int] = []
            try:
                for host in self._hosts(service):
                    fds.append(self._open_inet(service.name, host, backlog))
            except (OSError, ValueError):
                for fd in fds:
                    self.close(fd)
                raise
            return fds
        return [self._open_local(service, queue_directory, backlog)]

    def _hosts(self, service: Service) -> list[str]:
        """The addresses of an inet service: its own host part, else inet_hosts."""
        host, sep, _ = service.name.rpartition(":")
        return [host] if sep else self._inet_hosts

    def _open_local(self, service: Service, queue_directory: str, backlog: int) -> int:
        path = service.endpoint(queue_directory)
        _unlink_stale(path)
        if service.type == "fifo":
            os.mkfifo(path, 0o622)
            os.chmod(path, 0o622)
            self._chown(path)
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            return high_fd(fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o666)
            self._chown(path)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return high_fd(sock.detach())

    def _chown(self, path: str) -> None:
        if self._owner is not None:
            os.lchown(path, *self._owner)

    def _open_inet(self, name: str, default_host: str, backlog: int) -> int:
        host, port = parse_inet(name, default_host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return high_fd(sock.detach())

    def close_listeners(self, service: Service, queue_directory: str,
                        fds: Sequence[int]) -> None:
        for fd in fds:
            self.close(fd)
        if service.type != "inet":
            try:
                _unlink_stale(service.endpoint(queue_directory))
            except OSError:
                pass

    def open_status(self) -> tuple[int, int]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        return high_fd(ours.detach()), high_fd(theirs.detach())

    def open_flow(self) -> tuple[int, int]:
        r, w = os.pipe()
        return high_fd(r), high_fd(w)

    def close(self, fd: int) -> None:
        if self._before_close is not None:
            self._before_close(fd)
        try:
            os.close(fd)
        except OSError:
            pass

    def read_status(self, fd: int) -> bytes | None:
        try:
            return os.read(fd, STATUS_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None

    def wakeup(self, service: Service, queue_directory: str, fd: int) -> None:
        try:
            if service.type == "fifo":
                os.write(fd, b"W")
            elif service.type == "unix":
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.setblocking(False)
                    sock.connect(service.endpoint(queue_directory))
                    sock.send(b"W\0")
            else:
                host, port = parse_inet(service.name, self._inet_hosts[0])
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.setblocking(False)
                    sock.connect_ex((host or "127.0.0.1", port))
        except (OSError, ValueError):
            pass


def _unlink_stale(path: str) -> None:
    """Remove a leftover socket or FIFO at ``path``; refuse to remove anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not (stat.S_ISSOCK(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise OSError(errno.EEXIST, "not a socket or FIFO, refusing to replace", path)
    os.unlink(path)
