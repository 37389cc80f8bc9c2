"""records — Postfix queue-file records: type byte, base-128 length, payload.

Summary
    Every queue file (and maildrop file) is a sequence of records (postfix.md §2.1):
    one type byte, the payload length as little-endian base-128 (7 bits per byte, high
    bit = more bytes follow, at most 5 bytes), then the raw payload (may hold NUL, no
    terminator). This module encodes records and reads them back, strictly.

Public API
    REC_* constants         one-byte record types (``REC_SIZE = b"C"`` ...), names as in
                            Postfix's rec_type.h
    ENVELOPE_TYPES, CONTENT_TYPES, EXTRACTED_TYPES          allowed types per segment
    MAILDROP_ENVELOPE, MAILDROP_CONTENT, MAILDROP_EXTRACTED postdrop's (sendmail's) subset
    encode(rtype, data) -> bytes
    encode_len(n) -> bytes
    size_payload(data_size, data_offset, rcpt_count, qmgr_flags, content_size,
                 smtputf8) -> bytes          the fixed 95-byte C payload
    RecordReader(f, max_len=DEFAULT_MAX_LEN, offset=None)
        .read() -> Record | None   (offset, rtype, data), None at a clean end of file
        .seek(offset), .tell(), iteration yields Record
    RecordError                    malformed framing: over-long length encoding, length
                                   above max_len, truncated record

The reader never trusts the file: every problem is a RecordError with a reason naming
the offset. Logs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, NamedTuple

__all__ = [
    "DEFAULT_MAX_LEN",
    "SIZE_PAYLOAD_LEN",
    "SIZE_RECORD_LEN",
    "Record",
    "RecordError",
    "RecordReader",
    "encode",
    "encode_len",
    "size_payload",
]

REC_SIZE = b"C"
REC_TIME = b"T"
REC_CTIME = b"c"
REC_FULL = b"F"
REC_INSP = b"I"
REC_FILT = b"L"
REC_FROM = b"S"
REC_DONE = b"D"
REC_RCPT = b"R"
REC_ORCP = b"O"
REC_DRCP = b"/"
REC_WARN = b"W"
REC_ATTR = b"A"
REC_KILL = b"K"
REC_RDR = b">"
REC_FLGS = b"f"
REC_DELAY = b"d"
REC_MESG = b"M"
REC_NORM = b"N"
REC_CONT = b"L"
REC_PAD = b"w"
REC_XTRA = b"X"
REC_RRTO = b"r"
REC_ERTO = b"e"
REC_PRIO = b"P"
REC_PTR = b"p"
REC_VERP = b"V"
REC_DSN_RET = b"<"
REC_DSN_ENVID = b"i"
REC_DSN_ORCPT = b"o"
REC_DSN_NOTIFY = b"n"
REC_MILT_COUNT = b"m"
REC_END = b"E"

#: Allowed record types per segment (rec_type.h); the first is the segment terminator.
ENVELOPE_TYPES = b"MCTcFILSDRO/WVA>K<ion" + REC_PTR
CONTENT_TYPES = b"XLNw" + REC_PTR
EXTRACTED_TYPES = b"EDRO/PreAFIL>Kon" + REC_PTR
#: postdrop input (maildrop files written by qmgr-sendmail); T is accepted as postdrop
#: itself writes it.
MAILDROP_ENVELOPE = b"MFSRVAinT"
MAILDROP_CONTENT = b"XLN"
MAILDROP_EXTRACTED = b"EAR"

#: Largest payload accepted by default (queue files we wrote ourselves).
DEFAULT_MAX_LEN = 1 << 24
SIZE_PAYLOAD_LEN = 95
SIZE_RECORD_LEN = 97

_LEN1 = [bytes([n]) for n in range(128)]


class RecordError(Exception):
    """A record could not be read: the reason says what and at which offset."""


class Record(NamedTuple):
    """One record: its file offset, one-byte type and payload."""

    offset: int
    rtype: bytes
    data: bytes


def encode_len(n: int) -> bytes:
    """Base-128 little-endian length bytes for ``n`` (>= 0)."""
    if n < 128:
        if n < 0:
            raise ValueError(f"negative record length {n}")
        return _LEN1[n]
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode(rtype: bytes, data: bytes) -> bytes:
    """One complete record: type byte, length, payload.

    Raises:
        ValueError: ``rtype`` is not exactly one byte.
    """
    if len(rtype) != 1:
        raise ValueError(f"record type must be one byte: {rtype!r}")
    return rtype + encode_len(len(data)) + data


def size_payload(
    data_size: int,
    data_offset: int,
    rcpt_count: int,
    qmgr_flags: int = 0,
    content_size: int = 0,
    smtputf8: int = 0,
) -> bytes:
    """The fixed-width ``C`` payload: six ``%15d`` fields separated by one space (95 bytes).

    Raises:
        ValueError: a field does not fit in 15 characters.
    """
    fields = (data_size, data_offset, rcpt_count, qmgr_flags, content_size, smtputf8)
    out = " ".join(f"{v:15d}" for v in fields).encode("ascii")
    if len(out) != SIZE_PAYLOAD_LEN:
        raise ValueError(f"size record field overflow: {fields}")
    return out


class RecordReader:
    """Strict sequential reader of records from a binary file object.

    Args:
        f: a readable binary file (buffered is best); the reader seeks it when ``offset``
           is given or :meth:`seek` is called, and otherwise reads from where it is.
        max_len: largest payload accepted (RecordError beyond).
        offset: file offset to start at (default: the file's current position).
    """

    __slots__ = ("_f", "_max", "_pos")

    def __init__(self, f: IO[bytes], max_len: int = DEFAULT_MAX_LEN, offset: int | None = None):
        self._f = f
        self._max = max_len
        if offset is None:
            self._pos = f.tell()
        else:
            f.seek(offset)
            self._pos = offset

    def tell(self) -> int:
        """Offset of the next record."""
        return self._pos

    def seek(self, offset: int) -> None:
        """Continue reading at ``offset``."""
        self._f.seek(offset)
        self._pos = offset

    def read(self) -> Record | None:
        """Read the next record; None at end of file on a record boundary.

        Raises:
            RecordError: length encoding over 5 bytes, length above max_len, or the file
                ends inside the record.
        """
        f = self._f
        start = self._pos
        head = f.read(2)
        if not head:
            return None
        if len(head) < 2:
            raise RecordError(f"offset {start}: truncated record header")
        rtype = head[0:1]
        b = head[1]
        length = b & 0x7F
        used = 2
        shift = 7
        while b & 0x80:
            if shift >= 35:
                raise RecordError(f"offset {start}: record length encoding too long")
            nb = f.read(1)
            if not nb:
                raise RecordError(f"offset {start}: truncated record length")
            b = nb[0]
            length |= (b & 0x7F) << shift
            shift += 7
            used += 1
        if length > self._max:
            raise RecordError(
                f"offset {start}: record type {rtype!r} length {length} exceeds {self._max}"
            )
        data = f.read(length) if length else b""
        if len(data) != length:
            raise RecordError(f"offset {start}: truncated record data")
        self._pos = start + used + length
        return Record(start, rtype, data)

    def __iter__(self) -> Iterator[Record]:
        while True:
            rec = self.read()
            if rec is None:
                return
            yield rec
