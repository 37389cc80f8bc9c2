"""maildrop — the maildrop/ file format: written by qmgr-sendmail, read by pickup.

Summary
    A maildrop file uses Postfix's record framing and the subset of record types that
    postdrop accepts from sendmail (postfix.md §2.2): envelope ``MFSRVAin``, content
    ``XLN``, extracted ``EAR``. qmgr-sendmail writes::

        [F full name] S sender [A envelope_id=...] [A ret_flags=N] A rewrite_context=local
        [A extract_recipients=1] ([A notify_flags=N] R recipient)* M
        (N line | L part... N part)* X E

    The file is created 0600 in maildrop/ (Spool.create), and becomes *ready* with
    fchmod 0744 just before fsync, as postdrop does (§1.4, §1.5). The arrival time is
    the file's mtime (Postfix pickup's rule for files without a T record; a T record is
    accepted too).

    The writer never writes an envelope record that the reader would refuse: a payload
    longer than the limit (line_length_limit, the reader's ``max_record``) raises
    RecordTooLong before anything is written, so that qmgr-sendmail fails instead of
    queueing a file that pickup would set aside. (Content lines have no such limit:
    long ones are split into ``L`` records.)

    The reader is for untrusted input (any local user may write into maildrop/): every
    record is length-limited, types must belong to their segment, only known attribute
    names are accepted, ``S`` and the final ``E`` are required, and an envelope id must
    be 1-100 printable ASCII characters (RFC 3461). Any problem raises MaildropError
    with a reason worded for the log (``record type I length 7871 exceeds 2048``,
    ``unexpected record type C in envelope segment``). Content over the size limit is
    not an error of the file: the reader stops keeping content at the limit, checks the
    rest of the file, and sets ``too_big`` (pickup then returns the message to the
    sender, as Postfix's cleanup does).

Public API
    MaildropWriter(f, line_limit=2048)      .envelope(...) (raises RecordTooLong),
                                             .line(bytes), .finish()
    envelope_records(sender, recipients, *, fullname, notify, ret, envid,
                     extract_recipients, max_record=2048) -> bytes
                                             the framed envelope segment; raises
                                             RecordTooLong (a ValueError) for a record
                                             over max_record, which read_maildrop would
                                             refuse
    MaildropMessage                          sender, fullname, recipients, envid, ret,
                                             extract_recipients, arrival, content (bytes),
                                             too_big (content cut at size_limit)
    read_maildrop(f, *, max_record=2048, size_limit=10240000) -> MaildropMessage
    MaildropError(reason)
    RecordTooLong(what, length, limit)       ValueError: ``<what> too long (<length>
                                             bytes; line_length_limit is <limit>)``

Start-up cost
    qmgr-sendmail imports this module once per run, so importing it loads nothing but
    this file: MaildropMessage is a plain class (no dataclasses), the writer frames its
    records itself (the framing of qmgrd.spool.records.encode; the record types are the
    records REC_* values, checked by the tests), and read_maildrop imports
    qmgrd.spool.records and qmgrd.spool.envelope when it is first called.

Logs nothing.
"""

from __future__ import annotations

TYPE_CHECKING = False  # nothing imported at run time: see "Start-up cost" above
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import IO

    from qmgrd.spool.envelope import Recipient

__all__ = ["MaildropError", "MaildropMessage", "MaildropWriter", "RecordTooLong",
           "envelope_records", "read_maildrop"]

# The record types the writer emits (Postfix rec_type.h; the values of the REC_* names in
# qmgrd.spool.records, which tests/test_sendmail_fast.py checks).
_REC_FULL = b"F"
_REC_FROM = b"S"
_REC_ATTR = b"A"
_REC_RCPT = b"R"
_REC_MESG = b"M"
_REC_CONT = b"L"
_REC_NORM = b"N"
_REC_XTRA = b"X"
_REC_END = b"E"
_ENV_ATTRS = frozenset(("envelope_id", "ret_flags", "notify_flags", "rewrite_context",
                        "extract_recipients", "encoding"))


class MaildropError(Exception):
    """The maildrop file is malformed; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_FIELDS = ("sender", "fullname", "recipients", "envid", "ret", "extract_recipients",
           "arrival", "content", "too_big")


class MaildropMessage:
    """What a maildrop file holds (see read_maildrop); fields as keyword arguments,
    compared by value. (A plain class, not a dataclass: qmgr-sendmail imports this
    module and the dataclasses import costs it several milliseconds per run.)"""

    __slots__ = _FIELDS

    def __init__(self, sender: str = "", fullname: str = "",
                 recipients: list[Recipient] | None = None, envid: str = "", ret: int = 0,
                 extract_recipients: bool = False, arrival: tuple[int, int] = (0, 0),
                 content: bytes = b"", too_big: bool = False) -> None:
        self.sender = sender
        self.fullname = fullname
        self.recipients: list[Recipient] = [] if recipients is None else recipients
        self.envid = envid
        self.ret = ret
        self.extract_recipients = extract_recipients
        self.arrival = arrival
        self.content = content
        self.too_big = too_big

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaildropMessage):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in _FIELDS)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in _FIELDS)
        return f"MaildropMessage({fields})"


class MaildropWriter:
    """Streams records into an open maildrop file (no fsync/fchmod: the caller does).

    Args:
        f: binary file opened for writing.
        line_limit: line_length_limit: content lines longer than this become L records
            plus a final N, and no envelope record may be longer (RecordTooLong).
    """

    def __init__(self, f: IO[bytes], line_limit: int = 2048) -> None:
        self._f = f
        self._limit = max(line_limit, 1)
        self.content_bytes = 0

    def envelope(self, sender: str, recipients: list[str], *, fullname: str = "",
                 notify: int = 0, ret: int = 0, envid: str = "",
                 extract_recipients: bool = False) -> None:
        """Write the envelope segment and the ``M`` record (envelope_records, with this
        writer's ``line_limit`` as ``max_record``).

        Raises:
            RecordTooLong: a record would exceed ``line_limit``; nothing is written.
        """
        self._f.write(envelope_records(
            sender, recipients, fullname=fullname, notify=notify, ret=ret, envid=envid,
            extract_recipients=extract_recipients, max_record=self._limit))

    def line(self, data: bytes) -> None:
        """Write one content line (without its line ending)."""
        limit = self._limit
        w = self._f.write
        self.content_bytes += len(data) + 1
        while len(data) > limit:
            w(_frame(_REC_CONT, data[:limit]))
            data = data[limit:]
        w(_frame(_REC_NORM, data))

    def finish(self) -> None:
        """Write the ``X`` and ``E`` records."""
        self._f.write(_frame(_REC_XTRA, b"") + _frame(_REC_END, b""))


class RecordTooLong(ValueError):
    """An envelope record whose payload is longer than read_maildrop's ``max_record``
    (pickup would set the file aside). ``what`` names the field (``sender address``,
    ``recipient address``, ``full name``, ``<name> attribute`` - e.g.
    ``envelope_id attribute``, whose payload is ``envelope_id=<envid>``),
    ``length`` is the payload's size in bytes and ``limit`` the maximum; the message is
    ``<what> too long (<length> bytes; line_length_limit is <limit>)``."""

    def __init__(self, what: str, length: int, limit: int) -> None:
        super().__init__(f"{what} too long ({length} bytes; line_length_limit is {limit})")
        self.what = what
        self.length = length
        self.limit = limit


def envelope_records(sender: str, recipients: list[str], *, fullname: str = "",
                     notify: int = 0, ret: int = 0, envid: str = "",
                     extract_recipients: bool = False, max_record: int = 2048) -> bytes:
    """The framed envelope segment and ``M`` record of a maildrop file (module
    description), strings encoded as UTF-8 with surrogateescape.

    Args:
        max_record: the largest payload allowed - read_maildrop's ``max_record``, i.e.
            line_length_limit - so that no file is written that pickup would set aside.

    Raises:
        RecordTooLong: the first record (in file order) whose payload is longer than
            ``max_record``.
    """
    recs: list[tuple[str, bytes, bytes]] = []
    if fullname:
        recs.append(("full name", _REC_FULL, fullname.encode("utf-8", "surrogateescape")))
    recs.append(("sender address", _REC_FROM, sender.encode("utf-8", "surrogateescape")))
    if envid:
        recs.append(("envelope_id attribute", _REC_ATTR,
                     b"envelope_id=" + envid.encode("utf-8", "surrogateescape")))
    if ret:
        recs.append(("ret_flags attribute", _REC_ATTR, b"ret_flags=%d" % ret))
    recs.append(("rewrite_context attribute", _REC_ATTR, b"rewrite_context=local"))
    if extract_recipients:
        recs.append(("extract_recipients attribute", _REC_ATTR, b"extract_recipients=1"))
    for rcpt in recipients:
        if notify:
            recs.append(("notify_flags attribute", _REC_ATTR, b"notify_flags=%d" % notify))
        recs.append(("recipient address", _REC_RCPT, rcpt.encode("utf-8", "surrogateescape")))
    for what, _, data in recs:
        if len(data) > max_record:
            raise RecordTooLong(what, len(data), max_record)
    return b"".join(_frame(t, data) for _, t, data in recs) + _frame(_REC_MESG, b"")


def _frame(rtype: bytes, data: bytes) -> bytes:
    """One record: type byte, payload length as little-endian base-128, payload (the
    framing of qmgrd.spool.records.encode, postfix.md §2.1)."""
    n = len(data)
    if n < 0x80:
        return rtype + bytes((n,)) + data
    head = bytearray(rtype)
    while n >= 0x80:
        head.append(n & 0x7F | 0x80)
        n >>= 7
    head.append(n)
    return bytes(head) + data


def _type_name(t: bytes) -> str:
    """A record type for a log line: its letter when printable, else its number."""
    return t.decode() if b"!" <= t <= b"~" else str(t[0])


def _printable(data: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in data)


def _records(f: IO[bytes], max_record: int) -> Iterator[tuple[bytes, bytes]]:
    """Postfix record framing (postfix.md §2.1): yields (type, payload)."""
    read = f.read
    while True:
        head = read(2)
        if not head:
            return
        if len(head) < 2:
            raise MaildropError("premature end of file in a record header")
        t = head[0:1]
        b = head[1]
        length = b & 0x7F
        shift = 7
        while b & 0x80:
            if shift >= 35:
                raise MaildropError(f"record type {_type_name(t)}: bad record length")
            nb = read(1)
            if not nb:
                raise MaildropError(f"record type {_type_name(t)}: premature end of file")
            b = nb[0]
            length |= (b & 0x7F) << shift
            shift += 7
        if length > max_record:
            raise MaildropError(
                f"record type {_type_name(t)} length {length} exceeds {max_record}")
        data = read(length) if length else b""
        if len(data) != length:
            raise MaildropError(f"record type {_type_name(t)}: premature end of file")
        yield t, data


def _text(data: bytes, what: str) -> str:
    if b"\0" in data or b"\n" in data or b"\r" in data:
        raise MaildropError(f"NUL or line break in {what}")
    return data.decode("utf-8", "surrogateescape")


def _num(data: bytes, what: str) -> int:
    try:
        value = int(data)
    except ValueError:
        raise MaildropError(f"bad {what} value") from None
    if value < 0:
        raise MaildropError(f"bad {what} value")
    return value


def read_maildrop(f: IO[bytes], *, max_record: int = 2048,
                  size_limit: int = 10240000) -> MaildropMessage:
    """Parse a maildrop file strictly.

    Args:
        f: the open file, positioned at 0.
        max_record: the largest record payload accepted (line_length_limit).
        size_limit: content beyond this many bytes is dropped and ``too_big`` set (0 =
            no limit).

    Raises:
        MaildropError: any framing error, record type outside its segment, unknown or bad
            attribute, missing sender, bad envelope id, missing final E, or data after E.
    """
    from qmgrd.spool import records as R
    from qmgrd.spool.envelope import Recipient, valid_envid

    env_types, cont_types, xtra_types = (
        frozenset(types[i : i + 1] for i in range(len(types)))
        for types in (R.MAILDROP_ENVELOPE, R.MAILDROP_CONTENT, R.MAILDROP_EXTRACTED))
    msg = MaildropMessage()
    f.seek(0)
    records = _records(f, max_record)
    allowed = env_types
    segment = "envelope"
    seen_sender = False
    notify = 0
    parts: list[bytes] = []
    size = 0
    while True:
        rec = next(records, None)
        if rec is None:
            raise MaildropError("premature end of file, no E record")
        t, data = rec
        if t not in allowed:
            raise MaildropError(f"unexpected record type {_type_name(t)} in {segment} segment")
        if segment == "content":
            if t == R.REC_XTRA:
                allowed, segment = xtra_types, "extracted"
                continue
            size += len(data) + (1 if t == R.REC_NORM else 0)
            if size_limit and size > size_limit:
                msg.too_big = True
            if msg.too_big:
                continue
            parts.append(data)
            if t == R.REC_NORM:
                parts.append(b"\n")
            continue
        if t == R.REC_END:
            break
        if t == R.REC_MESG:
            allowed, segment = cont_types, "content"
        elif t == R.REC_FROM:
            if seen_sender:
                raise MaildropError("duplicate sender record")
            msg.sender = _text(data, "sender")
            seen_sender = True
        elif t == R.REC_FULL:
            msg.fullname = _text(data, "full name")
        elif t == R.REC_RCPT:
            msg.recipients.append(Recipient(_text(data, "recipient"), notify=notify))
            notify = 0
        elif t == R.REC_TIME:
            fields = data.split()
            if not 1 <= len(fields) <= 2:
                raise MaildropError("bad time record")
            msg.arrival = (_num(fields[0], "time"), _num(fields[-1], "time")
                           if len(fields) == 2 else 0)
        elif t == R.REC_DSN_ENVID:
            msg.envid = _text(data, "envelope id")
        elif t == R.REC_DSN_NOTIFY:
            notify = _num(data, "notify_flags")
        elif t == R.REC_ATTR:
            notify = _attr(msg, data, notify)
        # V (VERP) is accepted and ignored.
    if not seen_sender:
        raise MaildropError("no envelope sender")
    if f.read(1):
        raise MaildropError("data after the E record")
    if msg.envid and not valid_envid(msg.envid):
        raise MaildropError("malformed envelope id (RFC 3461: 1-100 printable ASCII "
                            "characters without spaces)")
    if notify > 15:
        raise MaildropError("bad notify_flags value")
    msg.content = b"".join(parts)
    return msg


def _attr(msg: MaildropMessage, data: bytes, notify: int) -> int:
    name_b, sep, value = data.partition(b"=")
    name = name_b.decode("ascii", "replace")
    if not sep or name not in _ENV_ATTRS:
        raise MaildropError(f"unexpected attribute: {_printable(name_b[:40])}")
    if name == "envelope_id":
        msg.envid = _text(value, "envelope id")
    elif name == "ret_flags":
        msg.ret = _num(value, "ret_flags")
        if msg.ret > 3:
            raise MaildropError("bad ret_flags value")
    elif name == "notify_flags":
        notify = _num(value, "notify_flags")
        if notify > 15:
            raise MaildropError("bad notify_flags value")
    elif name == "extract_recipients":
        msg.extract_recipients = value == b"1"
    return notify
