"""quickcf — a few literal values of a plain main.cf, without master.config.

Summary
    Commands that start once per use - ``qmgr-sendmail`` (one run per message) and a
    plain ``qmgr-ctl flush`` (postqueue -f, run from cron or by ``sendmail -q``) - need
    one to three parameters of main.cf. Importing master.config and loading main.cf
    through it costs such a run 8-10 ms of its 20-60 (issue 8). :func:`values` reads
    the file itself, but only when it is plain: every line blank, a comment
    (``#`` first), a continuation (leading white space, after a ``name = value``
    line), or ``name = value`` with a name of letters, digits and ``_``. A value is
    taken only when it is literal (no ``$``: no expansion to do), and
    ``queue_directory``, when asked for, only when it is an absolute path.

    Anything else - a syntax error, a name with ``.`` or ``-``, an expansion, an empty
    or relative queue_directory, a file that cannot be read or is not UTF-8 - gives
    None, and the caller loads main.cf through master.config.Config, the one parser:
    it decides, and it reports the errors (file and line; for queue_directory
    Config.queue_directory's ``bad queue_directory parameter value``). So the values
    are Config's whenever this reader gives any, and a fast path never works in a
    directory relative to where the command was started (tests/test_sendmail_fast.py,
    tests/test_ctl_startup.py compare the two).

Public API
    QUEUE_DIRECTORY_DEFAULT = "/var/spool/postfix"   master.config's default
    values(config_dir: str, defaults: dict[str, str]) -> dict[str, str] | None
        ``{name: value}`` for the names of ``defaults`` (its value where main.cf does
        not set the name), stripped, continuation lines joined with one space
        (queue_directory: an absolute path, normalised as Config.queue_directory
        gives it); None as above.

Logs nothing; raises nothing. Imports only os (no typing, collections or re: each
would cost a run a few milliseconds).
"""

from __future__ import annotations

import os

__all__ = ["QUEUE_DIRECTORY_DEFAULT", "values"]

QUEUE_DIRECTORY_DEFAULT = "/var/spool/postfix"  # master.config.params' (tests compare them)


def values(config_dir: str, defaults: dict[str, str]) -> dict[str, str] | None:
    """The literal values of the parameters ``defaults`` names, from
    ``<config_dir>/main.cf`` when the file is plain and a queue_directory asked for is
    an absolute path (module docstring); else None. Raises nothing."""
    try:
        with open(os.path.join(config_dir, "main.cf"), "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    found: dict[str, str] = {}
    name = ""
    for line in text.split("\n"):  # only LF ends a line (master.config.maincf)
        stripped = line.strip()
        if not stripped or stripped[0] == "#":
            continue
        if line[0].isspace():
            if not name:
                return None
            if name in defaults:
                found[name] += " " + stripped
            continue
        name, eq, value = line.partition("=")
        name = name.strip()
        if not eq or not name or not (name.replace("_", "a").isalnum() and name.isascii()):
            return None  # a syntax error, or a name with . or - (master.config decides)
        if name in defaults:
            found[name] = value.rstrip()
    out: dict[str, str] = {}
    for param, default in defaults.items():
        value = found.get(param, default).strip()
        if "$" in value:
            return None  # Config expands
        if param == "queue_directory":
            if not value.startswith("/"):
                return None  # Config reports it
            value = os.path.normpath(value)  # as Config.queue_directory
        out[param] = value
    return out
