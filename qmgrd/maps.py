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
    TableError: unknown type or an unreadable file, naming the table (and line).
"""

from __future__ import annotations

import os

from master import log

__all__ = ["Table", "TableError", "open_table", "open_tables"]


class TableError(Exception):
    """A table cannot be opened or has a bad line."""


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


def _parse_text(path: str) -> dict[str, str]:
    data: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TableError(f"{path}: {exc.strerror}") from exc
    logical: list[tuple[int, str]] = []
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if not logical:
                raise TableError(f"{path}, line {n}: continuation line without a key")
            ln, prev = logical[-1]
            logical[-1] = (ln, prev + " " + stripped)
        else:
            logical.append((n, stripped))
    for n, text in logical:
        parts = text.split(None, 1)
        if len(parts) != 2:
            raise TableError(f"{path}, line {n}: expected \"key whitespace value\"")
        key = parts[0].lower()
        if key in data:
            log.warning(f"{path}, line {n}: duplicate entry: \"{key}\"")
            continue
        data[key] = parts[1].strip()
    return data


def open_table(spec: str) -> Table:
    """Open one table.

    Raises:
        TableError: unsupported type, unreadable file or bad syntax.
    """
    spec = spec.strip()
    kind, sep, name = spec.partition(":")
    if not sep:
        raise TableError(f"table {spec!r}: expected type:name")
    if kind in ("texthash", "hash", "btree", "lmdb", "cdb"):
        try:
            mtime = os.stat(name).st_mtime
        except OSError as exc:
            raise TableError(f"{spec}: {exc.strerror}") from exc
        return Table(spec, _parse_text(name), name, mtime)
    if kind == "inline":
        body = name.strip()
        if not (body.startswith("{") and body.endswith("}")):
            raise TableError(f"{spec}: inline table must be {{ key=value, ... }}")
        data: dict[str, str] = {}
        for item in body[1:-1].split(","):
            item = item.strip()
            if not item:
                continue
            k, eq, v = item.partition("=")
            if not eq:
                raise TableError(f"{spec}: missing '=' in {item!r}")
            data.setdefault(k.strip().lower(), v.strip())
        return Table(spec, data)
    raise TableError(f"unsupported dictionary type: {kind}")


def open_tables(specs: list[str]) -> list[Table]:
    """Open every table of a parameter's list value (in order)."""
    return [open_table(s) for s in specs if s]
