"""suspend — operator suspensions of one destination (``qmgr-ctl suspend`` / ``resume``).

Summary
    Postfix can only defer a whole transport (``defer_transports``); qmgrd lets the
    operator pause delivery to one destination at run time. A suspension names a
    *domain key*:

    * ``example.com`` — recipients whose domain is ``example.com``, and mail whose
      nexthop host is ``example.com``;
    * ``.example.com`` — recipients in any subdomain of ``example.com`` (Postfix's
      parent-domain notation), and nexthops below it;
    * ``[192.0.2.1]`` or ``[192.0.2.1]:2525`` — mail whose nexthop is that address
      (with that port, when given).

    While a suspension holds, the qmgr defers matching recipients *without a delivery
    attempt* (``4.3.2 delivery to <key> suspended by the administrator[ until
    20240501T143000+0200][: reason]``: Suspension.text), so no connection is made;
    other mail flows on. When a suspension has an end time the
    message's retry time (the deferred file's mtime) is brought forward to that end,
    and the qmgr scans the deferred queue when it passes: the mail goes out by itself.

    The suspensions live in one JSON file, ``<queue_directory>/private/qmgr-suspend``
    (mail_owner, 0600), so that they survive a qmgr restart: the qmgr reads it at start
    and whenever ``qmgr-ctl`` tells it over ``private/qmgr-control``
    (qmgrd.qmgr.control). Only qmgr-ctl writes it (atomically, under an flock of
    ``qmgr-suspend.lock``); expired entries are dropped on each write and ignored on
    each read. Format::

        {"version": 1, "suspensions": [{"domain": "example.com", "until": 1700000060.0,
          "reason": "maintenance", "since": 1700000000.0}]}      (until 0 = no end)

Public API
    SUSPEND_FILE = "qmgr-suspend" (in private/)
    suspend_path(queue_directory) -> str
    valid_key(key) -> bool                 the syntax above, at most 255 characters
    Suspension(domain, until, reason, since)   (frozen dataclass; .text: the DSN text)
    load(path, now) -> list[Suspension]    [] when missing; ValueError ("<path>: damaged:
                                           ...") for a broken file
    update(path, change, now, on_damaged=None) -> list[Suspension]   read-modify-write
        under the lock; ``change(list) -> list``; OSError / ValueError (a damaged file
        with ``on_damaged``: reported once through it, kept as .damaged, replaced)
    Suspensions()                          the qmgr's in-memory set
        .replace(items, now) -> (added, removed)     lists of Suspension
        .match(address, nexthop) -> Suspension | None
        .expire(now) -> list[Suspension]   forget (and return) those past their end
        .describe() -> list[dict]          for the status document
        len(), bool()

Logs nothing; callers log.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["SUSPEND_FILE", "Suspension", "Suspensions", "load", "suspend_path", "update",
           "valid_key"]

SUSPEND_FILE = "qmgr-suspend"
MAX_REASON = 200
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_KEY = re.compile(
    rf"(?:\.?{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\](?::[0-9]{{1,5}})?)\Z")
_MAX_FILE = 1 << 20


def suspend_path(queue_directory: str) -> str:
    """The suspension file of a queue directory."""
    return os.path.join(queue_directory, "private", SUSPEND_FILE)


def valid_key(key: str) -> bool:
    """True for a domain, ``.parent`` domain or ``[address][:port]`` (see module doc)."""
    return isinstance(key, str) and 0 < len(key) <= 255 and _KEY.match(key) is not None


@dataclass(frozen=True)
class Suspension:
    """One suspended destination. ``until`` 0 = until resumed; times in epoch seconds."""

    domain: str
    until: float = 0.0
    reason: str = ""
    since: float = 0.0

    @property
    def text(self) -> str:
        """The reason given to deferred recipients (the defer log, the maillog's
        ``status=deferred (...)`` and the delay notice): ``delivery to <key> suspended
        by the administrator[ until <end>][: <reason>]``, the end in local time as an
        ISO 8601 basic time (``20240501T143000+0200``).

        No ``:`` but the one before the operator's reason, as in Postfix's own reasons
        (``<context>: <detail>``): pflogsumm shortens a long reason in its "message
        deferral detail" by cutting it after each ``:`` in turn, and the colons of
        ``14:30:00`` left ``30:00: maintenance`` there."""
        text = f"delivery to {self.domain} suspended by the administrator"
        if self.until:
            text += time.strftime(" until %Y%m%dT%H%M%S%z", time.localtime(self.until))
        return f"{text}: {self.reason}" if self.reason else text

    def as_dict(self) -> dict[str, Any]:
        """JSON form (the file and the status document)."""
        return {"domain": self.domain, "until": self.until, "reason": self.reason,
                "since": self.since}


def _clean_reason(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:MAX_REASON]


def _parse(doc: object, now: float) -> list[Suspension]:
    if not isinstance(doc, dict) or not isinstance(doc.get("suspensions"), list):
        raise TypeError("not a suspension file")
    out: list[Suspension] = []
    for item in doc["suspensions"]:
        if not isinstance(item, dict):
            raise TypeError("bad suspension entry")
        key = item.get("domain")
        until = item.get("until", 0)
        since = item.get("since", 0)
        reason = item.get("reason", "")
        if (not isinstance(key, str) or not valid_key(key)
                or not isinstance(until, int | float) or not isinstance(since, int | float)
                or not isinstance(reason, str)):
            raise ValueError(f"bad suspension entry {str(item)[:80]!r}")
        if until and until <= now:
            continue
        out.append(Suspension(key.lower(), float(until), _clean_reason(reason), float(since)))
    return out


def load(path: str, now: float) -> list[Suspension]:
    """The suspensions in force at ``now`` from ``path`` ([] when there is no file).

    Raises:
        OSError: the file exists but cannot be read.
        ValueError: it is not a suspension file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        return []
    if len(data) > _MAX_FILE:
        raise ValueError(f"{path}: file too large")
    try:
        doc = json.loads(data.decode("utf-8") if data else '{"suspensions": []}')
    except UnicodeDecodeError:
        raise ValueError(f"{path}: damaged: not UTF-8 text") from None
    except ValueError as exc:
        raise ValueError(f"{path}: damaged: not JSON ({exc})") from None
    try:
        return _parse(doc, now)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: damaged: {exc}") from None


def update(path: str, change: Callable[[list[Suspension]], list[Suspension]],
           now: float, on_damaged: Callable[[str], None] | None = None) -> list[Suspension]:
    """Apply ``change`` to the file's suspensions under its lock; returns the new list.

    The file is replaced atomically (temporary file, fsync, rename), mode 0600. A
    damaged old file (junk bytes, not JSON, bad entries) is reported once through
    ``on_damaged(text)`` (text names the file), kept as ``<path>.damaged`` and replaced:
    its suspensions are lost, ``change`` gets [].

    Raises:
        OSError: cannot lock, read or write (a failed write, e.g. ENOSPC, leaves the old
        file and no temporary file, and names ``path`` as its filename); ValueError: the
        old file is broken and no ``on_damaged`` was given.
    """
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            old = load(path, now)
        except ValueError as exc:
            if on_damaged is None:
                raise
            with contextlib.suppress(OSError):
                os.replace(path, path + ".damaged")
            on_damaged(f"{exc}; its suspensions are dropped and the file is replaced "
                       f"(old copy: {path}.damaged)")
            old = []
        items = change(old)
        doc = {"version": 1, "suspensions": [s.as_dict() for s in items]}
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                data = json.dumps(doc, indent=1).encode() + b"\n"
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:  # e.g. a full disk: no temporary file is left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        return items
    finally:
        os.close(lock_fd)


def _nexthop_host(nexthop: str) -> tuple[str, str]:
    """(host without brackets, the nexthop lower-cased) of ``[host]:port`` / ``host:port``."""
    hop = nexthop.lower()
    if hop.startswith("["):
        return hop[1:].partition("]")[0], hop
    return hop.rpartition(":")[0] if hop.count(":") == 1 else hop, hop


class Suspensions:
    """The suspensions the qmgr enforces (see module docstring)."""

    def __init__(self) -> None:
        self.items: dict[str, Suspension] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def replace(self, items: list[Suspension], now: float
                ) -> tuple[list[Suspension], list[Suspension]]:
        """Make ``items`` (those not expired at ``now``) the set; (added, removed)."""
        new = {s.domain: s for s in items if not s.until or s.until > now}
        added = [s for k, s in new.items() if self.items.get(k) != s]
        removed = [s for k, s in self.items.items() if k not in new]
        self.items = new
        return added, removed

    def expire(self, now: float) -> list[Suspension]:
        """Forget and return the suspensions whose end has passed."""
        gone = [s for s in self.items.values() if s.until and s.until <= now]
        for s in gone:
            del self.items[s.domain]
        return gone

    def match(self, address: str, nexthop: str) -> Suspension | None:
        """The suspension that covers a recipient ``address`` routed to ``nexthop``."""
        items = self.items
        if not items:
            return None
        domain = address.rpartition("@")[2].lower().rstrip(".")
        host, hop = _nexthop_host(nexthop)
        for name in (domain, host, hop):
            hit = items.get(name)
            if hit is not None:
                return hit
        for name in (domain, host):
            dot = name.find(".")
            while dot >= 0:
                hit = items.get(name[dot:])
                if hit is not None:
                    return hit
                dot = name.find(".", dot + 1)
        return None

    def describe(self) -> list[dict[str, Any]]:
        """The suspensions as plain data, sorted by domain."""
        return [self.items[k].as_dict() for k in sorted(self.items)]
