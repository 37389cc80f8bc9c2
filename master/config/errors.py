"""master.config.errors - the one exception of the configuration layer.

SYNOPSIS
    from master.config.errors import ConfigError
    raise ConfigError("missing '=' after parameter name", path="/etc/qmgrd/main.cf", line=3)

DESCRIPTION
    ConfigError is raised for every problem found in main.cf, master.cf, a ``-o``
    override or a typed parameter value.  Its ``str()`` follows Postfix's
    ``msg_fatal`` context style: ``"<path>, line <n>: <what is wrong>"`` when the
    file and line are known, ``"<path>: <what>"`` with a file only, else ``"<what>"``.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration error.

    Attributes: ``message`` (str, what is wrong), ``path`` (str | None, the file),
    ``line`` (int | None, 1-based physical line where the logical line starts).
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = path
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.path is not None and self.line is not None:
            return f"{self.path}, line {self.line}: {self.message}"
        if self.path is not None:
            return f"{self.path}: {self.message}"
        return self.message
