"""master.config.mastercf - master.cf parsing into Service records.

SYNOPSIS
    from master.config import Config, load_master_cf
    cfg = Config.load("/etc/qmgrd")
    for svc in load_master_cf("/etc/qmgrd/master.cf", cfg):
        svc.service_key, svc.module, svc.endpoint(cfg.queue_directory())

DESCRIPTION
    Postfix master.cf(5) syntax: one logical line per service (continuation lines start
    with whitespace, ``#`` comment lines and blank lines ignored), eight whitespace
    separated columns, ``-`` = built-in default:

        service type private unpriv chroot wakeup maxproc command [args]

    type      inet, unix or fifo (unix-dgram and pass are not supported -> error).
    private   y (default) -> private/, n -> public/.  An inet service is never private:
              ``y`` there is accepted and forced to n.
    unpriv    y (default) run as mail_owner; n run as root.
    chroot    n (default, Postfix >= 3.0); y chroot to queue_directory.
    wakeup    seconds between W triggers, default 0 = none; ``N?`` = only once used.
    maxproc   default $default_process_limit; 0 = unlimited.
    command   a built-in name (BUILTIN_MODULES) or a dotted Python module name.
    args      ``-o name=value`` and ``-o { name = value }`` become Service.overrides
              (unexpanded; the child expands them with Config.with_overrides); every other
              argument is kept in Service.args in order; ``{ text }`` groups one argument
              containing whitespace (braces and outer whitespace removed), and white
              space inside braces within a word does not split it (``x{y z}`` stays one
              argument, braces kept), as Postfix's master splits its lines.  As for
              Postfix's daemons (getopt), options end at ``--`` (dropped) or at the first
              argument that is not an option: a ``-o`` after that is an argument (a pipe
              service's ``argv=/usr/bin/cmd -o x``).

    When the same name + type appears twice, the last entry wins (kept at the position of
    the first), as in Postfix; the optional ``warn`` callback gets
    ``"<path>, line <n>: duplicate service smtp/unix, overrides line <m>"``.  Service objects compare equal when every column is equal, so the master's
    reload can tell changed services from unchanged ones; ``service_key`` = (name, type).

PUBLIC API
    load_master_cf(path: str, cfg: Config, warn=None) -> list[Service]
    parse_master_cf(text: str, path: str, cfg: Config, warn=None) -> list[Service]
        warn: Callable[[str], None] | None, told about duplicate services
    Service (dataclass), Service.service_key, Service.endpoint(queue_directory) -> str,
    Service.child_config(cfg) -> Config, BUILTIN_MODULES: dict[str, str]

ERRORS
    ConfigError ``"<master.cf path>, line <n>: <what>"`` (bad type, bad y/n, bad number,
    too few fields, bad -o, unknown command, unbalanced braces).  A Postfix program that
    qmgrd has no service for (POSTFIX_PROGRAMS: cleanup, trivial-rewrite, virtual, ...) is
    named as such: ``command "virtual": Postfix's virtual(8) is not implemented in qmgrd:
    delete this line``.  Nothing is logged.
    Checks that need the system (the command's module exists, inet ports and hosts,
    parameter values) are in master.config.validate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from master.config.errors import ConfigError
from master.config.maincf import NAME_RE, Config, logical_lines

QMGR_MODULE = "qmgrd.qmgr"
BUILTIN_MODULES: dict[str, str] = {
    "qmgr": "qmgrd.qmgr",
    "pickup": "transports.pickup",
    "smtp": "transports.smtp",
    "lmtp": "transports.smtp",
    "local": "transports.local",
    "error": "transports.error",
    "discard": "transports.discard",
    "pipe": "transports.pipe",
    "bounce": "transports.bounce",
    "smtpd": "transports.smtpd",
}

# Postfix programs a pasted master.cf names that qmgrd has no service for: what a Postfix
# user is told instead of "unknown command" (the line must go: nothing is guessed).
BUILT_INTO = "is not a service in qmgrd"
NOT_IMPLEMENTED = "is not implemented in qmgrd"
POSTFIX_PROGRAMS: dict[str, str] = {
    "cleanup": f"{BUILT_INTO} (smtpd, pickup and bounce do its work in their own process)",
    "trivial-rewrite": f"{BUILT_INTO} (the qmgr resolves addresses and transports itself)",
    "showq": f"{BUILT_INTO} (qmgr-ctl list reads the queue itself)",
    "flush": f"{BUILT_INTO} (qmgr-ctl flush --site does fast flush's work)",
    "anvil": f"{BUILT_INTO} (smtpd counts connections per client itself)",
    "scache": f"{BUILT_INTO} (each smtp agent keeps its own connection cache)",
    "postlogd": f"{BUILT_INTO} (every process writes maillog_file itself)",
    "tlsmgr": f"{BUILT_INTO} (no TLS session cache)",
    "oqmgr": f"{NOT_IMPLEMENTED} (qmgr is the queue manager)",
    "virtual": NOT_IMPLEMENTED,
    "spawn": NOT_IMPLEMENTED,
    "verify": NOT_IMPLEMENTED,
    "proxymap": NOT_IMPLEMENTED,
    "postscreen": NOT_IMPLEMENTED,
    "dnsblog": NOT_IMPLEMENTED,
    "tlsproxy": NOT_IMPLEMENTED,
    "qmqpd": NOT_IMPLEMENTED,
}

# Services that cannot run chrooted (master.cf chroot y under a root master), with what
# start/reload (master.config.validate) and the service itself say.  Postfix's master(5):
# chroot "should not be used" with local(8); qmgrd refuses it, as its mailboxes, passwd
# file, alias tables and .forward files are all outside queue_directory.
NO_CHROOT: dict[str, str] = {
    "transports.local": "the local delivery agent cannot run chrooted (set its chroot "
                        "column to n)",
}

SERVICE_TYPES = ("inet", "unix", "fifo")
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+\Z")
_WAKEUP_RE = re.compile(r"(\d+)(\??)\Z")


@dataclass
class Service:
    """One master.cf entry.  ``path``/``line`` locate it and do not take part in ==."""

    name: str
    type: str
    private: bool
    unpriv: bool
    chroot: bool
    wakeup: int
    wakeup_if_used: bool
    maxproc: int
    command: str
    args: list[str] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)
    module: str = ""
    path: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    @property
    def service_key(self) -> tuple[str, str]:
        """(name, type): the identity of a service across reloads."""
        return (self.name, self.type)

    def endpoint(self, queue_directory: str) -> str:
        """unix/fifo: ``<queue_directory>/{private|public}/<name>``; inet: the name
        (``[host:]port``) unchanged."""
        if self.type == "inet":
            return self.name
        return os.path.join(queue_directory, "private" if self.private else "public",
                            self.name)

    def child_config(self, cfg: Config) -> Config:
        """The Config a child of this service sees: service_name and process_name set
        (as Postfix's daemons do), then this service's -o overrides."""
        overrides = {"service_name": self.name, "process_name": self.command}
        overrides.update(self.overrides)
        return cfg.with_overrides(overrides)


def _tokens(line: str, path: str, lineno: int) -> list[str]:
    """Split as Postfix's master (mystrtokq with ``{}``, then extpar): a token runs to
    white space outside braces (``x{y z}`` is one token, kept as it is); a token that
    starts with ``{`` must end with its matching ``}`` and yields the inner text
    stripped (``{ a b }`` -> ``a b``). Raises ConfigError for a missing ``}`` or text
    after the closing one (``{a}b``)."""
    out: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i].isspace():
            i += 1
            continue
        depth, j = 0, i
        while j < n and (depth > 0 or not line[j].isspace()):
            if line[j] == "{":
                depth += 1
            elif line[j] == "}" and depth > 0:
                depth -= 1
            j += 1
        token = line[i:j]
        i = j
        if not token.startswith("{"):
            if depth > 0:
                raise ConfigError(f"missing '}}' in \"{token}\"", path, lineno)
            out.append(token)
            continue
        depth = 0
        for k, c in enumerate(token):
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
        else:
            raise ConfigError("missing '}'", path, lineno)
        if token[k + 1:]:
            raise ConfigError(f"syntax error after '}}' in \"{token}\"", path, lineno)
        out.append(token[1:k].strip())
    return out


def _yn(value: str, default: bool, column: str, path: str, lineno: int) -> bool:
    if value == "-":
        return default
    if value in ("y", "n"):
        return value == "y"
    raise ConfigError(f'bad {column} field value "{value}" (expected y, n or -)',
                      path, lineno)


def _module(command: str, path: str, lineno: int) -> str:
    if command in BUILTIN_MODULES:
        return BUILTIN_MODULES[command]
    if _MODULE_RE.match(command):
        return command
    if command in POSTFIX_PROGRAMS:
        raise ConfigError(f'command "{command}": Postfix\'s {command}(8) '
                          f"{POSTFIX_PROGRAMS[command]}: delete this line", path, lineno)
    raise ConfigError(f'unknown command "{command}" (not built in, and not a dotted '
                      "Python module name)", path, lineno)


def _override(text: str, path: str, lineno: int) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    name = name.strip()
    if not eq or not NAME_RE.match(name):
        raise ConfigError(f'bad -o option "{text}" (expected name=value)', path, lineno)
    return name, value.strip()


def _parse_line(line: str, path: str, lineno: int, cfg: Config) -> Service:
    fields = _tokens(line, path, lineno)
    if len(fields) < 8:
        raise ConfigError(f"too few fields ({len(fields)} of at least 8)", path, lineno)
    name, stype, priv, unpriv, chroot, wakeup, maxproc, command = fields[:8]
    if not name:
        raise ConfigError("empty service name", path, lineno)
    if command in POSTFIX_PROGRAMS:  # before the type: postlogd's is unix-dgram
        _module(command, path, lineno)
    if stype not in SERVICE_TYPES:
        raise ConfigError(f'bad or unsupported service type "{stype}" '
                          f"(expected {', '.join(SERVICE_TYPES)})", path, lineno)
    if stype != "inet" and ("/" in name or name in (".", "..")):
        raise ConfigError(f'bad service name "{name}" for a {stype} service', path, lineno)
    private = _yn(priv, True, "private", path, lineno)
    if stype == "inet":
        private = False
    m = _WAKEUP_RE.match(wakeup)
    if wakeup == "-":
        wake, if_used = 0, False
    elif m is not None:
        wake, if_used = int(m.group(1)), m.group(2) == "?"
    else:
        raise ConfigError(f'bad wakeup time "{wakeup}"', path, lineno)
    if maxproc == "-":
        limit = cfg.get_int("default_process_limit")
    elif maxproc.isdigit():
        limit = int(maxproc)
    else:
        raise ConfigError(f'bad process limit "{maxproc}"', path, lineno)
    svc = Service(name=name, type=stype, private=private,
                  unpriv=_yn(unpriv, True, "unprivileged", path, lineno),
                  chroot=_yn(chroot, False, "chroot", path, lineno),
                  wakeup=wake, wakeup_if_used=if_used, maxproc=limit, command=command,
                  module=_module(command, path, lineno), path=path, line=lineno)
    rest = fields[8:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--" or not arg.startswith("-"):
            # the end of the options, as for Postfix's daemons (getopt): what follows
            # is the command's arguments, verbatim (a pipe line's argv=... -o x)
            svc.args += rest[i + 1:] if arg == "--" else rest[i:]
            break
        if arg == "-o":
            if i + 1 >= len(rest):
                raise ConfigError("-o without name=value", path, lineno)
            key, value = _override(rest[i + 1], path, lineno)
            svc.overrides[key] = value
            i += 2
            continue
        if arg.startswith("-o") and "=" in arg:
            key, value = _override(arg[2:], path, lineno)
            svc.overrides[key] = value
        else:
            svc.args.append(arg)
        i += 1
    return svc


def parse_master_cf(text: str, path: str, cfg: Config,
                    warn: Callable[[str], None] | None = None) -> list[Service]:
    """Parse master.cf text.  ``cfg`` supplies default_process_limit.  A service defined
    twice (same name and type) is reported through ``warn`` (one message per later
    definition, without "warning: ").  Raises ConfigError for the first bad line, with
    the other bad lines' errors in its ``others`` (all of them reported in one run)."""
    services: dict[tuple[str, str], Service] = {}
    errors: list[ConfigError] = []
    for lineno, line in logical_lines(text, path):
        try:
            svc = _parse_line(line, path, lineno, cfg)
        except ConfigError as exc:
            # every bad line in one run (a pasted stock master.cf has several lines of
            # Postfix programs qmgrd lacks): the first is raised, the rest ride along
            errors.append(exc)
            continue
        if svc.module == QMGR_MODULE and svc.type == "unix":
            # Postfix's (and Debian's) stock line is "qmgr unix ..."; Postfix's clients
            # trigger the qmgr either way, qmgrd's write to a FIFO at the same path
            svc.type = "fifo"
            if warn is not None:
                warn(f"{path}, line {lineno}: service {svc.name}: type unix taken as "
                     "fifo (qmgrd's qmgr reads its triggers from a FIFO)")
        old = services.get(svc.service_key)
        if old is not None and warn is not None:
            warn(f"{path}, line {lineno}: duplicate service {svc.name}/{svc.type}, "
                 f"overrides line {old.line}")
        services[svc.service_key] = svc
    if errors:
        first = errors[0]
        first.others = errors[1:]
        raise first
    return list(services.values())


def load_master_cf(path: str, cfg: Config,
                   warn: Callable[[str], None] | None = None) -> list[Service]:
    """Read and parse the master.cf file at ``path`` (``warn`` as parse_master_cf).
    Raises ConfigError (also when the file cannot be read or is not UTF-8)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"open {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("invalid UTF-8 text", path, data[: e.start].count(b"\n") + 1) from None
    return parse_master_cf(text, path, cfg, warn)
