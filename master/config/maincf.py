"""master.config.maincf - main.cf parsing, $name expansion and typed lookups (Config).

SYNOPSIS
    from master.config import Config, ConfigError
    cfg = Config.load("/etc/qmgrd", overrides={"syslog_name": "qmgrd/relay"})
    cfg.get("myorigin")                              # -> str, fully expanded
    cfg.queue_directory()                            # -> str, an absolute path
    cfg.get_time("queue_run_delay")                  # -> int seconds
    cfg.transport_int("smtp", "_destination_recipient_limit")   # -> 50
    child = cfg.with_overrides({"service_name": "relay"})

DESCRIPTION
    main.cf syntax (Postfix main.cf(5)): ``name = value`` logical lines; a line that starts
    with whitespace continues the previous logical line; lines whose first non-blank
    character is ``#`` and blank lines are ignored (and do not end a logical line); ``#``
    after text is part of the value; whitespace around ``=`` and at the end is trimmed;
    a later definition wins.  Unknown names are kept (no error).  ``config_directory`` is
    always the directory given to load(), made absolute.

    Expansion (Postfix mac_expand): ``$name``, ``${name}``, ``$(name)``, recursively,
    against -o overrides, then main.cf, then computed defaults (myhostname, mydomain), then
    the table default; unknown names expand to "".  ``$$`` is a literal ``$``.
    Conditionals: ``${name?text}`` (text if name is non-empty), ``${name:text}`` (text if
    name is empty), ``${name?{text1}:{text2}}``.  A parameter that refers to itself,
    directly or not, raises ConfigError "expansion loop ...".  Raw parameters
    (Param.raw: forward_path, mailbox_command, luser_relay) are returned unexpanded.

PUBLIC API
    Config.load(config_directory, overrides=None) -> Config
    Config.from_text(text, config_directory, overrides=None, path="main.cf") -> Config
    Config.load_lenient(config_directory) -> (Config, list[ConfigError])  (bad lines left out)
    cfg.with_overrides(overrides) -> Config       (new object; later overrides win)
    cfg.get(name) -> str; cfg.get_raw(name) -> str; cfg.is_set(name) -> bool
    cfg.get_int / get_bool / get_time (seconds) / get_size (bytes) / get_list
    cfg.queue_directory() -> str  the one way to the queue directory: an absolute path,
                                 else ConfigError (Postfix: an empty value is fatal)
    cfg.data_directory() -> str   likewise for data_directory
    cfg.maillog_file() -> str     likewise for maillog_file, but "" (syslog) is allowed
    cfg.hash_queue_names() -> list[str]  hash_queue_names, lower case; ConfigError for
                                 maildrop or a name that is not a queue directory
    HASHABLE_QUEUES, POSTFIX_ONLY_QUEUES   the names hash_queue_names accepts
    cfg.transport_name(transport, suffix) -> str (the parameter actually used)
    cfg.transport_param / transport_int / transport_time (transport, suffix)
    cfg.check() -> None          validate every set or table parameter (like postconf),
                                 each entry of NETWORK_LIST_PARAMS (master.config.netlist),
                                 each of NEXTHOP_PARAMS (relayhost: master.config.nexthop)
                                 the paths (queue_directory(), data_directory(),
                                 maillog_file()), hash_queue_names() and
                                 smtpd_forbid_bare_newline (BARE_NEWLINE_MODES)
    cfg.error(name, message) -> ConfigError   located where name's value came from
    param_spec(name) -> Param | None   the table entry governing name (per-transport too)
    TRANSPORT_SUFFIXES                 the per-transport parameter suffixes
    transport_fallback(name) -> str | None   the global a per-transport name falls back to
    cfg.dump(defaults=False, nondefault=False, expand=False) -> list[str]  (postconf -d/-n/-x)
    cfg.config_directory, cfg.path, cfg.overrides
    cfg.overridden: list[(line, name, value)]  main.cf lines that set a parameter again
                                 (load(); the later line wins)

ERRORS
    ConfigError, str ``"<main.cf path>, line <n>: <what>"`` for syntax errors and for bad
    typed values that came from main.cf; override values are named as "-o name=value".
    Nothing is logged here; callers decide (log.fatal at daemon start).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from master.config.errors import ConfigError
from master.config.netlist import network_problem
from master.config.nexthop import nexthop_problem
from master.config.params import (
    BARE_NEWLINE_MODES,
    PARAMS,
    Param,
    domain_default,
    hostname_default,
    parse_bool,
    parse_int,
    parse_size,
    parse_time,
    split_list,
    value_range,
)

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_MACRO_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
_BRACED_RE = re.compile(r"\s*([A-Za-z0-9_][A-Za-z0-9_.\-]*)\s*")
_MAX_DEPTH = 100
# Network lists smtpd matches client addresses against (transports.smtpd_policy.NetList);
# mynetworks first, so that an error in "$mynetworks" is reported where it is set.
NETWORK_LIST_PARAMS: tuple[str, ...] = ("mynetworks", "smtpd_client_event_limit_exceptions",
                                        "smtpd_forbid_bare_newline_exclusions")
# Parameters whose value is an smtp destination (master.config.nexthop), "" = none
NEXTHOP_PARAMS: tuple[str, ...] = ("relayhost",)
# mailbox_delivery_lock's names on Linux (Postfix's postconf -l: flock, fcntl, dotlock)
MAILBOX_LOCKS: tuple[str, ...] = ("flock", "fcntl", "dotlock")
# Postfix's TLS security levels (tls_level_lookup(); smtp_tls_security_level, "" = none)
TLS_LEVELS: tuple[str, ...] = ("none", "may", "encrypt", "dane", "dane-only", "fingerprint",
                               "verify", "secure")
# The queue directories hash_queue_names may name (Config.hash_queue_names): qmgrd's
# message queues but maildrop, and the per-message log directories (the same names as
# qmgrd.spool.queue's MESSAGE_QUEUES and LOG_QUEUES, which this layer may not import).
HASHABLE_QUEUES: tuple[str, ...] = ("incoming", "active", "deferred", "hold", "corrupt",
                                    "bounce", "defer", "trace")
# Postfix queue directories qmgrd does not have (Postfix before 2.2 hashed "flush" by
# default): accepted in hash_queue_names, without effect.
POSTFIX_ONLY_QUEUES: tuple[str, ...] = ("flush", "saved")

_HOSTNAME_RE = re.compile(  # letters, digits, "-", "_" (Postfix valid_hostname)
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")


@dataclass(frozen=True)
class Entry:
    """One main.cf setting: its raw value and the 1-based line its logical line starts on."""

    value: str
    line: int


def logical_lines(text: str, path: str,
                  errors: list[ConfigError] | None = None) -> Iterator[tuple[int, str]]:
    """Yield (first physical line number, logical line) pairs, Postfix readlline style.

    Raises ConfigError when a continuation line has nothing to continue (with ``errors``
    given, the error is appended there and the line skipped instead).
    """
    start = 0
    parts: list[str] = []
    for lineno, physical in enumerate(text.split("\n"), 1):  # only LF ends a line, as in
        # Postfix (str.splitlines would also end one at FF, VT, FS/GS/RS, NEL, U+2028...)
        stripped = physical.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if physical[0].isspace():
            if not parts:
                error = ConfigError("continuation line with nothing before it", path, lineno)
                if errors is None:
                    raise error
                errors.append(error)
                continue
            parts.append(stripped)
            continue
        if parts:
            yield start, " ".join(parts)
        start, parts = lineno, [physical.rstrip()]
    if parts:
        yield start, " ".join(parts)


def parse_main_cf(text: str, path: str, errors: list[ConfigError] | None = None,
                  overridden: list[tuple[int, str, str]] | None = None) -> dict[str, Entry]:
    """Parse main.cf text into {name: Entry}; later definitions win.  Raises ConfigError
    (with ``errors`` given: appends each error there and skips the bad line).  With
    ``overridden``: appends (line, name, value) for each definition that overrides an
    earlier one."""
    values: dict[str, Entry] = {}
    for lineno, line in logical_lines(text, path, errors):
        name, eq, value = line.partition("=")
        name = name.strip()
        problem = ""
        if not eq:
            problem = f'missing \'=\' after parameter name: "{name}"'
        elif not name:
            problem = "missing parameter name before '='"
        elif not NAME_RE.match(name):
            problem = f'bad parameter name: "{name}"'
        if problem:
            if errors is None:
                raise ConfigError(problem, path, lineno)
            errors.append(ConfigError(problem, path, lineno))
            continue
        if overridden is not None and name in values:
            overridden.append((lineno, name, value.strip()))
        values[name] = Entry(value.strip(), lineno)
    return values


# Per-transport parameter suffixes (Postfix: <transport><suffix>, falling back to the
# global parameter, see Config.transport_name), longest first.
TRANSPORT_SUFFIXES: tuple[str, ...] = tuple(sorted((
    "_destination_concurrency_limit", "_destination_recipient_limit",
    "_initial_destination_concurrency", "_destination_concurrency_failed_cohort_limit",
    "_destination_concurrency_positive_feedback",
    "_destination_concurrency_negative_feedback", "_destination_rate_delay",
    "_transport_rate_delay", "_recipient_limit", "_extra_recipient_limit",
    "_recipient_refill_limit", "_recipient_refill_delay", "_delivery_slot_cost",
    "_delivery_slot_loan", "_delivery_slot_discount", "_minimum_delivery_slots",
    "_time_limit",
), key=len, reverse=True))
# per-transport suffixes whose global is not default<suffix> (pipe(8): <transport>_time_limit)
_SUFFIX_GLOBALS = {"_time_limit": "command_time_limit"}


def param_spec(name: str) -> Param | None:
    """The table entry that governs ``name``: its own, or for a per-transport parameter
    ``<transport><suffix>`` (TRANSPORT_SUFFIXES) the global one it falls back to
    (``default<suffix>``, e.g. smtp_destination_recipient_limit ->
    default_destination_recipient_limit).  None for a name no qmgrd program reads."""
    spec = PARAMS.get(name)
    if spec is not None:
        return spec
    for suffix in TRANSPORT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return PARAMS.get(_global_name(suffix))
    return None


def transport_fallback(name: str) -> str | None:
    """For a per-transport parameter that is not in the table (``<transport><suffix>``,
    e.g. smtp_destination_recipient_limit) the global parameter it falls back to
    (default_destination_recipient_limit); None for any other name."""
    if name in PARAMS:
        return None
    for suffix in TRANSPORT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return _global_name(suffix)
    return None


@functools.lru_cache(maxsize=1)
def _hostname() -> str:
    return hostname_default()


def _check_overrides(overrides: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in overrides.items():
        if not NAME_RE.match(name):
            raise ConfigError(f'bad parameter name in override: "{name}"')
        out[name] = str(value)
    return out


class Config:
    """An immutable view of main.cf plus -o overrides, with expansion and typed access.

    Construct with Config.load() or Config.from_text(); the constructor does no I/O.
    """

    def __init__(self, config_directory: str, values: Mapping[str, Entry], path: str,
                 overrides: Mapping[str, str] | None = None) -> None:
        self.config_directory = os.path.abspath(config_directory)
        self.path = path
        self._values = dict(values)
        self.overrides: dict[str, str] = _check_overrides(overrides or {})
        self._cache: dict[str, str] = {}
        self._nesting = 0
        # (line, name, value) of each main.cf line that set a parameter again (load())
        self.overridden: list[tuple[int, str, str]] = []

    # --- construction ------------------------------------------------------------------
    @classmethod
    def load(cls, config_directory: str,
             overrides: Mapping[str, str] | None = None) -> Config:
        """Read ``<config_directory>/main.cf``.  Raises ConfigError (unreadable file,
        invalid UTF-8, syntax error)."""
        config_directory = os.path.abspath(config_directory)
        path = os.path.join(config_directory, "main.cf")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"open {path}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise ConfigError("invalid UTF-8 text", path, line) from None
        overridden: list[tuple[int, str, str]] = []
        cfg = cls(config_directory, parse_main_cf(text, path, None, overridden), path,
                  overrides)
        cfg.overridden = overridden
        return cfg

    @classmethod
    def load_lenient(cls, config_directory: str) -> tuple[Config, list[ConfigError]]:
        """Read ``<config_directory>/main.cf`` skipping what cannot be parsed: bad lines
        are left out (invalid UTF-8 is replaced); returns the Config of the good lines
        and the errors found.  For tools that must work on a broken main.cf (finding the
        queue directory of a running master).  Raises ConfigError (unreadable file)."""
        config_directory = os.path.abspath(config_directory)
        path = os.path.join(config_directory, "main.cf")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"open {path}: {e.strerror}") from None
        errors: list[ConfigError] = []
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(ConfigError("invalid UTF-8 text", path,
                                      data[: e.start].count(b"\n") + 1))
            text = data.decode("utf-8", "replace")
        values = parse_main_cf(text, path, errors)
        return cls(config_directory, values, path), errors

    @classmethod
    def from_text(cls, text: str, config_directory: str,
                  overrides: Mapping[str, str] | None = None, path: str = "main.cf") -> Config:
        """Build a Config from main.cf text (tests, tools).  Raises ConfigError."""
        return cls(config_directory, parse_main_cf(text, path), path, overrides)

    def with_overrides(self, overrides: Mapping[str, str]) -> Config:
        """A new Config with ``overrides`` added on top of this one's (they win)."""
        merged = dict(self.overrides)
        merged.update(overrides)
        return Config(self.config_directory, self._values, self.path, merged)

    # --- raw access --------------------------------------------------------------------
    def is_set(self, name: str) -> bool:
        """True if ``name`` is given in main.cf or as an override."""
        return name in self.overrides or name in self._values

    def names(self) -> list[str]:
        """Sorted names of all table parameters, main.cf settings and overrides."""
        return sorted(set(PARAMS) | set(self._values) | set(self.overrides))

    def get_raw(self, name: str) -> str:
        """The unexpanded value: override, main.cf, computed default, table default, ""."""
        return self._raw(name, [])

    def _raw(self, name: str, stack: list[str]) -> str:
        if name == "config_directory":
            return self.config_directory
        if name in self.overrides:
            return self.overrides[name]
        entry = self._values.get(name)
        if entry is not None:
            return entry.value
        if name == "myhostname":
            return _hostname()
        if name == "mydomain":
            return domain_default(self._lookup("myhostname", stack))
        param = PARAMS.get(name)
        return param.default if param is not None else ""

    def _default_text(self, name: str) -> str:
        if name == "config_directory":
            return self.config_directory
        if name == "myhostname":
            return _hostname()
        if name == "mydomain":
            return domain_default(_hostname())
        return PARAMS[name].default

    def _where(self, name: str) -> tuple[str | None, int | None, str]:
        """(path, line, label) locating where a parameter's value came from."""
        if name in self.overrides and name != "config_directory":
            return None, None, f"-o {name}={self.overrides[name]}: "
        entry = self._values.get(name)
        if entry is not None and name != "config_directory":
            return self.path, entry.line, ""
        return None, None, ""

    def _error(self, name: str, message: str) -> ConfigError:
        path, line, label = self._where(name)
        return ConfigError(label + message, path, line)

    def error(self, name: str, message: str) -> ConfigError:
        """A ConfigError about parameter ``name`` located where its value came from:
        ``"<main.cf>, line <n>: <message>"``, ``"-o name=value: <message>"`` or just
        the message (a default).  Returned, not raised."""
        return self._error(name, message)

    # --- expansion ---------------------------------------------------------------------
    def get(self, name: str) -> str:
        """The fully expanded value of ``name`` ("" if unknown).  Raises ConfigError on an
        expansion loop or a malformed ``${...}``."""
        return self._lookup(name, [])

    def _lookup(self, name: str, stack: list[str]) -> str:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if name in stack:
            chain = " -> ".join(stack[stack.index(name):] + [name])
            raise self._error(name, f"expansion loop in parameter {name}: {chain}")
        if len(stack) > _MAX_DEPTH:
            raise self._error(stack[0], f"unreasonable macro nesting at parameter {name}")
        raw = self._raw(name, stack)
        param = PARAMS.get(name)
        if param is not None and param.raw and name not in self.overrides:
            value = raw
        else:
            value = self._expand(raw, stack + [name])
        self._cache[name] = value
        return value

    def expand(self, text: str) -> str:
        """Expand ``$name`` references in arbitrary text against this Config."""
        return self._expand(text, [])

    def _expand(self, text: str, stack: list[str]) -> str:
        if "$" not in text:
            return text
        if self._nesting > _MAX_DEPTH:
            raise self._error(stack[-1] if stack else "", "unreasonable macro nesting")
        self._nesting += 1
        try:
            return self._expand_text(text, stack)
        finally:
            self._nesting -= 1

    def _expand_text(self, text: str, stack: list[str]) -> str:
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            j = text.find("$", i)
            if j < 0:
                out.append(text[i:])
                break
            out.append(text[i:j])
            i = j + 1
            if i >= n:
                out.append("$")
                break
            c = text[i]
            if c == "$":
                out.append("$")
                i += 1
            elif c in "{(":
                k = _match(text, i)
                if k < 0:
                    owner = stack[-1] if stack else ""
                    close = "}" if c == "{" else ")"
                    raise self._error(owner, f"missing '{close}' in \"{text}\"")
                out.append(self._braced(text[i + 1:k], stack))
                i = k + 1
            else:
                m = _MACRO_NAME_RE.match(text, i)
                if m is None:
                    out.append("$")
                    continue
                out.append(self._lookup(m.group(0), stack))
                i = m.end()
        return "".join(out)

    def _braced(self, inner: str, stack: list[str]) -> str:
        owner = stack[-1] if stack else ""
        m = _BRACED_RE.match(inner)
        if m is None:
            raise self._error(owner, f'unsupported expression "${{{inner}}}"')
        name = m.group(1)
        rest = inner[m.end():]
        if not rest:
            return self._lookup(name, stack)
        op, arg = rest[0], rest[1:]
        if op not in "?:":
            raise self._error(owner, f'unsupported expression "${{{inner}}}"')
        present = self._lookup(name, stack) != ""
        if arg.lstrip().startswith("{"):
            # Postfix 3.0 (postconf(5)): ${name?{value}}, ${name:{value}} and
            # ${name?{value1}:{value2}}, white space allowed around the braced parts
            first, second = _split_alternatives(arg)
            if first is None or (op == ":" and second is not None):
                raise self._error(owner, f'bad conditional "${{{inner}}}"')
            if op == "?" and second is not None:
                return self._expand(first if present else second, stack)
            arg = first
        if (op == "?") == present:
            return self._expand(arg, stack)
        return ""

    # --- typed access ------------------------------------------------------------------
    def _convert(self, name: str, kind: str, spec: Param | None) -> int:
        value = self.get(name)
        unit = spec.unit if spec is not None and spec.unit else "s"
        try:
            if kind == "time":
                result = parse_time(value, unit)
            elif kind == "size":
                result = parse_size(value)
            else:
                result = parse_int(value)
        except ValueError as e:
            raise self._error(name, f'{e} for parameter {name}: "{value}"') from None
        # the table's range, within the C type Postfix keeps the value in (an int, or a
        # long for message_size_limit and the like: params.value_range), whether the
        # name is in the table or not (Postfix: fatal "bad numerical configuration")
        lo, hi = value_range(kind, spec)
        if result < lo:
            raise self._error(name, f'invalid {name} parameter value "{value}": '
                              f"minimum is {lo}{'s' if kind == 'time' else ''}")
        if result > hi:
            raise self._error(name, f'invalid {name} parameter value "{value}": '
                              f"maximum is {hi}{'s' if kind == 'time' else ''}")
        return result

    def get_int(self, name: str) -> int:
        """Integer value, range-checked against the table.  Raises ConfigError."""
        return self._convert(name, "int", PARAMS.get(name))

    def get_time(self, name: str) -> int:
        """Time value in seconds (units s m h d w; bare number = the table's unit).
        Raises ConfigError naming the parameter (and main.cf line) when bad/out of range."""
        return self._convert(name, "time", PARAMS.get(name))

    def get_size(self, name: str) -> int:
        """Size in bytes.  Raises ConfigError."""
        return self._convert(name, "size", PARAMS.get(name))

    def get_bool(self, name: str) -> bool:
        """yes/no/true/false, any case.  Raises ConfigError."""
        value = self.get(name)
        try:
            return parse_bool(value)
        except ValueError as e:
            raise self._error(name, f'{e} for parameter {name}: "{value}"') from None

    def get_list(self, name: str) -> list[str]:
        """Value split on commas and whitespace (``{ ... }`` groups kept whole)."""
        return split_list(self.get(name))

    def queue_directory(self) -> str:
        """The expanded queue_directory, normalised as os.path.abspath does (no "." or
        ".." parts, no trailing "/").  Every program that uses the queue directory asks
        here rather than ``get("queue_directory")``.

        Postfix refuses an empty value (a string parameter of minimum length 1: fatal
        "bad string length"); a relative path would be taken from whatever directory a
        tool is started in, so it is refused too.

        Raises:
            ConfigError: the value is empty or relative after expansion - located where
                queue_directory is set: ``"<main.cf>, line <n>: bad queue_directory
                parameter value "spool": not an absolute path"``, or ``"-o
                queue_directory=spool: ..."`` (the raw value is quoted too when it
                differs: ``"" (from "$spool")``); or the expansion fails (loop,
                malformed ``${...}``).
        """
        return self._absolute_path("queue_directory", empty_ok=False)

    def data_directory(self) -> str:
        """The expanded data_directory (where the master keeps master.lock), an absolute
        path normalised as queue_directory() gives it.  Every program that uses it asks
        here rather than ``get("data_directory")``.

        Postfix refuses an empty value (a string parameter of minimum length 1) and
        works in data_directory by absolute path only; a relative path would be taken
        from whatever directory a program is started in (two masters of one
        configuration would not share their lock), so it is refused too.

        Raises:
            ConfigError: the value is empty or relative after expansion, located as
                for queue_directory(): ``"<main.cf>, line <n>: bad data_directory
                parameter value "lib": not an absolute path"``; or the expansion fails.
        """
        return self._absolute_path("data_directory", empty_ok=False)

    def maillog_file(self) -> str:
        """The expanded maillog_file: "" (the default) for syslog, else an absolute path
        normalised as queue_directory() gives it.  Every program that opens the log asks
        here rather than ``get("maillog_file")``.

        An empty value means syslog, as in Postfix (maillog_file unset: no postlogd
        file).  A relative path would name a different file for each process, each
        opening it from its own working directory, so it is refused.

        Raises:
            ConfigError: the value is relative after expansion, located as for
                queue_directory(): ``"<main.cf>, line <n>: bad maillog_file parameter
                value "maillog": not an absolute path"``; or the expansion fails.
        """
        return self._absolute_path("maillog_file", empty_ok=True)

    def hash_queue_names(self) -> list[str]:
        """The queue directories named by hash_queue_names, lower case (Postfix matches
        them case-insensitively), in the order given.  Every program that lays out the
        queue asks here rather than ``get_list("hash_queue_names")``.

        maildrop is refused: Postfix's pickup reads maildrop/ flat (scan_dir_next, no
        hash directories) while postdrop would write into hash directories, and so do
        qmgrd's pickup and qmgr-sendmail - mail would stay in maildrop unseen.  A name
        that is no queue directory (a typo such as "deffered" would silently leave
        deferred/ flat; "public", "pid") is refused too, where Postfix ignores it;
        Postfix's own names that qmgrd has no directory for (POSTFIX_ONLY_QUEUES:
        flush, saved) are accepted and do nothing.

        Raises:
            ConfigError: located where hash_queue_names is set: ``"<main.cf>, line <n>:
                bad hash_queue_names parameter value "deferred, maildrop": maildrop
                cannot be hashed (pickup reads maildrop/ without hash directories)"``,
                ``"... : "deffered" is not a queue directory (incoming, active, ...)"``,
                or ``"-o hash_queue_names=...: ..."`` for an override; or the expansion
                fails.
        """
        value = self.get("hash_queue_names")
        names = [name.lower() for name in split_list(value)]
        for name in names:
            if name in HASHABLE_QUEUES or name in POSTFIX_ONLY_QUEUES:
                continue
            if name == "maildrop":
                why = ("maildrop cannot be hashed (pickup reads maildrop/ without hash "
                       "directories)")
            else:
                why = (f'"{name}" is not a queue directory that can be hashed '
                       f"({', '.join(HASHABLE_QUEUES)})")
            raise self._error("hash_queue_names",
                              f'bad hash_queue_names parameter value "{value}": {why}')
        return names

    def _absolute_path(self, name: str, empty_ok: bool) -> str:
        """The expanded value of path parameter ``name``, normalised (os.path.abspath);
        "" when it is empty and ``empty_ok``.  Raises ConfigError (empty, relative)."""
        value = self.get(name)
        if os.path.isabs(value):
            return os.path.abspath(value)
        if not value and empty_ok:
            return ""
        raw = self.get_raw(name)
        shown = f'"{value}"' if raw == value else f'"{value}" (from "{raw}")'
        why = "empty; it must be an absolute path" if not value else "not an absolute path"
        raise self._error(name, f"bad {name} parameter value {shown}: {why}")

    # --- per-transport parameters ------------------------------------------------------
    def transport_name(self, transport: str, suffix: str) -> str:
        """The parameter used for ``transport`` + ``suffix``: ``<transport><suffix>`` if set
        or in the table, else ``default<suffix>`` (or ``<suffix>`` without its leading
        underscore when that is the global name, e.g. initial_destination_concurrency)."""
        specific = transport + suffix
        if self.is_set(specific) or specific in PARAMS:
            return specific
        return _global_name(suffix)

    def _transport_spec(self, name: str, suffix: str) -> Param | None:
        return PARAMS.get(name) or PARAMS.get(_global_name(suffix))

    def transport_param(self, transport: str, suffix: str) -> str:
        """Expanded value of the per-transport parameter (see transport_name)."""
        return self.get(self.transport_name(transport, suffix))

    def transport_int(self, transport: str, suffix: str) -> int:
        """Integer per-transport parameter, range-checked like its global default."""
        name = self.transport_name(transport, suffix)
        return self._convert(name, "int", self._transport_spec(name, suffix))

    def transport_time(self, transport: str, suffix: str) -> int:
        """Time per-transport parameter in seconds (unit of the global default)."""
        name = self.transport_name(transport, suffix)
        return self._convert(name, "time", self._transport_spec(name, suffix))

    # --- whole-config operations -------------------------------------------------------
    def check(self) -> None:
        """Expand every parameter and convert every typed parameter (the table's, and
        per-transport ones such as smtp_destination_recipient_limit by their global's
        type, see param_spec), then the paths (queue_directory(), data_directory(),
        maillog_file()), hash_queue_names(), the host name, protocols and networks (_check_identity) and
        relayhost (_check_nexthops), smtp_tls_security_level (_check_tls_level),
        smtpd_forbid_bare_newline (_check_bare_newline) and mailbox_delivery_lock
        (_check_mailbox_lock); raise
        the first ConfigError found
        (like a daemon's start-up checks).  Names are checked sorted."""
        for name in self.names():
            self.get(name)
            param = param_spec(name)
            if param is None:
                continue
            if param.type == "bool":
                self.get_bool(name)
            elif param.type in ("int", "time", "size"):
                self._convert(name, param.type, param)
        self.queue_directory()
        self.data_directory()
        self.maillog_file()
        self.hash_queue_names()
        self._check_identity()
        self._check_nexthops()
        self._check_tls_level()
        self._check_bare_newline()
        self._check_mailbox_lock()

    def _check_mailbox_lock(self) -> None:
        """Each name of mailbox_delivery_lock must be a lock method (MAILBOX_LOCKS, any
        case): Postfix's local(8) exits fatal on any other (name_mask: ``unknown
        mailbox_delivery_lock value "x" in "..."``); the local agent would otherwise
        skip the name, and ``dotlok`` or ``foo`` alone would write mailboxes under no
        lock at all.  Raises ConfigError."""
        value = self.get("mailbox_delivery_lock")
        for name in split_list(value):
            if name.lower() not in MAILBOX_LOCKS:
                raise self._error("mailbox_delivery_lock", "unknown mailbox_delivery_lock "
                                  f'value "{name}" in "{value}"')

    def _check_bare_newline(self) -> None:
        """smtpd_forbid_bare_newline must be one of Postfix's values (BARE_NEWLINE_MODES:
        normalize, yes, reject, no; any case): Postfix's smtpd exits fatal on any other
        (``bad parameter value: 'smtpd_forbid_bare_newline = x'``), so a typo in a
        hardening setting is refused at start and reload, never silently ignored.
        Raises ConfigError."""
        value = self.get("smtpd_forbid_bare_newline").strip()
        if value.lower() not in BARE_NEWLINE_MODES:
            raise self._error("smtpd_forbid_bare_newline", "bad parameter value: "
                              f"'smtpd_forbid_bare_newline = {value}' (one of: "
                              f'{", ".join(BARE_NEWLINE_MODES)})')

    def _check_tls_level(self) -> None:
        """smtp_tls_security_level must be one of Postfix's levels (empty = none; the
        smtp client exits fatal on any other value: a typo must neither send in the clear
        what should be encrypted nor start a client that dies). Raises ConfigError."""
        level = self.get("smtp_tls_security_level").strip().lower()
        if level and level not in TLS_LEVELS:
            raise self._error("smtp_tls_security_level", "invalid TLS security level "
                              f'"{level}" in smtp_tls_security_level (one of: '
                              f'{", ".join(TLS_LEVELS)})')

    def _check_identity(self) -> None:
        """myhostname must be a host name (it is the SMTP greeting, Message-ID and
        Received: domain, the sender domain of local mail: Postfix refuses to start
        without a valid one) and inet_protocols must name known protocols (Postfix:
        fatal "unknown inet_protocols value").  Raises ConfigError."""
        host = self.get("myhostname")
        if not _HOSTNAME_RE.fullmatch(host) or len(host) > 255:
            raise self._error("myhostname", f'bad myhostname parameter value "{host}": '
                              "not a valid host name")
        for proto in self.get_list("inet_protocols"):
            if proto.lower() not in ("all", "ipv4", "ipv6"):
                raise self._error("inet_protocols", f'unknown inet_protocols value "{proto}"'
                                  " (all, ipv4 or ipv6)")
        for name in NETWORK_LIST_PARAMS:  # Postfix: a bad network is fatal
            for entry in self.get_list(name):
                problem = network_problem(entry)
                if problem is not None:
                    raise self._error(name, f"parameter {name}: {problem}")

    def _check_nexthops(self) -> None:
        """Each parameter of NEXTHOP_PARAMS (relayhost), when not empty, must be a valid
        smtp destination (master.config.nexthop: host, [host], host:port, [host]:port,
        [ipv6:addr], a list of those): a port outside 1-65535 or not a number or known
        service, an empty host or unbalanced brackets would only be found by the smtp
        client, deferring all mail that goes there (Postfix's client: fatal "bad network
        port" and the like).  Raises ConfigError ``"<main.cf>, line <n>: bad relayhost
        parameter value "[x]:99999": bad port number "99999" (1-65535)"``."""
        for name in NEXTHOP_PARAMS:
            value = self.get(name)
            if not value.strip():
                continue
            problem = nexthop_problem(value)
            if problem is not None:
                raise self._error(name, f'bad {name} parameter value "{value}": {problem}')

    def dump(self, defaults: bool = False, nondefault: bool = False,
             expand: bool = False, only: Iterable[str] | None = None) -> list[str]:
        """``name = value`` lines sorted by name, like postconf.

        defaults: table defaults (postconf -d); nondefault: only main.cf settings and
        overrides (postconf -n); neither: every parameter's effective value (postconf).
        expand: print expanded values (postconf -x). only: just these names (the others
        are not expanded, so a bad value elsewhere does not stop them). Raises
        ValueError if both flags, ConfigError for a value that does not expand.
        """
        if defaults and nondefault:
            raise ValueError("defaults and nondefault are mutually exclusive")
        if defaults:
            names = sorted(PARAMS)
        elif nondefault:
            names = sorted(set(self._values) | set(self.overrides))
        else:
            names = self.names()
        if only is not None:
            wanted = set(only)
            names = [n for n in names if n in wanted]
        lines = []
        for name in names:
            if defaults:
                value = self._default_text(name)
                if expand:
                    value = Config(self.config_directory, {}, self.path).get(name)
            else:
                value = self.get(name) if expand else self.get_raw(name)
            lines.append(f"{name} = {value}" if value else f"{name} =")
        return lines


def _global_name(suffix: str) -> str:
    if suffix in _SUFFIX_GLOBALS:
        return _SUFFIX_GLOBALS[suffix]
    default = "default" + suffix
    if default not in PARAMS and suffix.lstrip("_") in PARAMS:
        return suffix.lstrip("_")
    return default


def _match(text: str, i: int) -> int:
    """Index of the bracket closing the one at text[i], or -1."""
    opening = text[i]
    closing = "}" if opening == "{" else ")"
    depth = 0
    for k in range(i, len(text)):
        if text[k] == opening:
            depth += 1
        elif text[k] == closing:
            depth -= 1
            if depth == 0:
                return k
    return -1


def _split_alternatives(arg: str) -> tuple[str | None, str | None]:
    """Parse ``{first}`` or ``{first}:{second}`` (white space allowed around the parts):
    (first, second or None); (None, None) when malformed."""
    s = arg.strip()
    k = _match(s, 0)
    if k < 0:
        return None, None
    yes = s[1:k]
    rest = s[k + 1:].strip()
    if not rest:
        return yes, None
    if not rest.startswith(":"):
        return None, None
    rest = rest[1:].strip()
    if not rest.startswith("{"):
        return None, None
    k2 = _match(rest, 0)
    if k2 < 0 or rest[k2 + 1:].strip():
        return None, None
    return yes, rest[1:k2]
