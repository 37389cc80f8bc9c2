"""scan — a restartable walk over one queue directory (qmgr_scan).

Summary
    The qmgr has two scans, ``incoming`` and ``deferred`` (postfix.md §4.1, §4.2). A scan
    hands out one queue id at a time, so that feeding the active queue interleaves with
    delivery. Requests follow Postfix's qmgr_scan_request:

    * a *start* request starts the scan when none runs; while one runs it only sets a
      flag, and the scan restarts once when it ends (so files added meanwhile are found).
      A flood of requests therefore costs nothing but that flag: scans never restart
      more often than they finish;
    * the modifiers ``scan_all`` (trigger ``A``: ignore file time stamps) and ``flush``
      (trigger ``F``: ignore ``defer_transports``) apply to the scan in progress and are
      kept for the next scan that starts; a modifier alone starts nothing.

    A scan knows no clock: the scheduler rate-limits ``scan_all`` requests for the
    deferred queue (at most one per second, later ones coalesced and applied when the
    second is up - qmgrd.qmgr.scheduler, FORCED_SCAN_INTERVAL), because triggers come
    from any local user and each ignore-time scan retries every deferred message.

    Each id comes with the path where the walk found it (``path``): a file left in the
    hash directory of earlier ``hash_queue_depth``/``hash_queue_names`` settings (an old
    qmgr still draining after a reload moved it there) is found by the walk, which
    descends into every one-character directory, and is taken from where it is, not
    from where the current settings would put it.

Public API
    Scan(name, lister)              lister: Callable[[], Iterator[tuple[str, str]]]
                                    yielding (qid, path) (e.g. Spool.scan_paths)
    .request(start=True, scan_all=False, flush=False)
    .next() -> str | None           the next id, or None when idle
    .path -> str                    where the id next() returned was found
    .scan_all, .flush -> bool       modifiers in force for the current scan
    .busy -> bool; .restart_pending -> bool
    .close()                        abandon the scan in progress
    BogusEntries(queue_directory)   one warning per bogus queue entry (below)
        .walk(lister) -> Iterator       ``lister(bogus)``'s ids, bogus entries warned about
    scan_failed(exc, queue_directory) -> NoReturn
                                    a queue directory that cannot be read: one line,
                                    ``fatal: scan_dir_push: open directory <dir>: <error>``
                                    (Postfix's scan_dir_push; <dir> relative to the queue
                                    directory, as Postfix's daemons, which chdir there),
                                    exit 1 - no traceback; the qmgr checks its queue
                                    directories before it reads a trigger, so the master
                                    throttles a qmgr that dies of this

Bogus entries
    An entry of incoming/ or deferred/ named as a queue id that is no queue file - a
    symbolic link, directory, FIFO ... - is skipped (never followed, moved or removed:
    it may be an operator's) with Postfix's mail_open_ok warning, ``warning:
    incoming/<name>: uid <uid>: not a regular file``. Names that are no queue id
    (cleanup's temporary files, an operator's notes) are skipped silently, as Postfix's
    scan skips them. Postfix repeats the warning at every scan;
    an incoming scan runs at every message, so qmgrd warns once per entry (its path,
    inode and type) and then stays quiet while it is there; an entry that a complete
    scan no longer finds is forgotten (one made again is warned about again). Memory:
    one key per bogus entry present.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import NoReturn

from master import log

__all__ = ["BogusEntries", "Scan", "scan_failed"]


def scan_failed(exc: OSError, queue_directory: str) -> NoReturn:
    """Log Postfix's one fatal line for a queue directory that cannot be read, exit 1."""
    path = os.fsdecode(exc.filename) if exc.filename is not None else "?"
    if os.path.isabs(path):
        path = os.path.relpath(path, queue_directory)
    log.fatal(f"scan_dir_push: open directory {path}: {exc.strerror or exc}")


_Key = tuple[str, int, bool, bool]  # path, inode, directory?, symbolic link?


class BogusEntries:
    """Warn once about each bogus entry of a queue (module docstring)."""

    def __init__(self, queue_directory: str) -> None:
        self.queue_directory = queue_directory
        self.warned: set[_Key] = set()

    def walk(self, lister: Callable[[Callable[[os.DirEntry[str], str], None]],
                                    Iterator[tuple[str, str]]]) -> Iterator[tuple[str, str]]:
        """The (qid, path) pairs of ``lister(bogus)`` (Spool.scan_paths with ``bogus``),
        warning about each bogus entry not warned about before; at the end of a
        complete walk, the entries it did not find are forgotten."""
        seen: set[_Key] = set()

        def bogus(entry: os.DirEntry[str], why: str) -> None:
            try:
                key = (entry.path, entry.inode(), entry.is_dir(follow_symlinks=False),
                       entry.is_symlink())
            except OSError:  # gone meanwhile
                return
            seen.add(key)
            if key in self.warned:
                return
            self.warned.add(key)
            try:
                uid: int | str = entry.stat(follow_symlinks=False).st_uid
            except OSError:
                uid = "?"
            path = entry.path
            if os.path.isabs(path):
                path = os.path.relpath(path, self.queue_directory)
            log.warning(f"{path}: uid {uid}: {why}")

        yield from lister(bogus)
        self.warned = seen  # a complete walk: what it did not find is gone


class Scan:
    """A restartable directory scan (see module docstring)."""

    def __init__(self, name: str, lister: Callable[[], Iterator[tuple[str, str]]]):
        self.name = name
        self._lister = lister
        self._iter: Iterator[tuple[str, str]] | None = None
        self.path = ""  # where the id last returned by next() was found
        self._restart = False
        self._next_all = False
        self._next_flush = False
        self.scan_all = False
        self.flush = False

    @property
    def busy(self) -> bool:
        """True while a scan is in progress."""
        return self._iter is not None

    @property
    def restart_pending(self) -> bool:
        """True when the running scan will start over once it ends."""
        return self._restart

    def request(self, start: bool = True, scan_all: bool = False, flush: bool = False) -> None:
        """Ask for a scan (``start``) and/or set modifiers for the current and next scan."""
        if scan_all:
            self._next_all = True
        if flush:
            self._next_flush = True
        if self._iter is not None:
            self.scan_all = self.scan_all or scan_all
            self.flush = self.flush or flush
            if start:
                self._restart = True
        elif start:
            self._start()

    def _start(self) -> None:
        self._iter = self._lister()
        self.scan_all, self.flush = self._next_all, self._next_flush
        self._next_all = self._next_flush = False
        self._restart = False

    def close(self) -> None:
        """Abandon the scan in progress (closes its directory handle)."""
        it, self._iter = self._iter, None
        close = getattr(it, "close", None)
        if close is not None:
            close()
        self.scan_all = self.flush = False

    def next(self) -> str | None:
        """Return the next queue id, or None when the scan is over (and not restarted);
        ``path`` is then where it was found."""
        while self._iter is not None:
            try:
                qid, self.path = next(self._iter)
                return qid
            except StopIteration:
                self._iter = None
                self.scan_all = self.flush = False
                if self._restart:
                    self._start()
        return None
