"""maps — lookup tables named the way Postfix names them (``type:name``).

Summary
    Postfix parameters such as ``transport_maps`` name tables as ``type:/path``. qmgrd
    reads the plain-text source file for these types:

    ``texthash:/path``  Postfix's in-memory table of ``key value`` lines.
    ``hash:/path``      accepted for the same file (Postfix would read ``/path.db``;
                        qmgrd reads the source text, so no ``postmap`` step is needed).
    ``inline:{ k=v, k2=v2 }``  Postfix's inline table.

    File syntax (postmap(1)): ``key whitespace value``; ``#`` comment lines and blank lines
    are ignored; a line starting with whitespace continues the previous value. Keys are
    case-insensitive (folded to lower case). A later duplicate key is ignored with a
    warning, as postmap does.

Alias tables (``alias_maps``; Postfix's postalias(1) reads the same source file):
    ``name: value`` lines, ``#`` comment lines and blank lines ignored, a line starting
    with whitespace continues the previous value. The name (before the first ``:``;
    double quotes around it removed) is folded to lower case; the value is kept as
    written (local(8) splits it into targets). ``#`` starts a comment only at the start
    of a line (after a value it is part of the value, as in aliases(5)). A line with
    nothing after the colon (``name:``) is a bad line (below) and skipped, as postalias
    skips it: the name is no alias, and its mail goes to the mailbox of that name. A
    later duplicate name is ignored with a warning (``duplicate entry``) and the first
    entry kept, as postalias does; the warning is logged once per load of the table,
    not at each lookup. ``inline:`` tables are read as in any other parameter.

Re-reading a changed file (AliasMaps, i.e. local(8)'s alias_maps):
    Postfix's local(8) reads the ``.db`` that postalias builds and never sees a source
    file half-written. qmgrd reads the source, so a file that changed since it was read
    is read again only when its new contents are complete: when it was last modified at
    least SETTLE_TIME (1 s) ago, and its size, mtime, inode and device are the same
    before and after the reading. Otherwise (e.g. ``cat new > aliases`` is under way,
    or a rewrite started while it was read) the previous complete contents stay in use,
    with no warning, and the file is tried again at a later lookup; so a new version is
    used from the first lookup 1 s after it was written. A modification time in the
    future (``touch -d``, ``cp -p`` from a host whose clock is ahead, a clock stepped
    back) is no sign of a write under way: such a file is read at once (it used to be
    ignored until that time came, each process going on with its own old contents). A
    writer that pauses for more than 1 s in the middle of the file defeats the rule:
    write a new file and rename it over the old one (as editors do) to be safe. The
    first load of a table (at
    start-up, or after the file could not be read) reads the file as it is. A file that
    is gone or cannot be read is TableUnavailable (below), as at the first load.

Bad lines (every file type, every reader: the qmgr's transport_maps, local's alias_maps,
smtpd's local_recipient_maps and access tables, the smtp client's cache tables, and
``qmgr-master reload`` / ``qmgr-ctl config``, which check transport_maps):
    as with Postfix's postmap and postalias, a line that is not ``key whitespace value``
    (``name: value`` in an alias table) is one warning naming file and line, each time
    the file is read (by AliasMaps: each time its new contents are taken into use),
    e.g. ``warning: /etc/aliases, line 4: need name:value pair -- ignoring this line``
    (also for ``name:`` with no value) or ``warning: /etc/transport, line 11: expected
    format: key whitespace value -- ignoring this line``, and is skipped; every other
    entry is used. A typo therefore never stops a daemon, and reload and ``qmgr-ctl
    config`` accept the file with the same warning (refusing it while the running
    programs use it would say something untrue).

Unavailable tables (the source file is missing or cannot be read: TableUnavailable):
    AliasMaps.lookup raises TableUnavailable instead of matching nothing, so that local
    defers the recipient (``4.3.0 alias database unavailable``, as Postfix's local(8))
    rather than bouncing it or delivering it to the wrong mailbox; the file is tried
    again at each lookup, and logged once per distinct problem. A type qmgrd cannot
    read (``nis:``, the second table of Postfix's default alias_maps) is logged once and
    matches nothing.

Public API
    Table.lookup(key) -> str | None
    Table.changed() -> bool; Table.settled(settle, now) -> bool  (the qmgr restarts for
        a changed transport_maps file only once it has settled: SETTLE_TIME)
    open_table(spec) -> Table
    open_tables(specs: list[str]) -> list[Table]
    open_alias_table(spec, warn=None) -> Table   an alias_maps table (aliases(5) syntax,
        above); warn(text) gets its warnings (default log.warning)
    AliasMaps(specs, param, settle=None, clock=None)
        .lookup(name): the first table's value, tables re-read when their file changes
        (above); raises TableUnavailable (above)
    SETTLE_TIME: float, seconds
    TableError: unknown type or an unreadable file, naming the table; TableUnavailable,
        its subclass for a file that cannot be read. The same classes as
        master.config.tables', where the file format lives (so that the master's
        configuration check can read tables too).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from master import log
from master.config.tables import (
    FILE_TYPES,
    TableError,
    TableUnavailable,
    logical_lines,
    read_table,
)

SETTLE_TIME = 1.0  # seconds a changed alias file must be left alone before it is read

__all__ = ["SETTLE_TIME", "AliasMaps", "Table", "TableError", "TableUnavailable",
           "open_alias_table", "open_table", "open_tables"]


def written_lately(mtime: float, now: float, settle: float) -> bool:
    """True when a file modified at ``mtime`` may still be being written at ``now``: less
    than ``settle`` seconds before (all seconds since the epoch). A future mtime (touch
    -d, cp -p, a clock stepped back) is no such sign: a write sets it to now."""
    return 0 <= now - mtime < settle


class Table:
    """An in-memory ``key -> value`` table.

    Attributes:
        spec: the ``type:name`` string it was opened from.
        mtime: modification time of the source file (seconds), for change detection.
    """

    def __init__(self, spec: str, data: dict[str, str], path: str = "", mtime: float = 0.0):
        self.spec = spec
        self._data = data
        self.path = path
        self.mtime = mtime
        self._fd = -1
        if path:
            # Keep the file open: change detection then works after a chroot, where the
            # path no longer resolves (fstat: new mtime, or nlink 0 when replaced).
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._fd = -1

    def lookup(self, key: str) -> str | None:
        """Return the value for ``key`` (case-insensitive), or None."""
        return self._data.get(key.lower())

    def changed(self) -> bool:
        """True when the source file was modified or replaced since it was read."""
        if not self.path:
            return False
        try:
            if self._fd >= 0:
                st = os.fstat(self._fd)
                if st.st_nlink == 0 or st.st_mtime != self.mtime:
                    return True
                try:
                    return os.stat(self.path).st_ino != st.st_ino
                except OSError:
                    return False  # not visible from here (chroot): fstat said enough
            return os.stat(self.path).st_mtime != self.mtime
        except OSError:
            return True

    def settled(self, settle: float, now: float) -> bool:
        """True when the source file as it is now was last modified at least ``settle``
        seconds before ``now`` (both seconds since the epoch): a rewrite of it is
        probably complete (see "Re-reading a changed file"). A file that cannot be
        looked at counts as settled (the reader then reports it unavailable)."""
        try:
            st = os.stat(self.path)
        except OSError:
            if self._fd < 0:
                return True
            try:
                st = os.fstat(self._fd)  # chrooted: the path does not resolve here
            except OSError:
                return True
        return not written_lately(st.st_mtime, now, settle)

    def close(self) -> None:
        """Release the file descriptor kept for change detection."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def open_table(spec: str) -> Table:
    """Open one table (master.config.tables.read_table; a duplicate key or a bad line
    is logged as a warning, naming file and line, and skipped).

    Raises:
        TableUnavailable: missing or unreadable file.
        TableError: unsupported type or bad inline table.
    """
    t = read_table(spec, log.warning)
    return Table(t.spec, t.data, t.path, t.mtime)


def open_tables(specs: list[str]) -> list[Table]:
    """Open every table of a parameter's list value (in order)."""
    return [open_table(s) for s in specs if s]


def _parse_aliases(path: str, warn: Callable[[str], None]) -> dict[str, str]:
    """The ``name: value`` entries of aliases file ``path`` (module docstring). A line
    without ``name:``, or with nothing after the colon, is one warning through ``warn``
    naming file and line and is skipped, as postalias does (``need name:value pair``);
    a later duplicate name is a warning and the first entry is kept (postalias'
    ``duplicate entry``).

    Raises:
        TableUnavailable: the file cannot be read.
    """
    data: dict[str, str] = {}
    for n, text in logical_lines(path, "name", warn):
        if text.startswith('"'):
            end = text.find('"', 1)
            colon = text.find(":", end) if end > 0 else -1
            name = text[1:end] if colon > 0 and not text[end + 1:colon].strip() else ""
        else:
            colon = text.find(":")
            name = text[:colon].strip() if colon > 0 else ""
        value = text[colon + 1:].strip() if name else ""
        if not value:
            warn(f"{path}, line {n}: need name:value pair -- ignoring this line")
            continue
        key = name.lower()
        if key in data:
            warn(f'{path}, line {n}: duplicate entry: "{key}"')
            continue
        data[key] = value
    return data


def open_alias_table(spec: str, warn: Callable[[str], None] | None = None) -> Table:
    """Open one ``alias_maps`` table: a file type (hash:, texthash:, ...) in aliases(5)
    syntax, or an ``inline:`` table. Bad lines and duplicates go to ``warn`` (default
    log.warning), each once.

    Raises:
        TableUnavailable: missing or unreadable file.
        TableError: unsupported type or bad inline table.
    """
    spec = spec.strip()
    kind, sep, name = spec.partition(":")
    if sep and kind in FILE_TYPES:
        try:
            mtime = os.stat(name).st_mtime
        except OSError as exc:
            raise TableUnavailable(f"{spec}: {exc.strerror}") from exc
        return Table(spec, _parse_aliases(name, warn or log.warning), name, mtime)
    return open_table(spec)


class AliasMaps:
    """The tables of ``alias_maps`` (or another list in aliases(5) syntax), in order.

    A table of a type qmgrd cannot read (``nis:``, a bad ``inline:``) is logged once as
    a warning and matches nothing. A file table that cannot be read (missing,
    unreadable) makes lookup raise TableUnavailable when no earlier table had the name
    (Postfix's maps_find stops at the first table with a lookup error); it is tried
    again at every lookup, so that a restored file is used at once, and each distinct
    problem is logged once. A file that changes is read again at a later lookup, and
    its new contents replace the ones in use only when they are complete (module
    docstring, "Re-reading a changed file"): ``settle`` seconds (None: SETTLE_TIME)
    after its last change, and unchanged while it was read; ``clock()`` (None:
    time.time) gives the current time in seconds since the epoch. The warnings of a
    reading (bad lines, duplicates) are logged when its contents are taken into use:
    once per load of the table.
    """

    def __init__(self, specs: list[str], param: str = "alias_maps",
                 settle: float | None = None, clock: Callable[[], float] | None = None,
                 ) -> None:
        self.param = param
        self.specs = [s.strip() for s in specs if s.strip()]
        self.settle = SETTLE_TIME if settle is None else settle
        self.clock = clock or time.time
        self.tables: dict[str, Table | None] = {}
        self.problems: dict[str, str] = {}   # spec -> the last problem logged
        self.unavailable: dict[str, str] = {}   # spec -> why it cannot be read
        for spec in self.specs:
            self.tables[spec] = self._open(spec)

    def _open(self, spec: str, warn: Callable[[str], None] | None = None) -> Table | None:
        try:
            table = open_alias_table(spec, warn)
        except TableUnavailable as exc:
            self.unavailable[spec] = str(exc)
            self._problem(spec, f"{self.param}: {exc}: alias database unavailable")
            return None
        except TableError as exc:
            self.unavailable.pop(spec, None)
            self._problem(spec, f"{self.param}: {exc}: table ignored")
            return None
        self.unavailable.pop(spec, None)
        self.problems.pop(spec, None)
        return table

    def _reopen(self, spec: str, old: Table) -> Table | None:
        """Read changed table ``spec`` again; ``old`` (its previous complete contents)
        when the file may be in the middle of a rewrite: changed less than
        ``self.settle`` seconds ago, or changed while it was read (size, mtime, inode
        or device differ before and after)."""
        try:
            before = os.stat(old.path)
        except OSError:
            old.close()
            return self._open(spec)  # gone, or not visible (chroot): as at the first load
        if written_lately(before.st_mtime, self.clock(), self.settle):
            return old  # a write may be under way
        warnings: list[str] = []
        table = self._open(spec, warnings.append)
        if table is None:
            old.close()
            return None
        try:
            after = os.stat(old.path)
        except OSError:
            after = None
        if after is None or _identity(after) != _identity(before) \
                or table.mtime != before.st_mtime:
            table.close()
            return old  # rewritten meanwhile: read it again at a later lookup
        old.close()
        for text in warnings:
            log.warning(text)
        return table

    def _problem(self, spec: str, text: str) -> None:
        if self.problems.get(spec) != text:
            self.problems[spec] = text
            log.warning(text)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def lookup(self, name: str) -> str | None:
        """The value of ``name`` (case-insensitive) in the first table that has it.

        Raises:
            TableUnavailable: a table before any that has ``name`` cannot be read.
        """
        for spec in self.specs:
            table = self.tables[spec]
            if table is not None and table.changed():
                table = self.tables[spec] = self._reopen(spec, table)
            elif spec in self.unavailable:
                table = self.tables[spec] = self._open(spec)
            if spec in self.unavailable:
                raise TableUnavailable(self.unavailable[spec])
            if table is None:
                continue
            value = table.lookup(name)
            if value is not None:
                return value
        return None


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: (device, inode, size, mtime ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
