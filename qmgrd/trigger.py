"""trigger — the one-byte requests sent to the qmgr and pickup services.

Summary
    Postfix wakes its trigger servers with single bytes written to ``public/qmgr`` and
    ``public/pickup`` (postfix.md §4.1). The qmgr understands:

    ========  =======================================================================
    ``I``     scan incoming (restart the scan when the running one ends)
    ``D``     scan deferred
    ``A``     ignore deferred time stamps during the next scans (``postqueue -f``)
    ``F``     forget dead transports and destinations
    ``W``     wakeup, same as ``I`` (master timer, cleanup after each new message)
    ========  =======================================================================

Public API
    QMGR_REQ_FLUSH_ALL = b"FADI"  what postqueue -f sends the qmgr
    flush_all(queue_directory) -> bool
        postqueue -f: ``FADI`` to ``public/qmgr``, then ``W`` to ``public/pickup``
        (mail still in maildrop/ is picked up first). False when either could not be
        handed over (the qmgr's is tried first; nothing is sent after a failure).
    send_trigger(path, data, timeout=1.0) -> bool
        Write ``data`` to a FIFO or UNIX stream socket endpoint without blocking longer
        than ``timeout`` seconds. Returns False (and raises nothing) when nobody listens:
        a trigger is a hint, the receiver also wakes on timers.

Untrusted: any local user may write these bytes; receivers ignore unknown bytes.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = [
    "QMGR_REQ_FLUSH_ALL",
    "QMGR_REQ_FLUSH_DEAD",
    "QMGR_REQ_SCAN_ALL",
    "QMGR_REQ_SCAN_DEFERRED",
    "QMGR_REQ_SCAN_INCOMING",
    "TRIGGER_REQ_WAKEUP",
    "flush_all",
    "send_trigger",
]

QMGR_REQ_SCAN_INCOMING = b"I"
QMGR_REQ_SCAN_DEFERRED = b"D"
QMGR_REQ_SCAN_ALL = b"A"
QMGR_REQ_FLUSH_DEAD = b"F"
TRIGGER_REQ_WAKEUP = b"W"
QMGR_REQ_FLUSH_ALL = (QMGR_REQ_FLUSH_DEAD + QMGR_REQ_SCAN_ALL + QMGR_REQ_SCAN_DEFERRED
                      + QMGR_REQ_SCAN_INCOMING)


def flush_all(queue_directory: str) -> bool:
    """postqueue -f (module docstring): True when both triggers were handed over."""
    public = os.path.join(queue_directory, "public")
    return (send_trigger(os.path.join(public, "qmgr"), QMGR_REQ_FLUSH_ALL)
            and send_trigger(os.path.join(public, "pickup"), TRIGGER_REQ_WAKEUP))


def send_trigger(path: str, data: bytes, timeout: float = 1.0) -> bool:
    """Send trigger bytes to a FIFO or UNIX-socket endpoint.

    Args:
        path: ``<queue_directory>/public/qmgr`` or similar.
        data: one or more request bytes (at most 1024 are read per wakeup).
        timeout: seconds to wait for a UNIX socket connect/write.

    Returns:
        True when the bytes were handed over, False when the endpoint is missing, has no
        reader, or is full (all of which the caller may log as a warning).
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    if stat.S_ISFIFO(st.st_mode):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False  # ENXIO: no reader
        try:
            os.write(fd, data)
            return True
        except OSError as exc:
            return exc.errno == errno.EAGAIN  # full FIFO: a wakeup is pending anyway
        finally:
            os.close(fd)
    if stat.S_ISSOCK(st.st_mode):
        import socket  # here, not at the top: qmgr-sendmail wakes a FIFO (start-up cost)

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(path)
                sock.sendall(data + b"\0")
            return True
        except OSError:
            return False
    return False
