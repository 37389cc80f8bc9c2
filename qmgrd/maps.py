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
    written (local(8) splits it into targets). A later duplicate name is ignored with a
    warning, as postalias does. ``inline:`` tables are read as in any other parameter.

Public API
    Table.lookup(key) -> str | None
    open_table(spec) -> Table
    open_tables(specs: list[str]) -> list[Table]
    open_alias_table(spec) -> Table     an alias_maps table (aliases(5) syntax, below)
    AliasMaps(specs, param)             .lookup(name): the first table's value, tables
        re-read when their file changes; one it cannot open is logged once, ignored
    TableError: unknown type or an unreadable file, naming the table (and line); the
        same class as master.config.tables.TableError, where the file format lives (so
        that the master's configuration check can read tables too).
"""

from __future__ import annotations

import os

from master import log
from master.config.tables import FILE_TYPES, TableError, logical_lines, read_table

__all__ = ["AliasMaps", "Table", "TableError", "open_alias_table", "open_table",
           "open_tables"]


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

    def close(self) -> None:
        """Release the file descriptor kept for change detection."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def open_table(spec: str) -> Table:
    """Open one table (master.config.tables.read_table; a duplicate key is logged as a
    warning).

    Raises:
        TableError: unsupported type, unreadable file or bad syntax.
    """
    t = read_table(spec, log.warning)
    return Table(t.spec, t.data, t.path, t.mtime)


def open_tables(specs: list[str]) -> list[Table]:
    """Open every table of a parameter's list value (in order)."""
    return [open_table(s) for s in specs if s]


def _parse_aliases(path: str) -> dict[str, str]:
    """The ``name: value`` entries of aliases file ``path`` (module docstring).

    Raises:
        TableError: unreadable file or a line without ``name:``.
    """
    data: dict[str, str] = {}
    for n, text in logical_lines(path, "name"):
        if text.startswith('"'):
            end = text.find('"', 1)
            colon = text.find(":", end) if end > 0 else -1
            name = text[1:end] if colon > 0 and not text[end + 1:colon].strip() else ""
        else:
            colon = text.find(":")
            name = text[:colon].strip() if colon > 0 else ""
        if not name:
            raise TableError(f'{path}, line {n}: need "name: value"')
        key = name.lower()
        if key in data:
            log.warning(f'{path}, line {n}: duplicate entry: "{key}"')
            continue
        data[key] = text[colon + 1:].strip()
    return data


def open_alias_table(spec: str) -> Table:
    """Open one ``alias_maps`` table: a file type (hash:, texthash:, ...) in aliases(5)
    syntax, or an ``inline:`` table.

    Raises:
        TableError: unsupported type, unreadable file or bad syntax.
    """
    spec = spec.strip()
    kind, sep, name = spec.partition(":")
    if sep and kind in FILE_TYPES:
        try:
            mtime = os.stat(name).st_mtime
        except OSError as exc:
            raise TableError(f"{spec}: {exc.strerror}") from exc
        return Table(spec, _parse_aliases(name), name, mtime)
    return open_table(spec)


class AliasMaps:
    """The tables of ``alias_maps`` (or another list in aliases(5) syntax), in order.

    A table that cannot be opened (a type qmgrd cannot read such as ``nis:``, a missing
    file, a bad line) is logged once as a warning and matches nothing; a file that
    changes is read again at the next lookup.
    """

    def __init__(self, specs: list[str], param: str = "alias_maps") -> None:
        self.param = param
        self.specs = [s.strip() for s in specs if s.strip()]
        self.tables: dict[str, Table | None] = {}
        for spec in self.specs:
            self.tables[spec] = self._open(spec)

    def _open(self, spec: str) -> Table | None:
        try:
            return open_alias_table(spec)
        except TableError as exc:
            log.warning(f"{self.param}: {exc}: table ignored")
            return None

    def __bool__(self) -> bool:
        return bool(self.specs)

    def lookup(self, name: str) -> str | None:
        """The value of ``name`` (case-insensitive) in the first table that has it."""
        for spec in self.specs:
            table = self.tables[spec]
            if table is not None and table.changed():
                table.close()
                table = self.tables[spec] = self._open(spec)
            if table is None:
                continue
            value = table.lookup(name)
            if value is not None:
                return value
        return None
