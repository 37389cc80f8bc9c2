"""smtp_cache — the smtp agent's in-process SMTP connection cache (Postfix connection reuse).

Summary
    Postfix's smtp(8) saves a session after a successful transaction in scache(8), under
    the logical destination (the nexthop) and under the server address, and a later
    delivery takes it from there instead of connecting, reading the greeting and saying
    EHLO again (postfix.md; CONNECTION_CACHE_README). qmgrd has no scache service: each smtp
    process keeps its own cache, shared by the deliveries it carries at once
    (``smtp_process_delivery_limit``) and between them. A session is taken out of the
    cache before anything is awaited, so two deliveries never share one.

    * ``store(sess, dest, endpoint)`` keeps a session whose last transaction ended
      cleanly, unless it is dead, was opened ``smtp_connection_reuse_time_limit``
      seconds ago or more, or was reused ``smtp_connection_reuse_count_limit`` times
      already (0 = no limit; with a limit of N a connection carries up to N + 1
      transactions, as in Postfix). ``dest`` is None for a session that must only be
      found by its address (Postfix stores under the domain only sessions with the best
      MX host). At most ``max_sessions`` are kept; the oldest is closed first (its
      QUIT in the background: store() does not wait for it).
    * ``take_dest(dest)`` / ``take_endpoint(endpoint)`` hand out the most recently
      stored matching session after SmtpSession.usable() (not closed by the peer, RSET
      answered 250) and count the reuse; a session that fails the check, or whose idle
      time ran out, is closed and the next one tried — silently, never as a delivery
      failure.
    * ``expire()`` sends QUIT to sessions idle for ``smtp_connection_cache_time_limit``
      seconds and returns the seconds until the next one is due; ``close_all()`` sends
      QUIT to all (the agent exits). QUIT waits at most ``quit_timeout`` seconds.

    Keys: ``dest_key(nexthop, policy)`` and ``endpoint_key(addr, policy)``; ``policy`` is
    everything that must match for a session to be shared (HELO name, TLS level), so a
    session is never reused across different policies. A session records whether it is
    TLS-encrypted (``sess.tls``); ``take_*(..., tls=True)`` hands out only encrypted
    ones, for a request whose level requires TLS.

    ``CacheDestinations(patterns)`` is smtp_connection_cache_destinations: the nexthop
    host (without [] and port) matched case-insensitively against names, the names of a
    ``/file/name``, or the keys of a ``type:table`` (qmgrd.maps).

Public API
    ConnCache(idle_limit, reuse_time_limit, reuse_count_limit, *, max_sessions=8,
              quit_timeout=2.0, clock=time.monotonic)      coroutines:
        .store(sess, dest, endpoint) -> bool    False: not kept (the caller QUITs it)
        .take_dest(dest, *, tls=False) -> SmtpSession | None
        .take_endpoint(endpoint, *, tls=False) -> SmtpSession | None
        .expire() -> float | None               seconds until the next expiry
        .close_all() -> None                    QUIT to all at once
        .evicted() -> None                      the QUITs of evicted sessions done
    len(cache)
    dest_key(nexthop, policy) -> tuple; endpoint_key(addr, policy) -> tuple
    CacheDestinations(patterns: list[str])      .match(nexthop) -> bool; TableError
Logs nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from qmgrd.maps import Table, open_table
from transports.smtp_dns import Address
from transports.smtp_session import SmtpSession

__all__ = ["CacheDestinations", "ConnCache", "dest_key", "endpoint_key"]

Key = tuple[str, ...]


def dest_key(nexthop: str, policy: tuple[str, ...]) -> Key:
    """The logical-destination key of ``nexthop`` (case-folded) under ``policy``."""
    return ("dest", nexthop.strip().lower(), *policy)


def endpoint_key(addr: Address, policy: tuple[str, ...]) -> Key:
    """The server-address key of ``addr`` (IP and port) under ``policy``."""
    return ("addr", addr.ip, str(addr.port), *policy)


@dataclass
class _Entry:
    sess: SmtpSession
    dest: Key | None
    endpoint: Key
    expires: float


class ConnCache:
    """Cached idle SMTP sessions of one agent process (see the module docstring)."""

    def __init__(self, idle_limit: float, reuse_time_limit: float, reuse_count_limit: int,
                 *, max_sessions: int = 8, quit_timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_limit = idle_limit
        self.reuse_time_limit = reuse_time_limit
        self.reuse_count_limit = reuse_count_limit
        self.max_sessions = max_sessions
        self.quit_timeout = quit_timeout
        self.clock = clock
        self._entries: list[_Entry] = []
        self._soonest = math.inf  # no entry expires before this (monotonic clock)
        self._evicting: set[asyncio.Task[None]] = set()  # QUITs of evicted sessions

    def __len__(self) -> int:
        return len(self._entries)

    async def store(self, sess: SmtpSession, dest: Key | None, endpoint: Key) -> bool:
        """Keep ``sess`` for reuse; False when it may not be kept (dead, too old, used
        too often, or caching is off): the caller closes it."""
        now = self.clock()
        if self.idle_limit <= 0 or self.max_sessions <= 0:
            return False
        if sess.dead or sess.sock is None:
            return False
        if self.reuse_time_limit > 0 and now - sess.created >= self.reuse_time_limit:
            return False
        if self.reuse_count_limit > 0 and sess.reuse_count >= self.reuse_count_limit:
            return False
        while len(self._entries) >= self.max_sessions:
            # QUIT in the background: the caller has a delivery whose outcome is not
            # recorded yet, and it must not wait for another server's 221
            task = asyncio.get_running_loop().create_task(self._quit(self._entries.pop(0)))
            self._evicting.add(task)
            task.add_done_callback(self._evicting.discard)
        self._entries.append(_Entry(sess, dest, endpoint, now + self.idle_limit))
        self._soonest = min(self._soonest, now + self.idle_limit)
        return True

    async def take_dest(self, dest: Key, *, tls: bool = False) -> SmtpSession | None:
        """A checked session stored under logical destination ``dest``, or None;
        ``tls``: only a TLS-encrypted one (the request's level requires TLS)."""
        if tls:
            return await self._take(lambda e: e.dest == dest and e.sess.tls is not None)
        return await self._take(lambda e: e.dest == dest)

    async def take_endpoint(self, endpoint: Key, *, tls: bool = False) -> SmtpSession | None:
        """A checked session with server address ``endpoint``, or None; ``tls``: only a
        TLS-encrypted one."""
        if tls:
            return await self._take(lambda e: e.endpoint == endpoint
                                    and e.sess.tls is not None)
        return await self._take(lambda e: e.endpoint == endpoint)

    async def _take(self, match: Callable[[_Entry], bool]) -> SmtpSession | None:
        # an entry is taken out of the list before anything is awaited: concurrent
        # deliveries of the process never get the same session
        if self.clock() >= self._soonest:  # (else nothing is due: no pass over the list)
            await self.expire()
        while True:
            for i in range(len(self._entries) - 1, -1, -1):
                if match(self._entries[i]):
                    entry = self._entries.pop(i)
                    break
            else:
                return None
            sess = entry.sess
            if await sess.usable():
                sess.reuse_count += 1
                return sess

    async def expire(self) -> float | None:
        """QUIT the sessions whose idle time is over; the seconds until the next one is
        due (None: the cache is empty)."""
        now = self.clock()
        keep: list[_Entry] = []
        gone: list[_Entry] = []
        for entry in self._entries:
            (gone if now >= entry.expires else keep).append(entry)
        self._entries = keep
        self._soonest = min((e.expires for e in keep), default=math.inf)
        if gone:  # meanwhile other deliveries may store sessions: read the list again
            await asyncio.gather(*(self._quit(entry) for entry in gone))
        if not self._entries:
            return None
        return max(0.0, min(e.expires for e in self._entries) - now)

    async def evicted(self) -> None:
        """Wait for the QUITs of the sessions evicted by store() (each bounded by the
        QUIT timeout)."""
        await asyncio.gather(*self._evicting)

    async def close_all(self) -> None:
        """QUIT every cached session, all at once (the agent is about to exit)."""
        entries, self._entries = self._entries, []
        self._soonest = math.inf
        await asyncio.gather(*(self._quit(entry) for entry in entries), *self._evicting)

    async def _quit(self, entry: _Entry) -> None:
        await entry.sess.quit(min(self.quit_timeout, entry.sess.params.quit_timeout))


class CacheDestinations:
    """smtp_connection_cache_destinations: nexthops that always use the cache."""

    def __init__(self, patterns: list[str]) -> None:
        """``patterns``: names, ``/file/name`` or ``type:table`` entries.

        Raises:
            TableError: a table that cannot be opened.
            OSError: a /file/name that cannot be read.
        """
        self.names: set[str] = set()
        self.tables: list[Table] = []
        for pat in patterns:
            if pat.startswith("/"):
                with open(pat, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        words = line.split("#", 1)[0].replace(",", " ").split()
                        self.names.update(w.lower() for w in words)
            elif ":" in pat and not pat.startswith("["):
                self.tables.append(open_table(pat))
            else:
                self.names.add(pat.lower())

    def __bool__(self) -> bool:
        return bool(self.names or self.tables)

    def match(self, nexthop: str) -> bool:
        """True when the host of ``nexthop`` (``[host]:port`` -> ``host``) is listed."""
        host = nexthop.strip()
        if host.startswith("["):
            host = host[1:].partition("]")[0]
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        host = host.lower()
        if not host:
            return False
        if host in self.names:
            return True
        return any(t.lookup(host) is not None for t in self.tables)
