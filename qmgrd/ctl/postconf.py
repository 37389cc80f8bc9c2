"""postconf — ``qmgr-ctl config NAME=VALUE``: edit main.cf as ``postconf -e`` does.

Summary
    Each ``NAME=VALUE`` replaces the first logical line that sets NAME (the line and its
    continuation lines: lines starting with white space that are neither blank nor
    comments), drops later settings of NAME, or is appended at the end. Comments, blank
    lines and every other line are kept as they are. The new text must parse
    and every value must be valid (master.config's Config.check) before anything is
    written (a changed table parameter such as transport_maps: its tables must open - a
    bad line in a table file is not an error, as it is none for the qmgr, which skips
    it: it goes to ``warn`` naming file and line, and the change is written; a
    changed default_transport or relay_transport naming an smtp service of master.cf:
    its nexthop must be a valid destination, as relayhost); then the whole result with
    master.cf must pass the checks of ``qmgr-master reload`` (master.config.validate.
    check_configuration, e.g. an smtpd's open-relay guard; main.cf's part only when
    there is no master.cf), an error naming the file and line as reload's does; and a
    master that runs must still be found with the new queue_directory (a change
    reload would refuse with "the qmgrd mail system is running (master pid N) with
    queue_directory OLD, not main.cf's NEW ...": the same check and message, from
    master.daemon.pidfile.running_elsewhere); the file is then replaced atomically
    (a temporary file in the same directory with the old file's mode and owner, fsync,
    rename). A running mail system sees the change after ``qmgr-master reload``.

Public API
    parse_assignments(args) -> dict[str, str]     ValueError for a bad name or value
    edit_text(text, changes) -> str               pure
    edit_main_cf(config_directory, changes, warn=None) -> None
        ``warn(text)``: each warning about a changed table (a bad line), without
        "warning: "; raises ConfigError (the result would not parse or not pass reload's checks),
        OSError (read/write)

Logs nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable

from master.config import Config, ConfigError, Service, load_master_cf

__all__ = ["edit_main_cf", "edit_text", "parse_assignments"]

_NAME = re.compile(r"[A-Za-z0-9_]+\Z")
_SETS = re.compile(r"([A-Za-z0-9_]+)[ \t]*=")


def parse_assignments(args: Iterable[str]) -> dict[str, str]:
    """``NAME=VALUE`` arguments as a dict (values stripped, as postconf does).

    Raises:
        ValueError: an argument without ``=``, a bad name, or a value with a line break.
    """
    out: dict[str, str] = {}
    for arg in args:
        name, eq, value = arg.partition("=")
        name = name.strip()
        if not eq or not _NAME.match(name):
            raise ValueError(f"bad parameter setting {arg[:60]!r} (use name=value)")
        if any(c in value for c in "\n\r\0"):
            raise ValueError(f"{name}: the value must be one line")
        out[name] = value.strip()
    return out


def _continues(line: str) -> bool:
    return line[:1] in (" ", "\t") and bool(line.strip()) \
        and not line.lstrip().startswith("#")


def edit_text(text: str, changes: dict[str, str]) -> str:
    """main.cf ``text`` with ``changes`` applied (see module docstring)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out: list[str] = []
    done: set[str] = set()
    i = 0
    while i < len(lines):
        m = _SETS.match(lines[i])
        if m is None or m.group(1) not in changes:
            out.append(lines[i])
            i += 1
            continue
        name = m.group(1)
        i += 1
        while i < len(lines) and _continues(lines[i]):
            i += 1
        if name not in done:
            out.append(f"{name} = {changes[name]}")
            done.add(name)
    out += [f"{n} = {v}" for n, v in changes.items() if n not in done]
    return "\n".join(out) + "\n"


def _services(cfg: Config) -> list[Service]:
    """master.cf's services, or [] when it cannot be read or parsed (then nothing is
    checked against it here: qmgr-master start and reload report that file)."""
    try:
        return load_master_cf(os.path.join(cfg.config_directory, "master.cf"), cfg)
    except ConfigError:
        return []


def _check_running_master(cfg: Config, old_text: str, config_directory: str,
                          path: str) -> None:
    """Raise ConfigError with reload's refusal (master.daemon.pidfile.running_elsewhere)
    when a running master would be left with another queue_directory than the new
    main.cf's: qmgr-master status, stop and reload would refuse to work on it, and
    qmgr-ctl list would read the new, empty queue.  The master is looked for where the
    new main.cf says (data_directory's master.lock) and where the old one said (its
    pid file and master.lock), so a change of both queue_directory and data_directory
    is refused too (reload would then not even find the master)."""
    from master.daemon.pidfile import lock_path, pid_path, running_elsewhere

    locks: list[str] = []
    with contextlib.suppress(ConfigError):
        locks.append(lock_path(cfg.data_directory()))
    with contextlib.suppress(ConfigError):
        old = Config.from_text(old_text, config_directory, path=path)
        locks.append(pid_path(old.queue_directory()))
        locks.append(lock_path(old.data_directory()))
    problem = running_elsewhere(cfg.queue_directory(), locks)
    if problem is not None:
        raise ConfigError(problem)


def edit_main_cf(config_directory: str, changes: dict[str, str],
                 warn: Callable[[str], None] | None = None) -> None:
    """Apply ``changes`` to ``<config_directory>/main.cf`` (see module docstring);
    ``warn`` gets the changed tables' warnings (a bad line: file and line).

    Raises:
        ConfigError: the edited file would not parse (nothing is written).
        OSError: the file cannot be read or replaced.
    """
    path = os.path.join(config_directory, "main.cf")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = edit_text(text, changes)
    try:
        cfg = Config.from_text(new, config_directory, path=path)
        cfg.check()  # values must be valid
        from master.config.validate import (
            TABLE_PARAMS,
            TRANSPORT_NEXTHOP_PARAMS,
            check_tables,
            check_transport_nexthops,
        )

        tables = [name for name in changes if name in TABLE_PARAMS]
        if tables:  # a changed lookup table must open as the qmgr will open it
            check_tables(cfg, tables, warn)
        if any(name in TRANSPORT_NEXTHOP_PARAMS for name in changes):
            check_transport_nexthops(cfg, _services(cfg))
    except ConfigError as exc:
        if any(re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", exc.message)
               for name in changes):
            raise ConfigError(exc.message) from None  # a value given here: no file line
        raise
    # then the whole configuration, as ``qmgr-master reload`` checks it (without the
    # environment-dependent module and maillog_file checks that the master makes): e.g.
    # an smtpd whose relay and recipient restrictions hold no open-relay guard would die
    # at every start; the error names main.cf's or master.cf's line, as reload's does
    from master.config.validate import check_configuration

    # (no master.cf at all: main.cf's part only, as before - start and reload report it)
    check_configuration(cfg, modules=False, logfile=False, master_cf=os.path.lexists(
        os.path.join(config_directory, "master.cf")))
    _check_running_master(cfg, text, config_directory, path)
    st = os.stat(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, st.st_mode & 0o777)
    try:
        try:
            os.write(fd, new.encode("utf-8"))
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
