"""statuslog — per-message bounce/, defer/ and trace/ logs in Postfix's format.

Summary
    One file per message and log kind, named by the queue id (``defer`` is hashed by
    default). Each entry is written as Postfix's bounce service does (postfix.md §5.5,
    with ``backwards_bounce_logfile_compatibility = yes``): a blank line, the old-style
    ``<recipient>: reason`` line, then ``name=value`` lines, then a blank line::

        <bob@example.net>: host mx.example.net[192.0.2.1] said: 450 4.2.0 try later
        recipient=bob@example.net
        original_recipient=alias@example.net
        offset=254
        dsn_orig_rcpt=rfc822;bob@example.net
        notify_flags=8
        status=4.2.0
        action=delayed
        diag_type=smtp
        diag_text=450 4.2.0 try later
        mta_type=dns
        mta_mname=mx.example.net
        reason=host mx.example.net[192.0.2.1] said: 450 4.2.0 try later

    ``recipient=`` always (``<>`` for the empty address, the local part quoted as RFC 822
    requires); ``original_recipient=`` only when non-empty and different (ignoring case);
    ``offset=`` when > 0; ``dsn_orig_rcpt=`` when non-empty; ``notify_flags=`` when non-zero;
    ``status=``/``action=``/``reason=`` when non-empty; ``diag_type``+``diag_text`` and
    ``mta_type``+``mta_mname`` only as pairs. Control characters in values become ``?``
    (Postfix printable()).

    Appends happen under an exclusive flock, then fflush + fsync; when any step fails
    the file is truncated back to its old length and the OSError propagates.  Logs are
    opened with O_NOFOLLOW: a symbolic link under a queue id's name is never written or
    read through (OSError ELOOP, as for any unwritable log).

Public API
    LOGS = ("bounce", "defer", "trace")
    Dsn(status, action, reason, diag_type="", diag_text="", mta_type="", mta_mname="")
    append(spool, log, qid, rcpt, dsn) -> None          OSError, ValueError
    append_many(spool, log, qid, entries) -> None       the same for a list of
                                (Recipient, Dsn): one lock, one write, one fsync
    format_entry(rcpt, dsn) -> bytes
    read(spool, log, qid) -> list[tuple[Recipient, Dsn]]   [] when there is no log
    read_existing(spool, log, qid) -> list[tuple[Recipient, Dsn]] | None   None then
    parse(data, name="") -> list[tuple[Recipient, Dsn]]
    remove(spool, log, qid) -> bool
    quote_822_local(address) -> str
    unquote_822_local(address) -> str   the inverse: external (quoted) -> internal form

``read``/``parse`` return addresses (``recipient=``, ``original_recipient=``) as logged,
i.e. in the quoted external form; a consumer that quotes again (a notice, postfix.md
§5.6) must first turn them back into the internal form with ``unquote_822_local``.

``read`` is tolerant: entries without ``recipient=`` and lines that are not
``name=value`` are skipped with a warning via master.log.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from master import log
from qmgrd.spool.envelope import Recipient
from qmgrd.spool.queue import Spool

__all__ = [
    "LOGS",
    "Dsn",
    "append",
    "append_many",
    "format_entry",
    "parse",
    "quote_822_local",
    "read",
    "read_existing",
    "remove",
    "unquote_822_local",
]

LOGS = ("bounce", "defer", "trace")
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
# an ASCII dot-atom: quote_822_local's common case in one C-level match (its loop is the
# general rule; the qmgr and the agents quote every sender and recipient they log)
_ATOM = "[" + re.escape("".join(sorted(_ATEXT))) + "]+"
_DOT_ATOM = re.compile(f"{_ATOM}(?:\\.{_ATOM})*")


@dataclass
class Dsn:
    """Delivery status of one recipient (RFC 3464 fields as Postfix keeps them).

    Attributes:
        status: enhanced status code, e.g. "4.2.0".
        action: "failed", "delayed", "delivered", "relayed", "expanded", ...
        reason: human-readable text.
        diag_type, diag_text: e.g. "smtp", "450 4.2.0 try later" (a pair).
        mta_type, mta_mname: e.g. "dns", "mx.example.net" (a pair).
    """

    status: str
    action: str
    reason: str
    diag_type: str = ""
    diag_text: str = ""
    mta_type: str = ""
    mta_mname: str = ""


def quote_822_local(address: str) -> str:
    """Quote the local part of ``address`` when RFC 822 requires it (Postfix
    quote_822_local): a local part that is not a dot-atom is wrapped in double quotes
    with ``"`` and ``\\`` escaped. Non-ASCII (SMTPUTF8) characters count as atext."""
    at = address.rfind("@")
    local, domain = (address[:at], address[at:]) if at >= 0 else (address, "")
    if not local or _DOT_ATOM.fullmatch(local):
        return address
    ok = not local.startswith(".") and not local.endswith(".") and ".." not in local
    if ok:
        for ch in local:
            if ch != "." and ch not in _ATEXT and ord(ch) < 128:
                ok = False
                break
    if ok:
        return address
    esc = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{esc}"{domain}'


def unquote_822_local(address: str) -> str:
    """The internal form of an address quoted by :func:`quote_822_local` (its exact
    inverse): a local part wrapped in double quotes loses them and its ``\\``
    escapes are resolved (``"a\\"b"@h`` -> ``a"b@h``); anything else is returned
    unchanged."""
    at = address.rfind("@")
    local, domain = (address[:at], address[at:]) if at >= 0 else (address, "")
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return address
    out: list[str] = []
    i, inner = 0, local[1:-1]
    while i < len(inner):
        if inner[i] == "\\" and i + 1 < len(inner):
            i += 1
        out.append(inner[i])
        i += 1
    return "".join(out) + domain


_CTRL = {c: "?" for c in [*range(32), 127]}


def _clean(value: str) -> str:
    """Postfix printable(value, '?'): control characters become '?'."""
    return value.translate(_CTRL)


def format_entry(rcpt: Recipient, dsn: Dsn) -> bytes:
    """One log entry (bytes, UTF-8) in Postfix's format, leading and trailing blank line."""
    addr = _clean(quote_822_local(rcpt.address)) if rcpt.address else ""
    lines = ["", f"<{addr}>: {_clean(dsn.reason)}", f"recipient={addr or '<>'}"]
    if rcpt.orig_rcpt and rcpt.orig_rcpt.lower() != rcpt.address.lower():
        lines.append(f"original_recipient={_clean(quote_822_local(rcpt.orig_rcpt))}")
    if rcpt.offset > 0:
        lines.append(f"offset={rcpt.offset}")
    if rcpt.dsn_orcpt:
        lines.append(f"dsn_orig_rcpt={_clean(rcpt.dsn_orcpt)}")
    if rcpt.notify:
        lines.append(f"notify_flags={rcpt.notify}")
    if dsn.status:
        lines.append(f"status={_clean(dsn.status)}")
    if dsn.action:
        lines.append(f"action={_clean(dsn.action)}")
    if dsn.diag_type and dsn.diag_text:
        lines.append(f"diag_type={_clean(dsn.diag_type)}")
        lines.append(f"diag_text={_clean(dsn.diag_text)}")
    if dsn.mta_type and dsn.mta_mname:
        lines.append(f"mta_type={_clean(dsn.mta_type)}")
        lines.append(f"mta_mname={_clean(dsn.mta_mname)}")
    if dsn.reason:
        lines.append(f"reason={_clean(dsn.reason)}")
    lines.append("")
    lines.append("")
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def _path(spool: Spool, log_name: str, qid: str) -> str:
    if log_name not in LOGS:
        raise ValueError(f"unknown status log: {log_name!r}")
    return spool.path(log_name, qid)


def _make_hash_dirs(spool: Spool, log_name: str, directory: str) -> None:
    """Create missing hash directories; as root, owned like the log's queue directory."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.geteuid() != 0:
        return
    top_path = spool.queue_path(log_name)
    top = os.stat(top_path)
    d = directory
    while len(d) > len(top_path) and d.startswith(top_path):
        st = os.stat(d)
        if (st.st_uid, st.st_gid) != (top.st_uid, top.st_gid):
            os.chown(d, top.st_uid, top.st_gid)
        d = os.path.dirname(d)


def append(spool: Spool, log_name: str, qid: str, rcpt: Recipient, dsn: Dsn) -> None:
    """Append one entry to ``<log_name>/<qid>`` under an exclusive lock, then fsync.

    Args:
        spool: the queue directory.
        log_name: "bounce", "defer" or "trace".
        qid: the message's queue id (validated).
        rcpt: the recipient (address, orig_rcpt, offset, dsn_orcpt, notify are logged).
        dsn: the delivery status.

    Raises:
        ValueError: unknown log name or invalid id.
        OSError: the append failed; the file was truncated back to its old length.
    """
    append_many(spool, log_name, qid, [(rcpt, dsn)])


def append_many(spool: Spool, log_name: str, qid: str,
                entries: Sequence[tuple[Recipient, Dsn]]) -> None:
    """Append several entries to ``<log_name>/<qid>`` at once: one lock, one write and
    one fsync for all (a delivery agent's whole request). Nothing is done for no entries.

    Raises:
        ValueError: unknown log name or invalid id.
        OSError: the append failed; the file was truncated back to its old length (no
            entry of the batch is left in it).
    """
    path = _path(spool, log_name, qid)
    if not entries:
        return
    data = b"".join(format_entry(rcpt, dsn) for rcpt, dsn in entries)
    # O_NOFOLLOW: a symbolic link under a queue id's name is never written through
    # (the local agent appends as root)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        _make_hash_dirs(spool, log_name, os.path.dirname(path))
        fd = os.open(path, flags, 0o600)
    try:
        if os.geteuid() == 0:
            # A root agent (local) writes here too: the log must stay readable by the
            # mail_owner processes (qmgr, bounce), so it gets the queue's owner.
            top = os.stat(spool.queue_path(log_name))
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (top.st_uid, top.st_gid):
                os.fchown(fd, top.st_uid, top.st_gid)
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def remove(spool: Spool, log_name: str, qid: str) -> bool:
    """Remove a status log; False when there was none.

    Raises:
        ValueError: unknown log name or invalid id.
        OSError: any error other than "no such file".
    """
    try:
        os.unlink(_path(spool, log_name, qid))
    except FileNotFoundError:
        return False
    return True


def read(spool: Spool, log_name: str, qid: str) -> list[tuple[Recipient, Dsn]]:
    """All entries of ``<log_name>/<qid>`` in file order ([] when there is no log).

    Takes a shared lock while reading. Garbage is skipped with a warning.

    Raises:
        ValueError: unknown log name or invalid id.
        OSError: the log exists but cannot be read.
    """
    return read_existing(spool, log_name, qid) or []


def read_existing(spool: Spool, log_name: str,
                  qid: str) -> list[tuple[Recipient, Dsn]] | None:
    """As :func:`read`, but None when there is no log: the bounce service tells a
    missing log (a notice saying the report is unavailable) from an empty one (no
    notice), as Postfix's bounce_mail_init() does.

    Raises:
        As :func:`read`.
    """
    path = _path(spool, log_name, qid)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # never a link
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        fcntl.flock(fd, fcntl.LOCK_SH)
        data = f.read()
    return parse(data, f"{log_name}/{qid}")


_INT_FIELDS = ("offset", "notify_flags")


def _entry(fields: dict[str, str], name: str, lineno: int) -> tuple[Recipient, Dsn] | None:
    if "recipient" not in fields:
        log.warning(f"{name}: line {lineno}: log entry without recipient: skipped")
        return None
    ints: dict[str, int] = {}
    for key in _INT_FIELDS:
        try:
            ints[key] = int(fields.get(key, "0"))
        except ValueError:
            log.warning(f"{name}: line {lineno}: bad {key} value: entry skipped")
            return None
    addr = fields["recipient"]
    if addr == "<>":
        addr = ""
    rcpt = Recipient(addr, fields.get("original_recipient", ""),
                     fields.get("dsn_orig_rcpt", ""), ints["notify_flags"], ints["offset"])
    dsn = Dsn(fields.get("status", ""), fields.get("action", ""), fields.get("reason", ""),
              fields.get("diag_type", ""), fields.get("diag_text", ""),
              fields.get("mta_type", ""), fields.get("mta_mname", ""))
    return rcpt, dsn


def parse(data: bytes, name: str = "") -> list[tuple[Recipient, Dsn]]:
    """Parse status-log bytes into (Recipient, Dsn) pairs, skipping garbage with a warning.

    Entries are separated by blank lines; ``<rcpt>: reason`` lines are ignored (the
    attributes carry the same data); unknown attribute names are ignored.
    """
    out: list[tuple[Recipient, Dsn]] = []
    fields: dict[str, str] = {}
    start = 0
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            if fields:
                ent = _entry(fields, name, start)
                if ent is not None:
                    out.append(ent)
                fields = {}
            continue
        if line.startswith("<") and not fields:
            continue  # old-style "<rcpt>: reason" line
        key, sep, value = line.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            log.warning(f"{name}: line {lineno}: malformed log line: skipped")
            continue
        if not fields:
            start = lineno
        fields[key] = value
    if fields:
        ent = _entry(fields, name, start)
        if ent is not None:
            out.append(ent)
    return out
