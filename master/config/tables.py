"""master.config.tables - reading Postfix lookup tables (``type:name``) into memory.

SYNOPSIS
    from master.config.tables import TableError, read_table
    spec = read_table("hash:/etc/qmgrd/transport")   # raises TableError

DESCRIPTION
    The format layer of qmgrd.maps, kept in the master package so that the master's
    configuration check (master.config.validate) can open every table a parameter
    names before a start or reload without importing qmgrd (imports point down only).
    Supported types:

    ``texthash:/path``  Postfix's in-memory table of ``key value`` lines.
    ``hash:/path`` (also btree, lmdb, cdb)  the same source file (Postfix would read
                        ``/path.db``; qmgrd reads the text, no ``postmap`` step needed).
    ``inline:{ k=v, k2=v2 }``  Postfix's inline table.

    File syntax (postmap(1)): ``key whitespace value``; ``#`` comment lines and blank
    lines are ignored; a line starting with whitespace continues the previous value.
    Keys are case-insensitive (folded to lower case).  A later duplicate key is ignored
    and reported through ``warn``, as postmap does.

    A bad line never makes the table unusable: as Postfix's postmap, postalias and
    texthash tables do, it is reported through ``warn`` with file and line, once each
    time the file is read (``<path>, line <n>: expected format: key whitespace value
    -- ignoring this line``; a first line that starts with white space: ``<path>, line
    <n>: logical line must not start with whitespace: "<text>" -- ignoring this line``),
    and skipped; every other entry is kept.  So a typo neither stops the qmgr nor makes
    ``qmgr-master reload`` or ``qmgr-ctl config`` refuse the configuration: they print
    the same warnings and go on, as the daemons that read the file will.  Only a table
    that cannot be read at all (unsupported type, missing or unreadable file) is a
    TableError (TableUnavailable for the file cases).

PUBLIC API
    TableError                        unknown type or unreadable file; str names the
                                      table (``hash:/x: No such file or directory``)
    TableUnavailable(TableError)      the source file cannot be read (missing,
                                      permissions, I/O error): Postfix's "table lookup
                                      error" - callers defer rather than ignore the table
    TableData(spec, data, path, mtime)  path "" and mtime 0.0 for inline tables
    read_table(spec, warn=None) -> TableData        raises TableError
    logical_lines(path, first="key", warn=None) -> [(line number, text)]
                                      a source file's logical lines; raises TableUnavailable
    ``warn``: Callable[[str], None] | None, gets each warning without "warning: " (None:
    bad lines are skipped silently).

Nothing here logs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FILE_TYPES", "TableData", "TableError", "TableUnavailable", "logical_lines",
           "read_table"]

FILE_TYPES = ("texthash", "hash", "btree", "lmdb", "cdb")


class TableError(Exception):
    """A table cannot be opened (unsupported type, bad inline syntax, unreadable file)."""


class TableUnavailable(TableError):
    """A table's source file cannot be read (missing, unreadable): Postfix's lookup
    error (DICT_ERR_RETRY/CONFIG), on which local(8) defers and smtpd answers 4xx."""


@dataclass(frozen=True)
class TableData:
    """A table's contents: ``data`` maps lower-case keys to values; ``mtime`` (epoch s)
    of the source file ``path`` when it was read."""

    spec: str
    data: dict[str, str]
    path: str = ""
    mtime: float = 0.0


def logical_lines(path: str, first: str = "key",
                  warn: Callable[[str], None] | None = None) -> list[tuple[int, str]]:
    """The logical lines of table source file ``path``, as Postfix's postmap and
    postalias read them (readllines): blank lines and ``#`` comments skipped, a line
    that starts with whitespace continues the one before (joined by one space).  Such
    a line before any ``first`` (key or name) is reported through ``warn`` with file
    and line, as readllines does, and skipped.

    Returns:
        [(line number where the logical line starts, its text stripped)].

    Raises:
        TableUnavailable: the file cannot be read (``"<path>: <strerror>"``).
    """
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TableUnavailable(f"{path}: {exc.strerror}") from exc
    logical: list[tuple[int, str]] = []
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if not logical:
                if warn is not None:
                    more = "..." if len(stripped) > 30 else ""
                    warn(f'{path}, line {n}: logical line must not start with '
                         f'whitespace: "{stripped[:30]}{more}" -- ignoring this line')
                continue
            ln, prev = logical[-1]
            logical[-1] = (ln, prev + " " + stripped)
        else:
            logical.append((n, stripped))
    return logical


def _parse_text(path: str, warn: Callable[[str], None] | None) -> dict[str, str]:
    data: dict[str, str] = {}
    for n, text in logical_lines(path, "key", warn):
        parts = text.split(None, 1)
        if len(parts) != 2:
            # Postfix's dict_thash (postmap: the same without "-- ignoring ...")
            if warn is not None:
                warn(f"{path}, line {n}: expected format: key whitespace value"
                     " -- ignoring this line")
            continue
        key = parts[0].lower()
        if key in data:
            if warn is not None:
                warn(f"{path}, line {n}: duplicate entry: \"{key}\"")
            continue
        data[key] = parts[1].strip()
    return data


def read_table(spec: str, warn: Callable[[str], None] | None = None) -> TableData:
    """Read table ``spec`` (``type:name``) into memory.

    A bad line of a file is reported through ``warn`` (``"<path>, line <n>: ..."``)
    and skipped (module docstring).

    Raises:
        TableUnavailable: missing or unreadable file (``"<spec>: <strerror>"``).
        TableError: unsupported type or bad inline table.
    """
    spec = spec.strip()
    kind, sep, name = spec.partition(":")
    if not sep:
        raise TableError(f"table {spec!r}: expected type:name")
    if kind in FILE_TYPES:
        try:
            mtime = os.stat(name).st_mtime
        except OSError as exc:
            raise TableUnavailable(f"{spec}: {exc.strerror}") from exc
        return TableData(spec, _parse_text(name, warn), name, mtime)
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
        return TableData(spec, data)
    raise TableError(f"{spec}: unsupported dictionary type: {kind}")
