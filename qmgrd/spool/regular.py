"""qmgrd.spool.regular - open a queue directory entry only when it is a regular file.

Public API
    NotRegular(OSError)              the entry is a symbolic link (errno ELOOP) or not a
                                     regular file (FIFO, device, socket, directory: EINVAL)
    open_regular(path, flags) -> (fd, os.stat_result)

Queue files are regular files (Postfix's mail_open_ok lstat()s and skips anything
else): a symbolic link planted under a queue id's name is never followed - a root tool
or the root local agent would read, lock or change its target - and a FIFO never blocks
the open. Kept apart from qmgrd.spool.message so that qmgr-ctl's read-only commands
(qmgrd.ctl.qread) get it without importing the queue-file reader.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["NotRegular", "open_regular"]


class NotRegular(OSError):
    """A queue directory entry that is not a regular file (FIFO, device, socket,
    directory, symbolic link)."""


def open_regular(path: str, flags: int) -> tuple[int, os.stat_result]:
    """Open ``path`` with ``flags`` plus O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC (O_NONBLOCK
    does not change reads and writes of a regular file).

    Returns:
        (fd, fstat of fd) of a regular file; the caller closes fd.

    Raises:
        NotRegular: "not a regular file (symbolic link)" (errno ELOOP) or "not a
            regular file (mode <octal>)" (EINVAL); nothing stays open.
        OSError: the open or fstat failed otherwise (FileNotFoundError when gone).
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise NotRegular(errno.ELOOP, "not a regular file (symbolic link)",
                             path) from None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, f"not a regular file (mode {st.st_mode:o})", path)
    return fd, st
