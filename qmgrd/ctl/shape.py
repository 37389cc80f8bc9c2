"""shape — ``qmgr-ctl shape``: Postfix's qshape(1), recipients by domain and age.

Summary
    The same table as Postfix's qshape Perl script (postfix.md §7.6; its rules copied
    here so that both print the same counts on the same queue):

    * queues: the names given (default ``incoming active``), every file below them
      (hash directories included) whose name is 6 or more letters and digits, a regular
      file (opened O_NONBLOCK|O_NOFOLLOW, then fstat: a FIFO or symbolic link is skipped
      with a warning and never read) with ``mode & 0733 == 0700`` — so files still being written, and ones
      flagged for forced expiry (g+x), are not counted, as in qshape;
    * a file counts when its first record is ``C`` followed by ``T`` (time = the ``T``
      record's seconds), or (maildrop) ``S`` or ``F`` then ``S`` (time = the file's
      mtime); ``p`` pointers are followed; at ``M`` the content is skipped by the ``C``
      data size (or walked for maildrop files) and must end in ``X``; at ``E`` the file
      counts if it has a time, a sender and at least one ``R`` recipient (``D`` done
      recipients do not count);
    * every ``R`` recipient counts once (with ``-s``: the message's sender, once per
      message), by domain: lower-cased, the part after the last ``@``, ``..`` collapsed,
      one leading and one trailing dot removed; the null sender is ``MAILER-DAEMON``;
    * age buckets: minutes since arrival / bucket_time ``m``: bucket 1 when ``m < 1``,
      else ``2 + int(log2 m)`` (``-l``: ``int(m + 1)``), at most ``bucket_count``; the
      headings are ``T``, then ``t, 2t, 4t ...`` (``-l``: ``t, 2t, 3t ...``) and the last
      one ``<previous>+``;
    * ``-p`` adds parent domains (``.example.com``) of domains with 3 or more labels,
      shown when at least ``-m`` (5) distinct subdomains were counted;
    * rows: ``TOTAL`` and each domain, sorted by total (descending), then by name
      length, then (qmgrd only: qshape leaves it to Perl's hash order) by name; columns
      right-aligned, each ``max(len(TOTAL count), len(heading)) + 1`` wide (at least 3);
      the domain column takes the rest of ``-w`` (80, at least 18), long names shown as
      ``+<tail>`` (``.+<tail>`` for parents).

    Unlike qshape (a refreshing display on a terminal), the table is printed once.
    One deliberate difference: a ready file whose first record is neither ``C``, ``S``
    nor ``F`` (garbage, or empty) is skipped, with the warning below; qshape's ``return
    undef`` makes it count, with ``-s``, as a MAILER-DAEMON message of the oldest age.

Public API
    Shape(queues, by_sender=False, parents=False, min_subdomains=5, buckets=10,
          bucket_time=5, linear=False, now=None)          (the counting options)
    count(spool, shape) -> Table        reads the queues; OSError for an unreadable
                                        queue directory or file (PermissionError: the
                                        caller may not read the queue — never a silent
                                        TOTAL 0)
    Table: .headings (list[str]), .rows (list[(name, list[int])]: TOTAL first as
           sorted; counts[0] is the total), .as_json() -> dict
    format_table(table, width=80) -> str
    QUEUE_NAMES                          the queue names shape accepts

Logs nothing; files that vanish are skipped silently, those that are not regular files or
do not parse with a warning on stderr (``qmgr-ctl: warning: deferred/<id>: damaged queue
file: <why>; skipped``; not for the corrupt queue, whose files are known to be damaged),
as Postfix's showq warns about a file it cannot read; the table stays valid.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from qmgrd.ctl.qread import Damaged, NotRegular, open_regular
from qmgrd.ctl.queues import QUEUE_NAMES
from qmgrd.spool.queue import Spool

__all__ = ["QUEUE_NAMES", "Shape", "Table", "count", "format_table"]

_NAME = re.compile(r"[A-Za-z0-9]{6,}\Z")
_MAX_JUMPS = 10000
_PARENT = re.compile(r"^(?:\.)?[^.]+\.(.*\.)")
_TRIM = re.compile(r"\.?(.+?)\.?$")


@dataclass
class Shape:
    """qshape's options (see module docstring)."""

    queues: tuple[str, ...] = ("incoming", "active")
    by_sender: bool = False
    parents: bool = False
    min_subdomains: int = 5
    buckets: int = 10
    bucket_time: int = 5
    linear: bool = False
    now: int | None = None


@dataclass
class Table:
    """The counted table: headings and rows (name, [total, bucket 1 .. bucket n])."""

    headings: list[str]
    rows: list[tuple[str, list[int]]] = field(default_factory=list)
    now: int = 0

    def as_json(self) -> dict[str, Any]:
        """The table as plain data (``qmgr-ctl shape --json``)."""
        return {"time": self.now, "buckets": self.headings[1:],
                "rows": [{"domain": d, "total": c[0], "counts": c[1:]} for d, c in self.rows]}


def _records(f: Any) -> Any:
    """Yield (type, data) like qshape's rec_get (length at most 3 bytes); stops at a
    short read. ``f`` is a binary file; pointers are followed by the caller."""
    while True:
        t = f.read(1)
        if not t:
            return
        length = 0
        shift = 0
        while True:
            b = f.read(1)
            if not b:
                return
            o = b[0]
            length |= (o & 0x7F) << shift
            if not o & 0x80:
                break
            shift += 7
            if shift > 14:
                return
        data = f.read(length) if length else b""
        if len(data) != length:
            return
        yield t, data


def _qenv(path: str) -> tuple[int, str, list[str]] | None:
    """qshape's qenv(): (time, sender, recipients) of a countable file, else None (gone,
    not ready, forced to expire, no recipient left).  Raises Damaged for a ready file
    that is not a well-formed queue file (qshape skips it or, with -s, counts it)."""
    try:
        fd, st = open_regular(path)
    except NotRegular:
        sys.stderr.write(f"qmgr-ctl: warning: skip {path}: not a regular file\n")
        return None
    except FileNotFoundError:
        return None
    # PermissionError and other failures propagate: a wrong count is worse than an error
    if st.st_mode & 0o733 != 0o700:
        os.close(fd)
        return None
    with open(fd, "rb", buffering=65536) as f:
        recs = _records(f)
        first = next(recs, None)
        if first is None:
            raise Damaged("empty file" if st.st_size == 0 else "truncated first record")
        r, d = first
        dlen: int | None = None
        sender: str | None = None
        when: int | None = None
        if r == b"C":
            m = re.match(rb"\s*(\d+)\s+\d+\s+\d+", d)
            dlen = int(m.group(1)) if m else None
            second = next(recs, None)
            if second is None or second[0] != b"T":
                raise Damaged("no arrival time record (T) after the size record (C)")
            when = _num(second[1])
        elif r in (b"S", b"F"):
            when = int(st.st_mtime)
            if r != b"S":
                second = next(recs, None)
                if second is None or second[0] != b"S":
                    raise Damaged("no sender record (S) after the F record")
                d = second[1]
            sender = d.decode("utf-8", "surrogateescape")
        else:
            raise Damaged(f"not a queue file (first record type {r!r})")
        rcpts: list[str] = []
        jumps = 0
        for r, d in recs:
            if r == b"p" and _num(d) > 0:
                jumps += 1
                if jumps > _MAX_JUMPS:
                    raise Damaged("bad pointer record (p)")
                f.seek(_num(d))
            if r == b"R":
                rcpts.append(d.decode("utf-8", "surrogateescape"))
            elif r == b"S":
                sender = d.decode("utf-8", "surrogateescape")
            elif r == b"M":
                if sender is None:
                    raise Damaged("no sender record (S)")
                nxt: tuple[bytes, bytes] | None
                if dlen is not None:
                    f.seek(dlen, os.SEEK_CUR)
                    nxt = next(recs, None)
                else:
                    nxt = next(recs, None)
                    while nxt is not None and nxt[0] in (b"N", b"L", b"p"):
                        if nxt[0] == b"p" and _num(nxt[1]) > 0:
                            f.seek(_num(nxt[1]))
                        nxt = next(recs, None)
                if nxt is None or nxt[0] != b"X":
                    raise Damaged("no extracted-envelope record (X) after the message "
                                  "content (truncated?)")
            elif r == b"E":
                if sender is None:
                    raise Damaged("no sender record (S)")
                if when is None or not rcpts:
                    return None
                return when, sender, rcpts
        raise Damaged("truncated: the file ends before its end record")


def _num(data: bytes) -> int:
    """Perl's numeric value of a string: its leading (signed) integer, else 0."""
    m = re.match(rb"\s*([+-]?\d+)", data)
    return int(m.group(1)) if m else 0


def _files(top: str) -> Any:
    """Every file below ``top`` (File::Find: all subdirectories), with a qshape name."""
    if not os.path.lexists(top):
        return
    for dirpath, _dirs, files in os.walk(top, onerror=_raise):
        for name in files:
            if _NAME.match(name):
                yield os.path.join(dirpath, name)


def _raise(exc: OSError) -> None:
    """os.walk's onerror: an unreadable directory is an error, not an empty queue."""
    if not isinstance(exc, FileNotFoundError):
        raise exc


def _domain(address: str) -> str:
    a = address.lower()
    if a == "":
        return "MAILER-DAEMON"
    a = a[a.rfind("@") + 1:] if "@" in a else a
    a = a.replace("..", ".")
    return _TRIM.sub(r"\1", a, count=1)


def _headings(s: Shape) -> list[str]:
    heads: list[str] = []
    t: int | str = 0
    for i in range(s.buckets + 1):
        heads.append("T" if i == 0 else str(t))
        if i + 1 < s.buckets:
            assert isinstance(t, int)
            t += t if (t and not s.linear) else s.bucket_time
        else:
            t = f"{t}+"
    return heads


def _bucket(s: Shape, when: int, now: int) -> int:
    m = (now - when) / (60 * s.bucket_time)
    if m < 1:
        return 1
    b = int(m + 1) if s.linear else 2 + int(math.log(m) / math.log(2))
    return min(s.buckets, b)


def count(spool: Spool, s: Shape) -> Table:
    """Count the queues named in ``s`` (see module docstring).

    Raises:
        ValueError: an unknown queue name.
    """
    now = int(time.time()) if s.now is None else s.now
    q: dict[str, list[int]] = {}
    sub: dict[str, int] = {}
    nb = s.buckets
    for queue in s.queues:
        if queue not in QUEUE_NAMES:
            raise ValueError(f"unknown queue name {queue!r}")
        for path in _files(spool.queue_path(queue)):
            try:
                found = _qenv(path)
            except Damaged as exc:
                if queue != "corrupt":  # known to be damaged: why they are there
                    sys.stderr.write(f"qmgr-ctl: warning: {queue}/"
                                     f"{os.path.basename(path)}: damaged queue file: "
                                     f"{exc}; skipped\n")
                continue
            if found is None:
                continue
            when, sender, rcpts = found
            b = _bucket(s, when, now)
            for address in ([sender] if s.by_sender else rcpts):
                total = q.setdefault("TOTAL", [0] * (nb + 1))
                total[0] += 1
                total[b] += 1
                a = _domain(address)
                new = False
                while True:
                    row = q.setdefault(a, [0] * (nb + 1))
                    row[0] += 1
                    old = row[0] > 1
                    row[b] += 1
                    if new:
                        sub[a] = sub.get(a, 0) + 1
                    new = not old
                    if not s.parents:
                        break
                    a, n = _PARENT.subn(r".\1", a, count=1)
                    if not n:
                        break
    q.setdefault("TOTAL", [0] * (nb + 1))
    rows = sorted(q.items(), key=lambda kv: (-kv[1][0], len(kv[0]), kv[0]))
    shown = [(d, c) for d, c in rows
             if not d.startswith(".") or sub.get(d, 0) >= s.min_subdomains]
    return Table(_headings(s), shown, now)


def format_table(table: Table, width: int = 80) -> str:
    """The table as qshape prints it (see module docstring)."""
    total = dict(table.rows)["TOTAL"]
    dw = width
    widths: list[int] = []
    for i, head in enumerate(table.headings):
        n = max(len(str(total[i])), len(head))
        n = n + 1 if n > 2 else 3
        widths.append(n)
        dw -= n
    dw = max(dw, 18)

    def line(name: str, cells: list[str]) -> str:
        if len(name) > dw:
            name = (".+" + name[len(name) - dw + 2:]) if name.startswith(".") else (
                "+" + name[len(name) - dw + 1:])
        return name.rjust(dw) + "".join(c.rjust(w) for c, w in zip(cells, widths,
                                                                    strict=True)) + "\n"

    out = [line("", table.headings)]
    out += [line(d, [str(n) for n in c]) for d, c in table.rows]
    return "".join(out)
