"""qread — fast read-only envelope scans of queue files, for qmgr-ctl's listings.

Summary
    ``qmgr-ctl list`` and ``shape`` read every file of a queue that may hold 100,000
    messages, so they cannot afford the full structural check of
    qmgrd.spool.message.QueueFile. This module reads what a listing needs — arrival
    time, size, sender, the recipients still to do — in one pass over a bytes buffer
    (one ``pread`` for files up to 256 KiB), the way Postfix's showq and qshape read:

    * records are framed as usual (postfix.md §2.1); a record that runs past the end of
      the file, a length over 16 MiB, or a file without a final ``E`` is *broken*:
      :class:`Damaged` says why, and the caller skips the file with a warning;
    * ``C``: field 1 is the data size, field 2 the data offset (six decimal fields,
      §2.4); ``T``: field 1 the arrival time (the first of each counts); ``S`` the sender
      (the last counts); ``R`` a recipient to do (``D`` = done, skipped);
    * ``p`` pointer records are followed (at most 10,000 jumps);
    * at ``M`` a queue file written by cleanup (with a ``C`` record) skips its content:
      the next record at data offset + data size must be ``X``; a maildrop file (no
      ``C``) walks its ``N``/``L`` records to ``X``;
    * maildrop files (postdrop format): recipients before the sender record are ignored,
      as qmgrd's showq always did.

    Nothing is locked and nothing is written: a file that vanishes or changes under the
    reader is simply listed as found or not at all.

Public API
    Envelope(arrival, size, sender, recipients)   (slots dataclass; arrival/size 0 when
                                                   the file has none)
    Damaged(ValueError)                           a broken queue file; str() says why
    read_envelope(fd, size, *, maildrop=False) -> Envelope   raises Damaged (a broken
        file), OSError from pread
    open_ready(path) -> tuple[int, os.stat_result] | None    open O_RDONLY|O_NONBLOCK|
        O_NOFOLLOW, fstat; None (fd closed) when the file is gone or not ready; raises
        NotRegular (a FIFO, device, socket or symbolic link: never read) and other OSErrors
    open_regular(path) -> tuple[int, os.stat_result]    the same without the readiness
        test; FileNotFoundError, NotRegular, OSError

    Every queue file is opened with O_NONBLOCK|O_NOFOLLOW and checked with fstat: anyone
    may create a FIFO in the mode-1733 maildrop directory, and opening one for reading
    would block qmgr-ctl forever (Postfix's showq skips what is not a regular file).

Logs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from qmgrd.spool import regular
from qmgrd.spool.queue import Spool
from qmgrd.spool.regular import NotRegular

__all__ = ["Damaged", "Envelope", "NotRegular", "open_ready", "open_regular",
           "read_envelope"]

_WHOLE = 256 * 1024
_CHUNK = 64 * 1024
_MAX_LEN = 1 << 24
_MAX_JUMPS = 10000
_C, _T, _S, _R, _M, _X, _E, _P = (ord(c) for c in "CTSRMXEp")
_CONTENT = frozenset(ord(c) for c in "NLwp")
_WANTED = frozenset(ord(c) for c in "CTSRMEp")


@dataclass(slots=True)
class Envelope:
    """What a listing needs from one queue file."""

    arrival: int = 0
    size: int = 0
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)


def _int(data: bytes) -> int:
    """atol(): the leading decimal number, 0 when there is none."""
    parts = data.split(None, 1)
    try:
        return int(parts[0]) if parts else 0
    except ValueError:
        return 0


class Damaged(ValueError):
    """A ready queue file that is not a well-formed queue file (truncated, garbage, a
    required record missing); the text says why."""


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking or following a symbolic link.

    Returns:
        (fd, stat) of a regular file; the caller closes fd.

    Raises:
        NotRegular: the entry is a FIFO, device, socket, directory or symbolic link.
        FileNotFoundError: it is gone; OSError: another open/fstat failure.
    """
    return regular.open_regular(path, os.O_RDONLY)


def open_ready(path: str) -> tuple[int, os.stat_result] | None:
    """Open ``path`` read-only if it is a ready queue file (owner rwx); see open_regular.

    Returns:
        (fd, stat) — the caller closes fd — or None when the file is gone or not ready.

    Raises:
        NotRegular: not a regular file (never opened for reading in blocking mode).
        OSError: any other open/fstat failure (e.g. PermissionError).
    """
    try:
        fd, st = open_regular(path)
    except FileNotFoundError:
        return None
    if not Spool.is_ready(st):
        os.close(fd)
        return None
    return fd, st


def read_envelope(fd: int, size: int, *, maildrop: bool = False) -> Envelope:
    """Scan the records of an open queue file (see module docstring).

    Args:
        fd: a descriptor open for reading (its offset is not used).
        size: the file size (fstat).
        maildrop: the file is a postdrop-format maildrop file.

    Returns:
        The envelope.

    Raises:
        Damaged: the file is broken (the text says how: ``truncated: a record runs
            past the end of the file``, ``no sender record (S)``, ...).
        OSError: a read failed.
    """
    buf = os.pread(fd, size if size <= _WHOLE else _CHUNK, 0)
    base = 0
    end = base + len(buf)
    pos = 0
    env = Envelope()
    recipients = env.recipients
    have_c = False
    data_offset = 0
    in_content = False
    jumps = 0
    while True:
        if pos < base or (pos + 6 > end and end < size):  # outside the window
            buf = os.pread(fd, _CHUNK, pos)
            base, end = pos, pos + len(buf)
        rel = pos - base
        if rel < 0 or rel >= end - base:
            raise Damaged("truncated: the file ends before its end record")
        rtype = buf[rel]
        i = rel + 1
        if i >= end - base:
            raise Damaged("truncated: the file ends inside a record")
        length = buf[i]
        i += 1
        if length >= 0x80:  # a long record: more length bytes
            length &= 0x7F
            shift = 7
            while True:
                if i >= end - base or shift > 28:
                    raise Damaged("bad record length")
                b = buf[i]
                i += 1
                length |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
            if length > _MAX_LEN:
                raise Damaged(f"record of {length} bytes (at most {_MAX_LEN})")
        start = base + i
        stop = start + length
        if stop > end:
            if stop > size:
                raise Damaged("truncated: a record runs past the end of the file")
            buf = os.pread(fd, max(length, _CHUNK), start)
            base, end = start, start + len(buf)
            if stop > end:
                raise Damaged("truncated: a record runs past the end of the file")
        pos = stop
        if in_content:
            if rtype == _X:
                in_content = False
            elif rtype not in _CONTENT:
                raise Damaged(f"unexpected record type {chr(rtype)!r} in the message "
                              "content")
            elif rtype != _P:
                continue
        if rtype not in _WANTED:
            continue
        data = buf[start - base:stop - base]
        if rtype == _R:
            if env.sender is not None or not maildrop:
                recipients.append(data.decode("utf-8", "surrogateescape"))
        elif rtype == _S:
            env.sender = data.decode("utf-8", "surrogateescape")
        elif rtype == _T:
            if not env.arrival:
                env.arrival = _int(data)
        elif rtype == _C:
            if not have_c:
                fields = data.split()
                try:
                    env.size = int(fields[0])
                    data_offset = int(fields[1])
                except (IndexError, ValueError):
                    raise Damaged("bad size record (C)") from None
                have_c = True
        elif rtype == _P:
            target = _int(data)
            if target > 0:
                jumps += 1
                if jumps > _MAX_JUMPS or target >= size:
                    raise Damaged("bad pointer record (p)")
                pos = target
        elif rtype == _M:
            if have_c and not maildrop:
                pos = (data_offset or pos) + env.size
                if pos >= size:
                    raise Damaged("truncated: the message content runs past the end "
                                  "of the file")
                in_content = True  # the next record must be X (checked below)
                if pos < base or pos >= end:
                    buf = os.pread(fd, _CHUNK, pos)
                    base, end = pos, pos + len(buf)
                if pos >= end or buf[pos - base] != _X:
                    raise Damaged("no extracted-envelope record (X) after the message "
                                  "content")
            else:
                in_content = True
        elif rtype == _E:
            if env.sender is None:
                raise Damaged("no sender record (S)")
            if not have_c and not maildrop:
                raise Damaged("no size record (C)")
            return env
