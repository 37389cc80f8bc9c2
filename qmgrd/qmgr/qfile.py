"""qfile — the qmgr's queue-file access for reading recipients in batches.

Summary
    The qmgr reads a message's recipients in bounded batches (postfix.md §4.3): the first
    batch with the envelope when the file enters the active queue (exclusive lock, as
    ``QueueFile.open(..., rcpt_limit=N)``), later batches after reopening the file
    *without* a lock (delivery agents hold shared locks meanwhile) and *without*
    re-reading the envelope: the read starts at the remembered recipient offset, as
    Postfix's qmgr_message_realloc does. So memory stays bounded whatever the number of
    recipients, and each batch costs only its own records.

    ActiveFile is qmgrd.spool.message.QueueFile plus the resume offset as a public
    attribute and ``reopen()``; everything else (``read_recipients``, ``mark_done``,
    ``set_warn_done``) is QueueFile's.

Public API
    ActiveFile.first(spool, qid, rcpt_limit) -> ActiveFile   (QueueFile.open, lock "ex")
    ActiveFile.reopen(spool, queue, qid, rcpt_offset, data_offset, data_size) -> ActiveFile
        raises OSError (FileNotFoundError when gone).
    .rcpt_offset -> int      where the next batch starts (0: every recipient was read)

Raises (from QueueFile) CorruptQueueFile, QueueFileLocked, QueueFileNotReady, OSError.
"""

from __future__ import annotations

import os

from qmgrd.spool.message import QueueFile, open_regular
from qmgrd.spool.queue import Spool

__all__ = ["ActiveFile"]


class ActiveFile(QueueFile):
    """A queue file read by the qmgr in recipient batches (see module docstring)."""

    @property
    def rcpt_offset(self) -> int:
        """File offset of the next unread recipient group, 0 when all were read."""
        return max(0, self._resume)

    @classmethod
    def first(cls, spool: Spool, qid: str, rcpt_limit: int) -> ActiveFile:
        """Open ``active/<qid>`` exclusively locked with its first ``rcpt_limit`` recipients.

        Raises:
            QueueFileLocked, QueueFileNotReady, CorruptQueueFile, OSError, ValueError.
        """
        qf = cls.open(spool, "active", qid, lock="ex", rcpt_limit=rcpt_limit)
        assert isinstance(qf, ActiveFile)
        return qf

    @classmethod
    def reopen(cls, spool: Spool, queue: str, qid: str, rcpt_offset: int, data_offset: int,
               data_size: int) -> ActiveFile:
        """Open ``qid`` again to read recipients from ``rcpt_offset`` (no lock, no envelope).

        Raises:
            OSError: the file cannot be opened (FileNotFoundError when it is gone).
            CorruptQueueFile: it is not a regular file (a symbolic link is not followed:
                qmgrd.spool.message.open_regular).
        """
        path = spool.path(queue, qid)
        fd, st = open_regular(path, os.O_RDWR)
        try:
            f = os.fdopen(fd, "r+b")
        except BaseException:
            os.close(fd)
            raise
        qf = cls(f, queue, qid, path, st)
        qf.data_offset = data_offset
        qf.data_size = data_size
        qf._resume = rcpt_offset if rcpt_offset > 0 else -1
        return qf
