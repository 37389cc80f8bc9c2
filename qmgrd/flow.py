"""qmgrd.flow — inbound flow control (Postfix's mail_flow, ``in_flow_delay``).

Summary
    The master owns one pipe and passes it to every child it starts as fd 3 (read end)
    and fd 4 (write end) (master.daemon.spawn, master.server.skeleton; postfix.md §3.9).
    The bytes in it are tokens:

    * the qmgr puts one token per message it takes from ``incoming/``
      (:func:`flow_put`), and when its incoming scan is idle it tops the pipe up to
      ``default_process_limit`` tokens, or drains the excess (:func:`flow_topup`);
      beyond Postfix, it withholds both while it has a backlog of its own (a deferred
      scan in progress, or the active queue over 2 x ``default_process_limit``
      messages) and pays the withheld tokens (at most ``default_process_limit``) once
      caught up (qmgrd.qmgr.scheduler.Scheduler.flow_behind);
    * each submission into cleanup by smtpd or pickup first takes one token
      (:func:`flow_get` with ``in_flow_delay``): when none is there it waits up to
      ``in_flow_delay`` seconds for one and then proceeds anyway. Producers are slowed
      when the qmgr falls behind, never blocked (qmgr(8) BUGS: a burst of inbound mail
      must not starve outbound delivery).

    Only a process started by the master touches fds 3/4: the pipe is used when the
    environment has ``GENERATION`` (set by the master for its children only) and fds 3
    and 4 are the two ends of one FIFO (same device and inode). This is decided once per
    process and cached. Anywhere else (qmgr-sendmail, qmgr-ctl, tests that run Cleanup
    in-process) every function is a no-op: flow_get returns True at once, flow_put and
    flow_topup return 0, flow_count returns 0. On first use both ends are made
    non-blocking, as Postfix's master does with its flow pipe (the flag is shared by
    every process holding the pipe; none of them relies on blocking I/O on it).

Public API
    flow_get(timeout: float) -> bool     take one token, waiting up to ``timeout`` s;
                                         True if one was had (or no flow pipe)
    flow_put(n: int) -> int              add up to n tokens; returns how many were added
    flow_count() -> int                  tokens in the pipe now (FIONREAD)
    flow_topup(limit: int) -> int        make the count ``limit``: put the shortfall or
                                         drain the excess; returns the change (+/-)
    FlowPipe(read_fd, write_fd)          the same operations on an explicit pipe
                                         (.get/.put/.count/.topup); used by tests
    process_pipe() -> FlowPipe | None    this process's flow pipe, if it has one

Errors: nothing is raised for a full or empty pipe (EAGAIN). Other OSErrors on the pipe
are logged once per process as ``warning: flow control pipe: <error>`` and the pipe is
treated as absent from then on (flow control is advisory; mail must keep moving).
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import stat
import termios
import threading
import time

from master import log

__all__ = ["FlowPipe", "flow_count", "flow_get", "flow_put", "flow_topup", "process_pipe"]

FLOW_READ_FD = 3
FLOW_WRITE_FD = 4
_CHUNK = 4096  # bytes per read/write; <= PIPE_BUF


class FlowPipe:
    """Token operations on a pipe (read end, write end); both are made non-blocking."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)

    def get(self, timeout: float) -> bool:
        """Take one token, waiting up to ``timeout`` seconds (<= 0: do not wait).
        Returns True if a token was taken. Raises OSError (not EAGAIN)."""
        deadline = time.monotonic() + max(0.0, timeout)
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        while True:
            try:
                if os.read(self.read_fd, 1):
                    return True
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(max(1, int(left * 1000 + 0.999)))

    def put(self, n: int) -> int:
        """Add up to ``n`` tokens without blocking; returns how many were written
        (fewer when the pipe is full). Raises OSError (not EAGAIN)."""
        done = 0
        while done < n:
            try:
                wrote = os.write(self.write_fd, b"\0" * min(_CHUNK, n - done))
            except BlockingIOError:
                break
            done += wrote
        return done

    def count(self) -> int:
        """Tokens in the pipe now (FIONREAD). Raises OSError."""
        buf = array.array("i", [0])
        fcntl.ioctl(self.read_fd, termios.FIONREAD, buf, True)
        return buf[0]

    def drain(self, n: int) -> int:
        """Take up to ``n`` tokens without waiting; returns how many were taken."""
        done = 0
        while done < n:
            try:
                data = os.read(self.read_fd, min(_CHUNK, n - done))
            except BlockingIOError:
                break
            if not data:
                break
            done += len(data)
        return done

    def topup(self, limit: int) -> int:
        """Bring the token count to ``limit``: put the shortfall, or drain the excess.
        Returns the change (positive: added, negative: drained). Raises OSError."""
        have = self.count()
        if have < limit:
            return self.put(limit - have)
        if have > limit:
            return -self.drain(have - limit)
        return 0


class _State:
    checked = False
    pipe: FlowPipe | None = None


def _same_fifo(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (stat.S_ISFIFO(sa.st_mode) and stat.S_ISFIFO(sb.st_mode)
            and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino))


_decide = threading.Lock()  # an smtpd's session threads may ask at once


def process_pipe() -> FlowPipe | None:
    """This process's flow pipe: fds 3/4 when started by the master (``GENERATION`` in
    the environment and fds 3/4 one FIFO), else None. Decided once, then cached; a
    thread that asks while another decides waits for the answer (``checked`` is set
    only once ``pipe`` is: before, a second smtpd session thread got None meanwhile)."""
    if not _State.checked:
        with _decide:
            if not _State.checked:
                if "GENERATION" in os.environ and _same_fifo(FLOW_READ_FD, FLOW_WRITE_FD):
                    try:
                        _State.pipe = FlowPipe(FLOW_READ_FD, FLOW_WRITE_FD)
                    except OSError as exc:
                        _broken(exc)
                _State.checked = True
    return _State.pipe


def _broken(exc: OSError) -> None:
    log.warning(f"flow control pipe: {exc}")
    _State.pipe = None


def flow_get(timeout: float) -> bool:
    """Take one token, waiting up to ``timeout`` seconds (``in_flow_delay``; 0: no
    wait). True if a token was had, or when the process has no flow pipe."""
    pipe = process_pipe()
    if pipe is None:
        return True
    try:
        return pipe.get(timeout)
    except OSError as exc:
        _broken(exc)
        return True


def flow_put(n: int) -> int:
    """Add up to ``n`` tokens without blocking; returns how many were added (0 without
    a flow pipe)."""
    pipe = process_pipe()
    if pipe is None or n <= 0:
        return 0
    try:
        return pipe.put(n)
    except OSError as exc:
        _broken(exc)
        return 0


def flow_count() -> int:
    """Tokens in the pipe now (0 without a flow pipe)."""
    pipe = process_pipe()
    if pipe is None:
        return 0
    try:
        return pipe.count()
    except OSError as exc:
        _broken(exc)
        return 0


def flow_topup(limit: int) -> int:
    """Bring the token count to ``limit`` (the qmgr: ``default_process_limit``, when its
    incoming scan is idle). Returns the change; 0 without a flow pipe."""
    pipe = process_pipe()
    if pipe is None:
        return 0
    try:
        return pipe.topup(limit)
    except OSError as exc:
        _broken(exc)
        return 0
