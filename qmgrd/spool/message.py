"""message — open, read and update one queue file (QueueFile).

Summary
    ``QueueFile.open()`` validates the id, opens the file without following a symbolic
    link or blocking on a FIFO (O_NOFOLLOW|O_NONBLOCK, then fstat: queue files are
    regular files, as Postfix's mail_open_ok requires - anything else is
    CorruptQueueFile, "not a regular file"), checks that it is *ready* (owner rwx,
    postfix.md §1.5), takes a non-blocking flock (exclusive for the qmgr, shared for
    delivery agents, none for tools), and reads the whole envelope the way Postfix's
    qmgr_message_read does (§2.3, §4.3): record types must belong to their segment; at
    ``M`` it seeks ``data_size`` bytes past ``data_offset`` and requires ``X`` there; it
    requires ``C``, ``T``, ``S`` and a final ``E``. Per-recipient attributes (``O``,
    ``A dsn_orig_rcpt=``, ``A notify_flags=``, ``o``, ``n``) apply to the next ``R``/``D``.
    Recipients are read in both the envelope and the extracted segment.

    The recipient list may be read in bounded batches: ``open(..., rcpt_limit=N)`` keeps
    the first N undone recipients and remembers where it stopped; ``read_recipients(N)``
    returns the next batch (the qmgr's recipient budget, §4.3).

    In-place updates (§2.6): ``mark_done(offset)`` overwrites an ``R`` type byte with ``D``;
    ``set_warn_done()`` rewrites ``W`` to ``-1``; ``mark_corrupt()`` sets mode 0400.
    These flush but do not fsync, as Postfix.

Public API
    QueueFile.open(spool, queue, qid, lock="ex"|"sh"|None, *, rcpt_limit=None,
                   readonly=False) -> QueueFile
    QueueFile.open_content(spool, queue, qid, lock="sh") -> QueueFile   a delivery
        agent's open: the C record only, no envelope (iter_lines, mark_done, mark_corrupt)
    attributes: queue, qid, path, st (os.stat_result at open), sender, fullname,
        recipients (list[Recipient], undone, with offsets), undone_count, done_count,
        rcpt_count (C field 3), data_offset, data_size, content_size, qmgr_flags, arrival
        (sec, usec), create_time, warn_time, warn_offset, envid, ret, attrs (other A
        records), encoding, smtputf8, rewrite_context, content_filter, inspector,
        redirect, verp
    .has_more_recipients -> bool; .read_recipients(limit) -> list[Recipient]
    .iter_lines() -> Iterator[bytes]    content lines without EOL (L+N joined)
    .mark_done(offset), .set_warn_done(), .mark_corrupt(), .close(), context manager
    QueueFileError, CorruptQueueFile(reason), QueueFileLocked, QueueFileNotReady,
    QueueFileMarkedCorrupt(qid) (a QueueFileNotReady: mode 0400, from open_content)
    is_marked_corrupt(st) -> bool       a regular file of mode 0400 exactly
    open_regular(path, flags) -> (fd, os.stat_result)   the open QueueFile.open does:
        O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC added; CorruptQueueFile for a symbolic link or
        any other non-regular file (fd closed); OSError from open/fstat

Raises CorruptQueueFile on any structural error, QueueFileLocked when the lock is held
elsewhere, QueueFileNotReady when the mode says the file is incomplete, ValueError for an
invalid id, OSError (FileNotFoundError ...) from the file system. Logs nothing.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from typing import IO, Literal, Self

from qmgrd.spool import records as R
from qmgrd.spool import regular
from qmgrd.spool.envelope import Recipient
from qmgrd.spool.queue import Spool
from qmgrd.spool.records import Record, RecordError, RecordReader

__all__ = [
    "CorruptQueueFile",
    "QueueFile",
    "QueueFileError",
    "QueueFileLocked",
    "QueueFileMarkedCorrupt",
    "QueueFileNotReady",
    "is_marked_corrupt",
    "open_regular",
]

LockMode = Literal["ex", "sh"] | None
_MAX_PTR_JUMPS = 10000
_RCPT_TYPES = frozenset((R.REC_RCPT, R.REC_DONE, R.REC_ORCP, R.REC_DSN_ORCPT,
                         R.REC_DSN_NOTIFY, R.REC_DRCP, R.REC_ATTR))
_ATTR_PSEUDO = {
    "dsn_orig_rcpt": R.REC_DSN_ORCPT,
    "notify_flags": R.REC_DSN_NOTIFY,
    "envelope_id": R.REC_DSN_ENVID,
    "ret_flags": R.REC_DSN_RET,
    "create_time": R.REC_CTIME,
}
_RCPT_ATTRS = (b"dsn_orig_rcpt=", b"notify_flags=")  # A records that belong to a recipient
_SPECIAL_ATTRS = frozenset(("encoding", "smtputf8", "rewrite_context"))  # see _attr
_PTR, _ATTR, _MESG, _END = R.REC_PTR, R.REC_ATTR, R.REC_MESG, R.REC_END
_TIME, _FROM, _CTIME = R.REC_TIME, R.REC_FROM, R.REC_CTIME
_ENVELOPE = frozenset(R.ENVELOPE_TYPES[i : i + 1] for i in range(len(R.ENVELOPE_TYPES)))
_EXTRACTED = frozenset(R.EXTRACTED_TYPES[i : i + 1] for i in range(len(R.EXTRACTED_TYPES)))


class QueueFileError(Exception):
    """Base class of queue-file errors."""


class CorruptQueueFile(QueueFileError):
    """The file is structurally broken; ``reason`` says how (move it to corrupt/)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class QueueFileLocked(QueueFileError):
    """Another process holds a conflicting lock (e.g. a delivery is in progress)."""


class QueueFileNotReady(QueueFileError):
    """The file's mode says it is still being written (or marked corrupt)."""


class QueueFileMarkedCorrupt(QueueFileNotReady):
    """The file is marked corrupt (mode 0400, :meth:`QueueFile.mark_corrupt`): an
    earlier delivery found it damaged and the qmgr moves it to corrupt/ when the
    message completes. ``str()`` is the one warning text every delivery agent logs
    for it: ``<qid>: queue file marked corrupt``."""

    def __init__(self, qid: str) -> None:
        super().__init__(f"{qid}: queue file marked corrupt")
        self.qid = qid


def is_marked_corrupt(st: os.stat_result) -> bool:
    """True for a regular file of mode 0400 exactly: marked corrupt (Postfix's
    MAIL_QUEUE_STAT_CORRUPT, S_IRUSR), not one still being written (0600)."""
    return stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == stat.S_IRUSR


def _int(data: bytes, what: str, at: int) -> int:
    try:
        return int(data)
    except ValueError:
        raise CorruptQueueFile(f"offset {at}: bad {what} value {data[:40]!r}") from None


def _read(rd: RecordReader) -> Record | None:
    """``rd.read()``, a framing error being a CorruptQueueFile."""
    try:
        return rd.read()
    except RecordError as exc:
        raise CorruptQueueFile(str(exc)) from None


class _RcptState:
    """Per-recipient attributes waiting for their R/D record."""

    __slots__ = ("notify", "orcpt", "orig", "start")

    def __init__(self) -> None:
        self.orig = ""
        self.orcpt = ""
        self.notify = 0
        self.start = -1

    def reset(self) -> None:
        self.orig = ""
        self.orcpt = ""
        self.notify = 0
        self.start = -1


def open_regular(path: str, flags: int) -> tuple[int, os.stat_result]:
    """Open queue file ``path`` with ``flags`` plus O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC:
    a symbolic link planted under a queue id's name is never followed (a root tool or
    the root local agent would read, lock or change its target), and a FIFO never
    blocks the open.  O_NONBLOCK does not change reads and writes of a regular file.

    Returns:
        (fd, fstat of fd) of a regular file; the caller closes fd.

    Raises:
        CorruptQueueFile: "not a regular file (symbolic link)" or "not a regular file
            (mode <octal>)" - treated as a damaged queue file by every caller.
        OSError: the open or fstat failed otherwise (FileNotFoundError when gone).
    """
    try:
        return regular.open_regular(path, flags)
    except regular.NotRegular as exc:
        raise CorruptQueueFile(exc.strerror or "not a regular file") from None


class QueueFile:
    """An open queue file (see the module docstring). Create with :meth:`open`."""

    def __init__(self, f: IO[bytes], queue: str, qid: str, path: str, st: os.stat_result):
        self._f = f
        self.queue = queue
        self.qid = qid
        self.path = path
        self.st = st
        self.sender = ""
        self.fullname = ""
        self.recipients: list[Recipient] = []
        self.undone_count = 0
        self.done_count = 0
        self.rcpt_count = 0
        self.data_offset = 0
        self.data_size = 0
        self.content_size = 0
        self.qmgr_flags = 0
        self.arrival = (0, 0)
        self.create_time = 0
        self.warn_time = 0
        self.warn_offset = 0
        self.envid = ""
        self.ret = 0
        self.attrs: dict[str, str] = {}
        self.encoding = ""
        self.smtputf8 = 0
        self.rewrite_context = "local"
        self.content_filter = ""
        self.inspector = ""
        self.redirect = ""
        self.verp = ""
        self._resume = -1

    # ------------------------------------------------------------------ open

    @classmethod
    def open(
        cls,
        spool: Spool,
        queue: str,
        qid: str,
        lock: LockMode = "ex",
        *,
        rcpt_limit: int | None = None,
        readonly: bool = False,
    ) -> QueueFile:
        """Open, lock and read the envelope of queue file ``qid`` in ``queue``.

        Args:
            spool: the queue directory.
            queue: queue name (``active`` for the qmgr and agents).
            qid: the queue id (validated).
            lock: "ex" (LOCK_EX|LOCK_NB), "sh" (LOCK_SH|LOCK_NB) or None.
            rcpt_limit: keep at most this many undone recipients in ``recipients``
                (None = all); the rest come from :meth:`read_recipients`.
            readonly: open O_RDONLY (the update methods then fail with OSError).

        Raises:
            ValueError: invalid id or queue name.
            OSError: open/stat failed (FileNotFoundError when gone).
            CorruptQueueFile: not a regular file (a symbolic link is never followed), or
                a damaged one.
            QueueFileNotReady, QueueFileLocked.
        """
        qf = cls._open_locked(spool, queue, qid, lock, readonly)
        try:
            qf._read_envelope(rcpt_limit)
        except BaseException:
            qf.close()
            raise
        return qf

    @classmethod
    def open_content(cls, spool: Spool, queue: str, qid: str, lock: LockMode = "sh"
                     ) -> QueueFile:
        """A delivery agent's open: as :meth:`open`, but only the first record (``C``:
        data_offset, data_size, content_size, rcpt_count, qmgr_flags, smtputf8) is read,
        not the envelope. The request carries the sender, the recipients with their
        record offsets, and the rest (postfix.md §5.2; Postfix's deliver_request_get()
        opens the queue file and seeks to the content, the qmgr having read the
        envelope). Reading the envelope for every request made a message of N
        recipients cost N / recipient-limit requests x N records: 2 million records
        for 10,000 recipients. Usable: iter_lines, mark_done, mark_corrupt, close; the
        envelope attributes stay at their defaults.

        Raises:
            As :meth:`open`; CorruptQueueFile when the first record is not a valid C;
            QueueFileMarkedCorrupt (a QueueFileNotReady) for a file marked corrupt,
            whether the open succeeded (root) or was refused (EACCES: O_RDWR on a 0400
            file for its owner, the agents that run as mail_owner), so that every agent
            says the same about it.
        """
        try:
            qf = cls._open_locked(spool, queue, qid, lock, False)
        except (QueueFileNotReady, PermissionError):
            try:
                marked = is_marked_corrupt(os.lstat(spool.path(queue, qid)))
            except OSError:
                marked = False
            if marked:
                raise QueueFileMarkedCorrupt(qid) from None
            raise
        try:
            qf._read_size(RecordReader(qf._f, offset=0), [0])
        except BaseException:
            qf.close()
            raise
        return qf

    @classmethod
    def _open_locked(cls, spool: Spool, queue: str, qid: str, lock: LockMode,
                     readonly: bool) -> QueueFile:
        """Open ``qid`` (a regular file), check that it is ready, take ``lock``."""
        path = spool.path(queue, qid)
        fd, st = open_regular(path, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            if not Spool.is_ready(st):
                raise QueueFileNotReady(f"{qid}: file is not ready (mode {st.st_mode:o})")
            if lock is not None:
                op = fcntl.LOCK_EX if lock == "ex" else fcntl.LOCK_SH
                try:
                    fcntl.flock(fd, op | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise QueueFileLocked(f"{qid}: file is locked") from None
            f = os.fdopen(fd, "rb" if readonly else "r+b")
        except BaseException:
            os.close(fd)
            raise
        return cls(f, queue, qid, path, st)

    def close(self) -> None:
        """Close the file (releases the lock)."""
        self._f.close()

    def fileno(self) -> int:
        """The file descriptor."""
        return self._f.fileno()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def _next(self, rd: RecordReader, jumps: list[int]) -> Record:
        """Next record, following ``p`` pointers; CorruptQueueFile at EOF or bad framing."""
        return self._follow(rd, jumps, _read(rd))

    @staticmethod
    def _follow(rd: RecordReader, jumps: list[int], rec: Record | None) -> Record:
        """:meth:`_next` for a record already read: ``rec`` unless it is the end of the
        file or a pointer (then the record the pointer leads to)."""
        while True:
            if rec is None:
                raise CorruptQueueFile(f"offset {rd.tell()}: premature end of file, no E")
            if rec.rtype != R.REC_PTR:
                return rec
            target = _int(rec.data, "pointer", rec.offset)
            if target != 0:
                jumps[0] += 1
                if jumps[0] > _MAX_PTR_JUMPS or target < 0:
                    raise CorruptQueueFile(f"offset {rec.offset}: pointer loop or bad pointer")
                rd.seek(target)
            rec = _read(rd)

    def _read_size(self, rd: RecordReader, jumps: list[int]) -> None:
        """Read the first record, which must be C, and take its fields."""
        rec = self._next(rd, jumps)
        if rec.rtype != R.REC_SIZE:
            raise CorruptQueueFile(f"offset 0: first record is {rec.rtype!r}, not C")
        self._parse_size(rec)

    def _parse_size(self, rec: Record) -> None:
        fields = rec.data.split()
        if not 2 <= len(fields) <= 6:
            raise CorruptQueueFile(f"offset 0: bad size record {rec.data[:100]!r}")
        vals = [_int(v, "size record", 0) for v in fields] + [0] * (6 - len(fields))
        (self.data_size, self.data_offset, self.rcpt_count, self.qmgr_flags,
         content, self.smtputf8) = vals
        if self.data_size <= 0 or self.data_offset <= 0 or self.rcpt_count < 0:
            raise CorruptQueueFile(f"offset 0: bad size record {rec.data[:100]!r}")
        if self.qmgr_flags & ~0x1F or content < 0 or self.smtputf8 < 0:
            raise CorruptQueueFile(f"offset 0: bad size record flags {rec.data[:100]!r}")
        self.content_size = content or self.data_size

    def _rcpt_record(self, rec: Record, ps: _RcptState, keep: bool) -> Recipient | None:
        """Handle a recipient-related record; return a Recipient for an undone R."""
        t = rec.rtype
        data = rec.data
        if t == R.REC_ATTR:
            name, sep, value = data.partition(b"=")
            t = _ATTR_PSEUDO.get(name.decode("ascii", "replace"), b"")
            if not sep or t not in (R.REC_DSN_ORCPT, R.REC_DSN_NOTIFY):
                return None
            data = value
        if ps.start < 0:
            ps.start = rec.offset
        if t == R.REC_ORCP:
            ps.orig = data.decode("utf-8", "surrogateescape")
        elif t == R.REC_DSN_ORCPT:
            ps.orcpt = data.decode("utf-8", "surrogateescape")
        elif t == R.REC_DSN_NOTIFY:
            ps.notify = _int(data, "notify_flags", rec.offset)
            if ps.notify < 0 or ps.notify > 15:
                raise CorruptQueueFile(f"offset {rec.offset}: bad notify_flags {ps.notify}")
        elif t == R.REC_DRCP:
            ps.reset()
        elif t == R.REC_DONE:
            if keep:
                self.done_count += 1
            ps.reset()
        elif t == R.REC_RCPT:
            r = Recipient(data.decode("utf-8", "surrogateescape"), ps.orig, ps.orcpt,
                          ps.notify, rec.offset)
            return r
        return None

    def _read_envelope(self, rcpt_limit: int | None) -> None:
        rd = RecordReader(self._f, offset=0)
        read = rd.read
        jumps = [0]
        self._read_size(rd, jumps)
        seen_time = seen_sender = False
        ctime = 0
        ps = _RcptState()
        allowed = _ENVELOPE
        segment = "envelope"
        attrs = self.attrs
        while True:
            try:  # _next, without two calls per record
                rec = read()
            except RecordError as exc:
                raise CorruptQueueFile(str(exc)) from None
            if rec is None or rec.rtype == _PTR:
                rec = self._follow(rd, jumps, rec)
            t = rec.rtype
            if t == _ATTR:  # most records of mail from smtpd: one look, not three
                data = rec.data
                if not data.startswith(_RCPT_ATTRS):
                    name_b, sep, data = data.partition(b"=")
                    if not sep or not name_b:
                        raise CorruptQueueFile(f"offset {rec.offset}: bad attribute record")
                    name = name_b.decode("utf-8", "surrogateescape")
                    pseudo = _ATTR_PSEUDO.get(name)
                    if pseudo is None:
                        if name in _SPECIAL_ATTRS:
                            self._attr(name, data.decode("utf-8", "surrogateescape"),
                                       rec.offset)
                        else:
                            attrs[name] = data.decode("utf-8", "surrogateescape")
                        continue
                    t = pseudo  # envelope_id, ret_flags, create_time: as i, <, c records
            elif t not in allowed:
                raise CorruptQueueFile(
                    f"offset {rec.offset}: unexpected record type {t!r} in {segment} segment")
            else:
                data = rec.data
            if t in _RCPT_TYPES:  # (an A record here is dsn_orig_rcpt= or notify_flags=)
                r = self._rcpt_record(rec, ps, True)
                if r is not None:
                    self.undone_count += 1
                    if rcpt_limit is None or len(self.recipients) < rcpt_limit:
                        self.recipients.append(r)
                    elif self._resume < 0:
                        self._resume = ps.start if ps.start >= 0 else rec.offset
                    ps.reset()
                continue
            if t == _MESG:
                if segment != "envelope":
                    raise CorruptQueueFile(f"offset {rec.offset}: second M record")
                self._seek_x(rd, jumps)
                allowed = _EXTRACTED
                segment = "extracted"
                ps.reset()
                continue
            if t == _END:
                break
            self._envelope_record(t, data, rec.offset)
            if t == _TIME:
                seen_time = True
            elif t == _FROM:
                seen_sender = True
            elif t == _CTIME:
                ctime = _int(data, "create_time", rec.offset)
        if segment != "extracted":
            raise CorruptQueueFile("E record before the message content")
        if not seen_time:
            raise CorruptQueueFile("missing T (arrival time) record")
        if not seen_sender:
            raise CorruptQueueFile("missing S (sender) record")
        self.create_time = ctime or self.arrival[0]

    def _seek_x(self, rd: RecordReader, jumps: list[int]) -> None:
        """Jump over the content (data_offset + data_size) and require the X record."""
        at = self.data_offset + self.data_size
        rd.seek(at)
        try:
            x = self._next(rd, jumps)
        except CorruptQueueFile as exc:
            raise CorruptQueueFile(f"offset {at}: data_size does not land on X ({exc})") from None
        if x.rtype != R.REC_XTRA:
            raise CorruptQueueFile(f"offset {at}: data_size does not land on X "
                                   f"(found {x.rtype!r})")

    @staticmethod
    def _is_rcpt_attr(data: bytes) -> bool:
        return data.startswith(_RCPT_ATTRS)

    def _attr(self, name: str, value: str, at: int) -> None:
        if name == "encoding":
            self.encoding = value
        elif name == "smtputf8":
            self.smtputf8 |= _int(value.encode(), "smtputf8", at)
        elif name == "rewrite_context":
            self.rewrite_context = value or "local"
        else:
            self.attrs[name] = value

    def _envelope_record(self, t: bytes, data: bytes, at: int) -> None:
        text = data.decode("utf-8", "surrogateescape")
        if t == R.REC_TIME:
            parts = data.split()
            if not 1 <= len(parts) <= 2:
                raise CorruptQueueFile(f"offset {at}: bad arrival time {data[:40]!r}")
            sec = _int(parts[0], "arrival time", at)
            usec = _int(parts[1], "arrival time", at) if len(parts) == 2 else 0
            self.arrival = (sec, usec)
        elif t == R.REC_FROM:
            self.sender = text
        elif t == R.REC_FULL:
            self.fullname = text
        elif t == R.REC_WARN:
            self.warn_time = _int(data, "warning time", at)
            self.warn_offset = at
        elif t == R.REC_DSN_ENVID:
            self.envid = text
        elif t == R.REC_DSN_RET:
            self.ret = _int(data, "ret_flags", at)
        elif t == R.REC_FILT:
            self.content_filter = text
        elif t == R.REC_INSP:
            self.inspector = text
        elif t == R.REC_RDR:
            self.redirect = text
        elif t == R.REC_VERP:
            self.verp = text
        # c handled by the caller; K, P, r, e, ... carry nothing we use.

    @property
    def has_more_recipients(self) -> bool:
        """True when undone recipients remain that :meth:`read_recipients` has not returned."""
        return self._resume >= 0

    def read_recipients(self, limit: int) -> list[Recipient]:
        """Return the next batch of at most ``limit`` undone recipients.

        Continues where :meth:`open` (with ``rcpt_limit``) or the previous call stopped;
        returns [] when there are no more. Recipients marked done meanwhile are skipped.

        Raises:
            CorruptQueueFile: the file changed under us or is broken.
        """
        if self._resume < 0 or limit <= 0:
            return []
        rd = RecordReader(self._f, offset=self._resume)
        jumps = [0]
        in_envelope = self._resume < self.data_offset
        ps = _RcptState()
        out: list[Recipient] = []
        while True:
            rec = self._next(rd, jumps)
            t = rec.rtype
            if t == R.REC_END:
                self._resume = -1
                return out
            if t == R.REC_MESG and in_envelope:
                self._seek_x(rd, jumps)
                in_envelope = False
                continue
            if t not in _RCPT_TYPES or (t == R.REC_ATTR and not self._is_rcpt_attr(rec.data)):
                continue
            if t == R.REC_RCPT and len(out) >= limit:
                self._resume = ps.start if ps.start >= 0 else rec.offset
                return out
            r = self._rcpt_record(rec, ps, False)
            if r is not None:
                out.append(r)
                ps.reset()

    def iter_lines(self) -> Iterator[bytes]:
        """Yield the message content lines (headers, empty separator, body), without EOL.

        ``L`` records are joined with the following ``N``. Do not interleave with other
        reads of this QueueFile.

        Raises:
            CorruptQueueFile: a record that does not belong in the content, or bad framing.
        """
        rd = RecordReader(self._f, offset=self.data_offset)
        read = rd.read
        jumps = [0]
        parts: list[bytes] = []
        while True:
            try:  # _next, without two calls per record
                rec = read()
            except RecordError as exc:
                raise CorruptQueueFile(str(exc)) from None
            if rec is None or rec.rtype == _PTR:
                rec = self._follow(rd, jumps, rec)
            t = rec.rtype
            if t == R.REC_NORM:
                if parts:
                    parts.append(rec.data)
                    yield b"".join(parts)
                    parts = []
                else:
                    yield rec.data
            elif t == R.REC_CONT:
                parts.append(rec.data)
            elif t == R.REC_XTRA:
                if parts:
                    yield b"".join(parts)
                return
            elif t != R.REC_PAD:
                raise CorruptQueueFile(
                    f"offset {rec.offset}: unexpected record type {t!r} in message content")

    # ------------------------------------------------------------------ updates

    def mark_done(self, offset: int) -> None:
        """Mark the recipient whose ``R`` record is at ``offset`` as done (``R`` -> ``D``).

        A recipient already marked ``D`` is left alone.

        Raises:
            CorruptQueueFile: no R/D record type byte at ``offset``.
            OSError: the write failed.
        """
        f = self._f
        if offset <= 0:
            raise CorruptQueueFile(f"mark_done: bad recipient offset {offset}")
        f.seek(offset)
        b = f.read(1)
        if b == R.REC_DONE:
            return
        if b != R.REC_RCPT:
            raise CorruptQueueFile(f"offset {offset}: expected R record, found {b!r}")
        f.seek(offset)
        f.write(R.REC_DONE)
        f.flush()

    def set_warn_done(self) -> None:
        """Rewrite the ``W`` record to ``-1`` (the delay warning was sent).

        Raises:
            QueueFileError: the file has no W record.
            CorruptQueueFile: the record at warn_offset is not a 15-byte W record.
            OSError: the write failed.
        """
        if self.warn_offset <= 0:
            raise QueueFileError(f"{self.qid}: no warning time record")
        self._f.seek(self.warn_offset)
        head = self._f.read(2)
        if head != R.REC_WARN + bytes([15]):
            raise CorruptQueueFile(f"offset {self.warn_offset}: not a W record")
        self._f.seek(self.warn_offset + 2)
        self._f.write(b"%15d" % -1)
        self._f.flush()
        self.warn_time = -1

    def mark_corrupt(self) -> None:
        """Set mode 0400 so the qmgr moves the file to corrupt/ (Postfix mark_corrupt).

        Raises:
            OSError: fchmod failed.
        """
        os.fchmod(self._f.fileno(), stat.S_IRUSR)
