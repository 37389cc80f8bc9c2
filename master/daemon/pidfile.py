"""master.daemon.pidfile - the master's pid file and lock (postfix.md §3.8).

Summary
    ``$queue_directory/pid/master.pid`` is opened and held with an exclusive,
    non-blocking ``flock`` for the master's whole life; its content is the pid
    right-aligned in 32 characters plus a newline, as Postfix writes it.  A second
    master finds the lock taken and refuses to start; tools probe the lock to tell
    whether the mail system runs.  ``$data_directory/master.lock`` is a second lock of
    the same kind (two masters sharing a data_directory are refused too).  The master
    re-asserts both locks in every iteration of its loop (one flock(2) each), as
    Postfix does.

Public API
    PidFile(path): acquire() (raises AlreadyRunning), release() (unlock, unlink, close),
        reassert() (flock again; raises OSError), fd (the locked descriptor, -1 when not
        held)
    AlreadyRunning(pid): raised by acquire(); str = "the qmgrd mail system is already
        running (pid N)"
    running_pid(path) -> int | None: the pid of the master holding the lock, None when no
        master runs (0 when the lock is held but the pid is not written yet)
    pid_path(queue_directory) -> str;  lock_path(data_directory) -> str
    reload_path(queue_directory) -> str   ``pid/master.reload``
    write_reload_verdict(queue_directory, serial, error, incomplete=None)   the master,
                                     after each SIGHUP
    read_reload_verdict(queue_directory) -> (pid, serial, error | None,
                                             incomplete | None) | None
    running_elsewhere(queue_directory, locks) -> str | None: why a master runs with
        another queue_directory than ``queue_directory`` (the refusal of qmgr-master
        status, stop, reload and start, and of qmgr-ctl config), None when none does

Raises
    OSError when the file cannot be created or opened (the caller makes it fatal).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable

__all__ = ["AlreadyRunning", "PidFile", "lock_path", "pid_path", "read_reload_verdict",
           "reload_path", "running_elsewhere", "running_pid", "write_reload_verdict"]


class AlreadyRunning(Exception):
    """Another master holds the pid file lock."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        super().__init__(f"the qmgrd mail system is already running (pid {pid})")


def pid_path(queue_directory: str) -> str:
    """``<queue_directory>/pid/master.pid``."""
    return os.path.join(queue_directory, "pid", "master.pid")


def reload_path(queue_directory: str) -> str:
    """``<queue_directory>/pid/master.reload``: the master's verdict on its last reload."""
    return os.path.join(queue_directory, "pid", "master.reload")


def write_reload_verdict(queue_directory: str, serial: int, error: str | None,
                         incomplete: str | None = None) -> None:
    """Record the verdict on reload number ``serial`` of this master (``error`` None:
    done; ``incomplete``: done, but these new services could not be started), as one
    line ``<pid> <serial> ok``, ``<pid> <serial> failed <error>`` or ``<pid> <serial>
    incomplete <what>``, replaced atomically (so that ``qmgr-master reload`` can report
    what the master decided). Raises OSError."""
    path = reload_path(queue_directory)
    verdict = ("ok" if error is None and incomplete is None
               else f"failed {error}" if error is not None else f"incomplete {incomplete}")
    line = f"{os.getpid()} {serial} {verdict}"
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(line.replace("\n", " ") + "\n")
    os.replace(tmp, path)


def read_reload_verdict(
        queue_directory: str) -> tuple[int, int, str | None, str | None] | None:
    """(pid, serial, error or None, incomplete or None) of the last reload verdict, None
    when there is none (or it cannot be read)."""
    try:
        with open(reload_path(queue_directory), encoding="utf-8") as f:
            pid, serial, verdict = (f.readline().rstrip("\n").split(" ", 2) + ["", ""])[:3]
        if verdict.startswith("incomplete "):
            return int(pid), int(serial), None, verdict.removeprefix("incomplete ")
        error = None if verdict == "ok" else verdict.removeprefix("failed ")
        return int(pid), int(serial), error, None
    except (OSError, ValueError):
        return None


def lock_path(data_directory: str) -> str:
    """``<data_directory>/master.lock``."""
    return os.path.join(data_directory, "master.lock")


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "0")
    except ValueError:
        return 0


class PidFile:
    """The master's locked pid file.  The constructor does no I/O."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def acquire(self) -> None:
        """Create/open the file, lock it (exclusive, non-blocking), write our pid.

        Raises:
            AlreadyRunning: the lock is held by another process (nothing is changed).
            OSError: the file cannot be opened or written.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(pid) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid():>32}\n".encode("ascii"), 0)
        self.fd = fd

    def reassert(self) -> None:
        """Take the lock again (a no-op for the kernel while we hold it; Postfix does it
        every loop iteration).  Raises OSError (e.g. the descriptor went bad)."""
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        """Remove the pid file and drop the lock (the master is exiting)."""
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def running_pid(path: str) -> int | None:
    """Probe the lock: the running master's pid, 0 if locked but still empty, None if no
    master holds it (or the file does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def running_elsewhere(queue_directory: str, locks: Iterable[str]) -> str | None:
    """Why the mail system may not be driven with ``queue_directory``, or None.

    A master holds one of ``locks`` (data_directory's ``master.lock``; qmgr-ctl config
    adds the lock and pid file of the main.cf it is about to replace) but not
    ``queue_directory``'s pid file: it runs with another queue_directory (main.cf's was
    changed while it ran), so "not running" (status, stop, reload) and "already
    running" (start) would contradict each other, and qmgr-ctl list would read an
    empty queue.  The text names the master's pid and its queue_directory (its working
    directory: the master chdirs there; as another user it may be unreadable, then the
    lock is named instead), and what to do: put the old value back to stop or reload
    it.  Postfix has the same weakness (postfix-script finds the master by
    queue_directory only); this only explains it.  A lock that cannot be probed (a
    missing file or directory) counts as not held.
    """
    if running_pid(pid_path(queue_directory)) is not None:
        return None
    for lock in locks:
        try:
            pid = running_pid(lock)
        except OSError:
            continue
        if not pid:
            continue
        import psutil  # type: ignore[import-untyped]  # only when a master is found

        try:
            where: str | None = os.path.realpath(psutil.Process(pid).cwd())
        except (psutil.Error, OSError):
            where = None
        if where is not None and where == os.path.realpath(queue_directory):
            return None  # the pid file was being replaced just now: it is this master
        if where is None:
            return (f"the qmgrd mail system is running (master pid {pid}, holding {lock}) "
                    f"with another queue_directory than main.cf's {queue_directory} "
                    "(changed while it ran?): put queue_directory back to stop or reload "
                    f"it, or stop it with kill -TERM {pid}")
        return (f"the qmgrd mail system is running (master pid {pid}) with queue_directory "
                f"{where}, not main.cf's {queue_directory} (changed while it ran?): put "
                f"queue_directory = {where} back to stop or reload it, then change it")
    return None
