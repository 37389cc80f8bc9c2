"""scan — a restartable walk over one queue directory (qmgr_scan).

Summary
    The qmgr has two scans, ``incoming`` and ``deferred`` (postfix.md §4.2). A scan hands
    out one queue id at a time, so that feeding the active queue interleaves with
    delivery. A request that arrives while a scan runs does not restart it at once: the
    scan is restarted when it ends (so files added meanwhile are found). The ``A`` flag
    (ignore deferred time stamps) is applied to the scan in progress and the next one.

Public API
    Scan(name, lister)            lister: Callable[[], Iterator[str]] (e.g. Spool.scan)
    .request(scan_all=False)      start now, or restart when the running scan ends
    .next() -> str | None         the next id, or None when idle
    .scan_all -> bool             A flag in force for the current scan
    .busy -> bool
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

__all__ = ["Scan"]


class Scan:
    """A restartable directory scan (see module docstring)."""

    def __init__(self, name: str, lister: Callable[[], Iterator[str]]):
        self.name = name
        self._lister = lister
        self._iter: Iterator[str] | None = None
        self._restart = False
        self._next_all = False
        self.scan_all = False

    @property
    def busy(self) -> bool:
        return self._iter is not None

    def request(self, scan_all: bool = False) -> None:
        """Ask for a scan. ``scan_all``: ignore file time stamps (trigger A)."""
        if scan_all:
            self._next_all = True
            if self._iter is not None:
                self.scan_all = True
        if self._iter is None:
            self._start()
        else:
            self._restart = True

    def _start(self) -> None:
        self._iter = self._lister()
        self.scan_all = self._next_all
        self._next_all = False
        self._restart = False

    def next(self) -> str | None:
        """Return the next queue id, or None when the scan is over (and not restarted)."""
        while self._iter is not None:
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
                self.scan_all = False
                if self._restart:
                    self._start()
        return None
