"""select — the message selectors of ``qmgr-ctl list`` (and hold, release, delete, requeue).

Summary
    Postfix users pick messages with ``mailq | awk ... | postsuper -d -``; qmgr-ctl takes
    the selection as options. Each option narrows the selection (AND); an option given
    several times matches any of its values (OR):

    ``--queue Q``            the message is in queue Q (maildrop, active, incoming,
                             deferred, hold)
    ``--sender PATTERN``     the envelope sender matches (``<>`` = the null sender)
    ``--recipient PATTERN``  a recipient still to do matches
    ``--domain DOMAIN``      a recipient still to do is in DOMAIN; ``.example.com``
                             means any subdomain of example.com (Postfix's notation)
    ``--older-than AGE``     arrived at least AGE ago
    ``--younger-than AGE``   arrived less than AGE ago
    ``--reason REGEX``       the last entry of the message's defer log (its most recent
                             delay reason) matches REGEX (Python ``re.search``); a
                             message without a defer log never matches

    PATTERNs are shell wildcards (``*``, ``?``, ``[...]``), compared without regard to
    case with the address as stored (``user@example.com``, no angle brackets). AGE is a
    number with an optional Postfix time unit: ``s`` (default), ``m``, ``h``, ``d``,
    ``w``. Domains are checked with qmgrd.qmgr.suspend.valid_key before use.

Public API
    Selector(queues=(), senders=(), recipients=(), domains=(), older_than=None,
             younger_than=None, reason=None, now=time.time())    (dataclass)
        .active -> bool                (some selector is set)
        .match(entry: QueueEntry) -> bool
    parse_age(text) -> int             seconds; ValueError
    parse_domain(text) -> str          lower-cased; ValueError
    domain_matches(domain, key) -> bool
    recipient_domain(address) -> str

Raises ValueError for bad values (the CLI turns them into usage errors); logs nothing.
Loaded before qmgr-ctl's privilege check, so kept light: fnmatch and qmgrd.qmgr.suspend
are imported when a pattern or a domain is given.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmgrd.ctl.showq import QueueEntry

__all__ = ["Selector", "domain_matches", "parse_age", "parse_domain", "recipient_domain"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"(\d{1,10})([smhdw]?)\Z")


def parse_age(text: str) -> int:
    """Seconds in ``text`` (``90``, ``90s``, ``5m``, ``2h``, ``3d``, ``1w``).

    Raises:
        ValueError: not such a duration.
    """
    m = _AGE.match(text.strip().lower())
    if m is None:
        raise ValueError(f"bad time value {text[:40]!r} (use e.g. 30s, 5m, 2h, 1d, 1w)")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_domain(text: str) -> str:
    """A domain (or ``.parent`` domain) given by a user, lower-cased.

    Raises:
        ValueError: not a domain name (path characters, NUL, newline... never pass).
    """
    from qmgrd.qmgr.suspend import valid_key  # json: loaded only for --domain

    key = text.removesuffix(".")  # a fully qualified name
    if not valid_key(key) or key.startswith("["):
        raise ValueError(f"bad domain {text[:60]!r}")
    return key.lower()


def recipient_domain(address: str) -> str:
    """The domain part of ``address``, lower-cased ("" when there is none)."""
    at = address.rfind("@")
    return address[at + 1:].lower().rstrip(".") if at >= 0 else ""


def domain_matches(domain: str, key: str) -> bool:
    """``domain`` is ``key``, or (``key`` starting with a dot) below it."""
    if key.startswith("."):
        return domain.endswith(key)
    return domain == key


def _pattern(text: str) -> re.Pattern[str]:
    import fnmatch

    if text == "<>":
        return re.compile(r"\Z")
    return re.compile(fnmatch.translate(text.lower()), re.DOTALL)


@dataclass
class Selector:
    """A combination of selectors (see module docstring); empty = every message."""

    queues: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    older_than: int | None = None
    younger_than: int | None = None
    reason: str | None = None
    now: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self._senders = [_pattern(p) for p in self.senders]
        self._recipients = [_pattern(p) for p in self.recipients]
        self._domains = [parse_domain(d) for d in self.domains]
        try:
            self._reason = re.compile(self.reason) if self.reason is not None else None
        except re.error as exc:
            raise ValueError(f"bad regular expression {self.reason!r}: {exc}") from None

    @property
    def active(self) -> bool:
        """True when some selector is set."""
        return bool(self.queues or self.senders or self.recipients or self.domains
                    or self.older_than is not None or self.younger_than is not None
                    or self.reason is not None)

    def match(self, entry: QueueEntry) -> bool:
        """True when ``entry`` passes every selector."""
        if self.queues and entry.queue_name not in self.queues:
            return False
        age = self.now - entry.arrival_time
        if self.older_than is not None and age < self.older_than:
            return False
        if self.younger_than is not None and age >= self.younger_than:
            return False
        if self._senders:
            sender = entry.raw_sender.lower()
            if not any(p.match(sender) for p in self._senders):
                return False
        if self._recipients:
            rcpts = [r.lower() for r in entry.raw_recipients]
            if not any(p.match(r) for p in self._recipients for r in rcpts):
                return False
        if self._domains:
            doms = {recipient_domain(r) for r in entry.raw_recipients}
            if not any(domain_matches(d, k) for k in self._domains for d in doms):
                return False
        return self._reason is None or (
            bool(entry.last_reason) and self._reason.search(entry.last_reason) is not None)
