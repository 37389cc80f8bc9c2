"""master.config.errors - the one exception of the configuration layer.

SYNOPSIS
    from master.config.errors import ConfigError
    raise ConfigError("missing '=' after parameter name", path="/etc/qmgrd/main.cf", line=3)

DESCRIPTION
    ConfigError is raised for every problem found in main.cf, master.cf, a ``-o``
    override or a typed parameter value.  Its ``str()`` follows Postfix's
    ``msg_fatal`` context style: ``"<path>, line <n>: <what is wrong>"`` when the
    file and line are known, ``"<path>: <what>"`` with a file only, else ``"<what>"``.

    describe(exc) -> str turns any exception into log wording without Python's reprs:
    an OSError becomes ``"<file>: <strerror>"`` (``"<file> -> <file2>: ..."`` for a
    rename, just the strerror without a file: ``"Address already in use"``), not
    ``"[Errno 98] Address already in use"`` or ``"... '/x'"``; anything else its str().
"""

from __future__ import annotations

import os


class ConfigError(Exception):
    """A configuration error.

    Attributes: ``message`` (str, what is wrong), ``path`` (str | None, the file),
    ``line`` (int | None, 1-based physical line where the logical line starts),
    ``others`` (list[ConfigError]: further errors found in the same pass, e.g. every bad
    line of master.cf; empty for most).
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.others: list[ConfigError] = []  # more errors of the same file (master.cf)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.path is not None and self.line is not None:
            return f"{self.path}, line {self.line}: {self.message}"
        if self.path is not None:
            return f"{self.path}: {self.message}"
        return self.message


def describe(exc: BaseException) -> str:
    """The text of ``exc`` for a log line or message (module docstring)."""
    if isinstance(exc, OSError) and exc.strerror:
        names = [os.fsdecode(name) if isinstance(name, bytes) else str(name)
                 for name in (exc.filename, exc.filename2) if name is not None]
        return f"{' -> '.join(names)}: {exc.strerror}" if names else exc.strerror
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return str(exc) or type(exc).__name__
