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

Public API
    Table.lookup(key) -> str | None
    open_table(spec) -> Table
    open_tables(specs: list[str]) -> list[Table]
    TableError: unknown type or an unreadable file, naming the table (and line); the
        same class as master.config.tables.TableError, where the file format lives (so
        that the master's configuration check can read tables too).
"""

from __future__ import annotations

import os

from master import log
from master.config.tables import TableError, read_table

__all__ = ["Table", "TableError", "open_table", "open_tables"]


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
