"""master.config.validate - the check of main.cf and master.cf before a start or reload.

SYNOPSIS
    from master.config.validate import load_configuration
    cfg, services = load_configuration("/etc/qmgrd", warn=print)   # raises ConfigError

DESCRIPTION
    Parsing (master.config.maincf, master.config.mastercf) checks syntax only; a value
    that parses but is wrong (``maximal_queue_lifetime = 5q``, ``myhostname =
    $myhostname``, a ``-o`` override with a bad value, a command module that does not
    exist, an inet port that is not in /etc/services) would only be found by the child
    that reads it, after the master has started.  This module finds all of that up
    front, so that ``qmgr-master start`` refuses to start and a reload keeps the running
    configuration:

    * main.cf: every parameter expanded and every typed one converted (Config.check:
      expansion loops, bad numbers, times, sizes, booleans, ranges; each mynetworks,
      smtpd_client_event_limit_exceptions and smtpd_forbid_bare_newline_exclusions
      entry an address, a network without host bits or a table -
      master.config.netlist, the parser smtpd uses too; relayhost an
      smtp destination - master.config.nexthop, the parser the smtp client uses too;
      smtp_tls_security_level one of Postfix's levels; smtpd_forbid_bare_newline one of
      normalize, yes, reject, no; smtpd_forbid_bare_newline_reject_code 500-599).
      The nexthop of default_transport and relay_transport (``smtp:[host]:port``) is
      checked the same way when that transport is an smtp service of master.cf
      (check_transport_nexthops).
    * master.cf, per service: the Config its children will see (main.cf plus
      service_name, process_name and its ``-o`` overrides) checked the same way; the
      command's module exists and can be run with ``python -m`` (found with
      importlib's path finder - never imported, no code of it runs); an inet
      service's port is a number (1-65535) or a name in /etc/services, and its host
      (or each inet_interfaces address when it has none) an IP address or a name that
      resolves; the qmgr service is of type fifo (Postfix's own master.cf has ``qmgr
      unix``).  For an smtpd service, two settings without which smtpd could take no
      mail at all (it would exit fatal at every start while the master throttles it):
      smtpd_relay_restrictions or smtpd_recipient_restrictions must hold a working
      open-relay guard (reject_unauth_destination, defer_unauth_destination, reject,
      defer or defer_if_permit: master.config.relayguard, the very test smtpd applies) -
      else ``"<main.cf>, line <n>: in parameter smtpd_relay_restrictions or
      smtpd_recipient_restrictions, specify at least one working instance of: ..."``,
      or ``"<master.cf>, line <n>: -o name=value: in parameter ..."`` when the
      service's override is to blame; and ``smtpd_tls_security_level = encrypt``
      needs a readable ``smtpd_tls_cert_file`` (and key file).  A pipe service's
      command attributes (flags=, user=, argv=, ...) are parsed as its children parse
      them (master.config.pipeattr): a bad one is ``"<master.cf>, line <n>: service
      <name>: <Postfix's pipe(8) message>"``, e.g. ``unknown flag: Z (ignored)`` or
      ``user= command-line attribute specifies root privileges``; an unknown macro in
      its argv is a warning (Postfix's pipe defers such mail: so does qmgrd's).  Under a
      root master, a pipe service must have unpriv ``n``: ``service <name> requires
      privileged operation (set its unpriv column to n)``, and so must a local
      service (Postfix's local(8) is privileged too).  A local service's
      ``mailbox_size_limit`` must not be below its ``message_size_limit`` (nor set
      with an unlimited one), as Postfix's local(8) requires: ``"<main.cf>, line <n>:
      mailbox_size_limit is smaller than message_size_limit"``.
    * lookup tables: every table named by a parameter whose tables a qmgrd program
      opens (TABLE_PARAMS: ``transport_maps``, read by the qmgr) is read the way the
      program will read it (master.config.tables); a missing or unreadable file or an
      unsupported type is an error naming the parameter and the table: ``"<main.cf>,
      line <n>: parameter transport_maps: hash:/x: No such file or directory"``.  A
      service's ``-o`` override of such a parameter is checked too.  (Otherwise the
      qmgr dies at start with that error and nothing is delivered.)  A bad line in a
      table file is not an error: the qmgr skips it with a warning, as Postfix's
      postmap does, so reload reports it through ``warn`` (``<path>, line <n>:
      expected format: key whitespace value -- ignoring this line``) and goes on - a
      refusal would not stop the running qmgr from reading the file anyway.
    * mail_owner, only when this process runs as root (otherwise every process runs as
      the invoking user and mail_owner is not used - master.server.jail): the account
      must exist and have neither uid 0 nor gid 0 - ``"<main.cf>, line <n>: parameter
      mail_owner: unknown user name value: x"``, ``"... user root has privileged user
      ID"``, ``"... has privileged group ID"`` (Postfix's wording after the line, or
      Postfix's ``"file <main.cf>: ..."`` for the default; the same as the master's own
      check at start-up).  default_privs (Postfix default ``nobody``, the rights the
      local agent delivers with for names without an account and for root) is checked
      the same way, also only as root: ``"... parameter default_privs: unknown user name
      value: x"`` (Postfix checks it in every program; here the master and local do).
    * maillog_file (when not syslog) can be opened for appending: an existing file
      opens, or its directory exists and is writable - no directory is made for it, as
      Postfix's postlogd makes none (check_maillog): ``"<main.cf>, line <n>: cannot
      open maillog_file "/x/maillog": No such file or directory (its directory /x does
      not exist; it is not created)"``.  A service whose children would open another
      file (``-o maillog_file=...``) is checked the same way: ``"<master.cf>, line <n>:
      -o maillog_file=/x/maillog: cannot open maillog_file ..."``.
    * ``-o name=value`` with a name no qmgrd program reads (not in the parameter table,
      not a per-transport parameter, not set in main.cf, not referred to as ``$name``
      by main.cf or the service's other overrides) is accepted, as Postfix does, but
      reported through ``warn``: ``<master.cf>, line <n>: unused parameter: -o
      name=value``.  Duplicate services are reported the same way (mastercf).

    Errors name the file and line: main.cf problems ``"<main.cf>, line <n>: ..."``,
    service problems ``"<master.cf>, line <n>: ..."`` (an override's value:
    ``"<master.cf>, line <n>: -o name=value: bad time value for parameter name: ..."``).

PUBLIC API
    load_configuration(config_directory, warn=None, euid=None, *, modules=True,
                       logfile=True) -> (Config, list[Service])
        Config.load + Config.check + check_maillog + check_tables + check_mail_owner +
        check_default_privs + load_master_cf + check_services + check_transport_nexthops;
        raises ConfigError.
        ``euid`` (default: ours) decides whether mail_owner and default_privs are
        checked (only for 0);
        ``modules``/``logfile`` False leave out the module and maillog_file checks (of
        main.cf and of the services' overrides).
    check_configuration(cfg, warn=None, euid=None, *, modules=True, logfile=True,
                        master_cf=True) -> list[Service]      the same checks on a parsed Config (qmgr-ctl config
                              NAME=VALUE checks the text it would write); ConfigError
    check_maillog(cfg) -> None                                raises ConfigError
    check_tables(cfg, names=TABLE_PARAMS, warn=None) -> None  raises ConfigError
    check_mail_owner(cfg, euid=None) -> None                  raises ConfigError
    check_default_privs(cfg, euid=None) -> None               raises ConfigError
    check_transport_nexthops(cfg, services) -> None           raises ConfigError
    TRANSPORT_NEXTHOP_PARAMS: tuple[str, ...]  default_transport, relay_transport
    TABLE_PARAMS: tuple[str, ...]       parameters whose tables qmgrd programs open
    check_services(cfg, services, warn=None, *, modules=True, logfile=True) -> None
    check_service(cfg, service, warn=None, *, modules=True, logfile=True) -> None
                                                             both raise ConfigError
    module_problem(module) -> str | None    why ``python -m module`` cannot work, or None
    inet_hosts(cfg) -> list[str]            bind addresses of inet services without a host
                                            ("" = every address); raises ConfigError
    unused_parameters(cfg, services=()) -> list[str]
                                            postconf's "unused parameter" warnings for
                                            main.cf (qmgr-ctl config prints them)
    ``warn``: Callable[[str], None] | None, gets each warning without "warning: ".

Nothing here logs; the callers (master.cli, master.daemon.master) print or log.
"""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import os
import pkgutil
import re
import socket
from collections.abc import Callable, Sequence

from master.config.errors import ConfigError
from master.config.maincf import Config, param_spec
from master.config.mastercf import BUILTIN_MODULES, NO_CHROOT, Service, load_master_cf
from master.config.nexthop import nexthop_problem
from master.config.params import EVENT_LOOPS
from master.config.pipeattr import PipeAttrError, parse_pipe_args, unknown_macros
from master.config.relayguard import RELAY_PARAMS, is_guarded, open_relay_problem
from master.config.tables import TableError, read_table
from master.server import jail

__all__ = [
    "TABLE_PARAMS",
    "check_configuration",
    "check_default_privs",
    "check_mail_owner",
    "check_maillog",
    "check_service",
    "check_services",
    "check_tables",
    "check_transport_nexthops",
    "inet_hosts",
    "load_configuration",
    "module_problem",
    "unused_parameters",
]

Warn = Callable[[str], None]

# "transport:nexthop" parameters whose nexthop the qmgr gives to that transport (the
# smtp client parses it as a destination when the transport is an smtp service)
TRANSPORT_NEXTHOP_PARAMS: tuple[str, ...] = ("default_transport", "relay_transport")
SMTP_MODULE = "transports.smtp"
PIPE_MODULE = "transports.pipe"
LOCAL_MODULE = "transports.local"

# Parameters naming lookup tables checked before a start or reload (qmgrd.maps): the
# qmgr's transport_maps, which it cannot run without.  alias_maps and
# local_recipient_maps are read by local and smtpd, which defer (4.3.0) while a table
# cannot be read, and whose Postfix default names nis:, which qmgrd does not read.
TABLE_PARAMS: tuple[str, ...] = ("transport_maps",)


def load_configuration(config_directory: str, warn: Warn | None = None,
                       euid: int | None = None, *, modules: bool = True,
                       logfile: bool = True) -> tuple[Config, list[Service]]:
    """Load and fully check main.cf and master.cf of ``config_directory`` (module
    docstring); ``euid`` (default: ours) is the user the master runs as.  ``modules``
    False leaves out whether each service's module can be found (module_problem), and
    ``logfile`` False whether maillog_file can be opened (check_maillog): both depend on
    the environment, and a running master checks them in its own on reload (so that its
    refusal is logged in the log it keeps).  Raises ConfigError, naming file and line."""
    cfg = Config.load(config_directory)
    return cfg, check_configuration(cfg, warn, euid, modules=modules, logfile=logfile)


def check_configuration(cfg: Config, warn: Warn | None = None, euid: int | None = None,
                        *, modules: bool = True, logfile: bool = True,
                        master_cf: bool = True) -> list[Service]:
    """The checks of load_configuration on an already parsed main.cf ``cfg`` (e.g. the
    text ``qmgr-ctl config NAME=VALUE`` would write) and the master.cf of its
    config_directory; returns master.cf's services.  ``master_cf`` False: main.cf's
    checks only (master.cf is not read; no services, []).  Raises ConfigError."""
    cfg.check()
    if logfile:
        check_maillog(cfg)
    if warn is not None:
        _warn_duplicates(cfg, warn)
    check_tables(cfg, warn=warn)
    check_event_loop(cfg)
    check_mail_owner(cfg, euid)
    check_default_privs(cfg, euid)
    if not master_cf:
        return []
    services = load_master_cf(os.path.join(cfg.config_directory, "master.cf"), cfg, warn)
    check_services(cfg, services, warn, modules=modules, logfile=logfile)
    check_transport_nexthops(cfg, services)
    return services


def check_maillog(cfg: Config) -> None:
    """maillog_file, when set, must be a file this process can open for appending: an
    existing one is opened (non-blocking, at once closed; nothing is written), a missing
    one needs an existing, writable directory.  No directory is created - Postfix's
    postlogd creates none either: a typo, or a directory meant not to exist (mail_owner's
    home), must not be made by root - so the master, which opens the log at start and
    reload (master.log.setup), would fail; it refuses the configuration instead (a
    reload keeps the running one and the log it has).

    Raises:
        ConfigError: ``"<main.cf>, line <n>: cannot open maillog_file
            "/nonexistent/dir/maillog": No such file or directory (its directory
            /nonexistent/dir does not exist; it is not created)"``; or the value is
            relative or cannot be expanded (Config.maillog_file).
    """
    path = cfg.maillog_file()
    if not path:
        return  # syslog
    problem = _maillog_problem(path)
    if problem is not None:
        raise _param_error(cfg, "maillog_file",
                           f'cannot open maillog_file "{path}": {problem}')


def _maillog_problem(path: str) -> str | None:
    """Why ``path`` cannot be opened for appending (created if missing), or None."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            return (f"{exc.strerror} (its directory {parent} does not exist; it is not "
                    "created)")
        if not os.access(parent, os.W_OK):
            return f"cannot create it: {os.strerror(errno.EACCES)} ({parent})"
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    return None


def check_transport_nexthops(cfg: Config, services: Sequence[Service]) -> None:
    """The nexthop of each TRANSPORT_NEXTHOP_PARAMS value ``transport:nexthop`` whose
    transport is an smtp service of ``services`` (``relay unix ... smtp``) must be a
    valid smtp destination, as relayhost (master.config.nexthop; Config.check); an
    other transport's nexthop (``error:5.0.0 text``) is its own business.  The qmgr
    services' ``-o`` overrides of those parameters are checked too.

    Raises:
        ConfigError: ``"<main.cf>, line <n>: bad default_transport parameter value
            "smtp:[x]:99999": nexthop "[x]:99999": bad port number "99999"
            (1-65535)"``, or ``"<master.cf>, line <n>: -o default_transport=...:
            ..."`` for a qmgr service's override.
    """
    smtp = {svc.name for svc in services if svc.module == SMTP_MODULE}
    if not smtp:
        return
    configs: list[tuple[Config, Service | None]] = [(cfg, None)]
    configs += [(svc.child_config(cfg), svc) for svc in services
                if svc.module == "qmgrd.qmgr"
                and any(name in svc.overrides for name in TRANSPORT_NEXTHOP_PARAMS)]
    for child, svc in configs:
        for name in TRANSPORT_NEXTHOP_PARAMS:
            value = child.get(name)
            transport, sep, nexthop = value.partition(":")  # as the qmgr's resolver
            if not sep or not nexthop.strip() or transport.strip() not in smtp:
                continue
            problem = nexthop_problem(nexthop.strip())
            if problem is None:
                continue
            err = _param_error(child, name, f'bad {name} parameter value "{value}": '
                               f'nexthop "{nexthop.strip()}": {problem}')
            if err.path is None and svc is not None:  # "-o name=value: ...": its line
                raise ConfigError(err.message, svc.path or None, svc.line or None)
            raise err


def _warn_duplicates(cfg: Config, warn: Warn) -> None:
    """A parameter set twice in main.cf: the later line wins, and the earlier one is
    named, as Postfix's configuration reader does (``overriding earlier entry``)."""
    for lineno, name, value in cfg.overridden:
        warn(f"{cfg.path}, line {lineno}: overriding earlier entry: {name}={value}")


def check_tables(cfg: Config, names: Sequence[str] = TABLE_PARAMS,
                 warn: Warn | None = None) -> None:
    """Read every table each parameter of ``names`` lists (module docstring).  Raises
    ConfigError ``"<where the value is set>: parameter <name>: <table problem>"``."""
    for name in names:
        for spec in cfg.get_list(name):
            try:
                read_table(spec, warn)
            except TableError as exc:
                raise _param_error(cfg, name, f"parameter {name}: {exc}") from None


def check_event_loop(cfg: Config) -> None:
    """async_event_loop must name an event loop the asyncio services know
    (master.config.params.EVENT_LOOPS). Raises ConfigError ``"<main.cf>, line <n>:
    parameter async_event_loop: unknown event loop "x" (expected uvloop or asyncio)"``."""
    value = cfg.get("async_event_loop").strip().lower()
    if value not in EVENT_LOOPS:
        raise _param_error(cfg, "async_event_loop",
                           f'parameter async_event_loop: unknown event loop "{value}" '
                           f'(expected {" or ".join(EVENT_LOOPS)})')


def check_mail_owner(cfg: Config, euid: int | None = None) -> None:
    """mail_owner must exist and be unprivileged when the master runs as root (``euid``,
    default ours, is 0); master.server.jail.lookup_mail_owner.  Raises ConfigError
    ``"<main.cf>, line <n>: parameter mail_owner: ..."`` (``"file <main.cf>: ..."`` for
    the default)."""
    try:
        jail.lookup_mail_owner(cfg, euid)
    except jail.OwnerError as exc:  # the wording of the master's own (start-up) check
        raise ConfigError(str(exc)) from None


def check_default_privs(cfg: Config, euid: int | None = None) -> None:
    """default_privs must exist and be unprivileged when the master runs as root
    (``euid``, default ours, is 0): the local agent delivers with it
    (master.server.jail.lookup_default_privs).  Raises ConfigError ``"<main.cf>, line
    <n>: parameter default_privs: ..."`` (``"file <main.cf>: ..."`` for the default)."""
    if (os.geteuid() if euid is None else euid) != 0:
        return
    try:
        jail.lookup_default_privs(cfg)
    except jail.OwnerError as exc:
        raise ConfigError(str(exc)) from None


def _param_error(cfg: Config, name: str, message: str) -> ConfigError:
    """cfg.error(), naming main.cf (without a line) also when the value is a default."""
    err = cfg.error(name, message)
    if err.path is None and not err.message.startswith("-o "):
        return ConfigError(err.message, os.path.join(cfg.config_directory, "main.cf"))
    return err


def check_services(cfg: Config, services: Sequence[Service], warn: Warn | None = None,
                   *, modules: bool = True, logfile: bool = True) -> None:
    """check_service() for each service, in master.cf order.  Raises ConfigError."""
    for svc in services:
        check_service(cfg, svc, warn, modules=modules, logfile=logfile)


def check_service(cfg: Config, svc: Service, warn: Warn | None = None, *,
                  modules: bool = True, logfile: bool = True) -> None:
    """Check one master.cf service against ``cfg`` (module docstring); ``modules`` and
    ``logfile``: see load_configuration.  Raises ConfigError ``"<master.cf>, line <n>:
    <what>"``, or ``"<main.cf>, line <n>: <what>"`` when a main.cf value is what the
    service cannot run with (inet_interfaces, smtpd's relay restrictions)."""
    if warn is not None:
        for name, value in svc.overrides.items():
            if not _is_used(cfg, svc, name):
                warn(f"{_where(svc)}unused parameter: -o {name}={value}")
    try:
        child = svc.child_config(cfg)
        child.check()
        check_tables(child, [name for name in TABLE_PARAMS if name in svc.overrides], warn)
    except ConfigError as exc:
        message = exc.message if exc.path is None else str(exc)
        raise ConfigError(message, svc.path or None, svc.line or None) from None
    if logfile:
        _check_service_maillog(cfg, child, svc)
    problem = module_problem(svc.module) if modules else None
    if problem is not None:
        raise ConfigError(f'command "{svc.command}": {problem}', svc.path or None,
                          svc.line or None)
    if svc.chroot and svc.module in NO_CHROOT and os.geteuid() == 0:
        # only a root master chroots; the service would exit fatal at every start
        raise ConfigError(f"service {svc.name}: {NO_CHROOT[svc.module]}",
                          svc.path or None, svc.line or None)
    if svc.module == LOCAL_MODULE:
        if os.geteuid() == 0 and svc.unpriv:  # Postfix's words; the agent refuses it too
            raise ConfigError(f"service {svc.name} requires privileged operation (set "
                              "its unpriv column to n)", svc.path or None, svc.line or None)
        _check_local_limits(child, svc)
    if svc.module == PIPE_MODULE:
        _check_pipe(cfg, svc, warn)
    elif svc.args and svc.module in BUILTIN_MODULES.values():
        # no built-in service takes arguments: Postfix's programs exit with this
        # (smtp(8): "unexpected command-line argument"); refused here, at start/reload
        raise ConfigError(f'service {svc.name}: unexpected command-line argument '
                          f'"{svc.args[0]}" (command "{svc.command}" takes only -o '
                          "options)", svc.path or None, svc.line or None)
    if svc.type == "inet":
        _check_inet(cfg, svc)
    if svc.module == "qmgrd.qmgr" and svc.type != "fifo":
        # Postfix's own master.cf has "qmgr unix ..."; qmgrd's qmgr reads a FIFO
        raise ConfigError(f"service {svc.name}: the qmgr needs type fifo in qmgrd, not "
                          f"{svc.type} (Postfix's master.cf says unix): change the type "
                          "column to fifo", svc.path or None, svc.line or None)
    if svc.module == "transports.smtpd":
        _check_smtpd_relay(cfg, child, svc)
        _check_smtpd_tls(child, svc)


def _check_local_limits(child: Config, svc: Service) -> None:
    """A local service's ``mailbox_size_limit`` (0: none) below its
    ``message_size_limit``, or with that one unlimited (0): mail the queue takes could
    not be delivered to a mailbox.  Postfix's local(8) exits fatal at start, "main.cf
    configuration error: mailbox_size_limit is smaller than message_size_limit", and
    its mail waits; refused here at start and reload instead.

    Raises:
        ConfigError: located at the service's master.cf line when one of the two is
            its ``-o`` override, else at main.cf's line of mailbox_size_limit (of
            message_size_limit when only that one is set in main.cf).
    """
    mailbox = child.get_size("mailbox_size_limit")
    message = child.get_size("message_size_limit")
    if not mailbox or (message and mailbox >= message):
        return
    problem = "mailbox_size_limit is smaller than message_size_limit"
    names = ("mailbox_size_limit", "message_size_limit")
    if any(name in svc.overrides for name in names):
        raise ConfigError(problem, svc.path or None, svc.line or None)
    name = names[1] if child.is_set(names[1]) and not child.is_set(names[0]) else names[0]
    raise _param_error(child, name, problem)


def _check_pipe(cfg: Config, svc: Service, warn: Warn | None) -> None:
    """A pipe service's command attributes, as its children will parse them
    (master.config.pipeattr; Postfix's pipe(8) exits fatal on the same ones): a bad
    one is refused, naming the service; an unknown macro is reported through ``warn``
    only (Postfix's pipe defers the mail, 4.3.5, and warns: so does ours), and so is a
    user= account or group that does not exist (Postfix's master starts with it).

    Raises:
        ConfigError: ``"<master.cf>, line <n>: service <name>: <Postfix's message>"``.
    """
    owner = None
    if os.geteuid() == 0 and svc.unpriv:  # Postfix's words; the agent refuses it too
        raise ConfigError(f"service {svc.name} requires privileged operation (set its "
                          "unpriv column to n)", svc.path or None, svc.line or None)
    if os.geteuid() == 0:
        try:
            account = jail.lookup_mail_owner(cfg)
        except jail.OwnerError:
            account = None  # check_mail_owner reports it
        if account is not None:
            owner = (account.uid, account.gid, account.name)
    try:
        attrs = parse_pipe_args(svc.args, owner)
    except PipeAttrError as exc:
        if exc.no_account:
            # Postfix's master starts with such a line (Debian's stock master.cf has
            # user=vmail, ftn, bsmtp...): only the service's pipe processes exit fatal,
            # and mail routed to it waits in the queue until the account exists
            if warn is not None:
                warn(f"{_where(svc)}service {svc.name}: {exc} (its pipe processes exit "
                     "fatal and mail for it stays queued until the account exists)")
            return
        raise ConfigError(f"service {svc.name}: {exc}", svc.path or None,
                          svc.line or None) from None
    if warn is not None:
        for name in unknown_macros(attrs.command):
            warn(f'{_where(svc)}service {svc.name}: unknown macro name: "{name}"')


def _check_service_maillog(cfg: Config, child: Config, svc: Service) -> None:
    """The service's children open their own maillog_file (master.server.skeleton, as
    root, before the jail) - an ``-o maillog_file=...`` override, or main.cf's value
    expanded with the service's $service_name or other overrides.  When that differs
    from main.cf's (check_maillog's), it must open the same way, else every child would
    exit fatal at start while the master throttles the service.  A relative value is
    already refused by Config.check (Config.maillog_file).

    Raises:
        ConfigError: ``"<master.cf>, line <n>: -o maillog_file=/x/maillog: cannot open
            maillog_file "/x/maillog": No such file or directory (its directory /x
            does not exist; it is not created)"`` (without the ``-o`` part when the
            service's path comes from main.cf's value).
    """
    path = child.maillog_file()
    if not path or path == cfg.maillog_file():
        return
    problem = _maillog_problem(path)
    if problem is None:
        return
    message = f'cannot open maillog_file "{path}": {problem}'
    if "maillog_file" in svc.overrides:
        message = child.error("maillog_file", message).message  # "-o name=value: ..."
    raise ConfigError(message, svc.path or None, svc.line or None)


def _check_smtpd_relay(cfg: Config, child: Config, svc: Service) -> None:
    """Neither smtpd_relay_restrictions nor smtpd_recipient_restrictions of the service's
    Config ``child`` (``cfg`` plus the -o overrides of ``svc``) holds a working guard:
    smtpd would exit fatal at every start (master.config.relayguard, Postfix's open-relay
    check) while the master throttles it, so the configuration is refused first.

    Raises:
        ConfigError: OPEN_RELAY_MESSAGE located where the list to fix is set: the
            service's master.cf line for an ``-o`` override (``"<master.cf>, line <n>:
            -o name=value: ..."``), else the main.cf line (``"<main.cf>, line <n>:
            ..."``).  The list blamed is smtpd_relay_restrictions, except when the
            service's ``-o smtpd_recipient_restrictions`` took away main.cf's guard, or
            smtpd_relay_restrictions is empty and smtpd_recipient_restrictions is set
            (the pre-Postfix-2.10 style, where the guard belongs in the recipient list).
    """
    problem = open_relay_problem(child)
    if problem is None:
        return
    relay, recipient = RELAY_PARAMS
    dropped = recipient in svc.overrides and is_guarded(cfg.get_list(recipient))
    old_style = not child.get_list(relay) and child.is_set(recipient)
    name = recipient if relay not in svc.overrides and (dropped or old_style) else relay
    err = _param_error(child, name, problem)
    if err.path is None:  # "-o name=value: ...": the service's line
        raise ConfigError(err.message, svc.path or None, svc.line or None)
    raise err


def _check_smtpd_tls(child: Config, svc: Service) -> None:
    """smtpd_tls_security_level = encrypt with no readable certificate: every client
    would be refused (smtpd exits fatal at start and the master throttles it), so the
    configuration is refused first, at start and reload."""
    if child.get("smtpd_tls_security_level").strip().lower() != "encrypt":
        return
    cert = child.get("smtpd_tls_cert_file").strip()
    key = child.get("smtpd_tls_key_file").strip() or cert
    if not cert:
        problem = "smtpd_tls_security_level = encrypt needs smtpd_tls_cert_file"
    else:
        problem = ""
        for name, path in (("smtpd_tls_cert_file", cert), ("smtpd_tls_key_file", key)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                problem = (f"smtpd_tls_security_level = encrypt: cannot read {name} "
                           f"{path}: {exc.strerror}")
                break
    if problem:
        raise ConfigError(problem, svc.path or None, svc.line or None)


def _where(svc: Service) -> str:
    return f"{svc.path}, line {svc.line}: " if svc.path else ""


def unused_parameters(cfg: Config, services: Sequence[Service] = ()) -> list[str]:
    """Postconf's ``unused parameter`` warnings for main.cf: one text per parameter set
    in main.cf that no qmgrd program reads (not in the parameter table, not a
    per-transport parameter) and that no other main.cf value nor any master.cf ``-o``
    of ``services`` refers to as ``$name``: ``"<main.cf>, line <n>: unused parameter:
    name=value"`` - a misspelt name (``mydestinatoin``) or a Postfix parameter qmgrd
    does not implement, whose setting has no effect here."""
    out = []
    values = [cfg.get_raw(name) for name in cfg.names()]
    values += [value for svc in services for value in svc.overrides.values()]
    for name in cfg.names():
        if param_spec(name) is not None or name in cfg.overrides or not cfg.is_set(name):
            continue
        if _refers_to(name, values):
            continue
        err = cfg.error(name, f"unused parameter: {name}={cfg.get_raw(name)}")
        out.append(str(err))
    return out


def _is_used(cfg: Config, svc: Service, name: str) -> bool:
    """True if some qmgrd program or some other setting can read parameter ``name``."""
    if param_spec(name) is not None or cfg.is_set(name):
        return True
    values = [cfg.get_raw(other) for other in cfg.names()]
    values += [value for other, value in svc.overrides.items() if other != name]
    return _refers_to(name, values)


def _refers_to(name: str, values: Sequence[str]) -> bool:
    """True if one of ``values`` refers to parameter ``name`` ($name, ${name}, $(name))."""
    ref = re.compile(r"\$[{(]?\s*" + re.escape(name) + r"(?![A-Za-z0-9_])")
    return any(ref.search(value) for value in values)


def _search_path() -> list[str]:
    """Where a child looks for modules first: the directory holding the ``master``
    package (master.daemon.spawn puts it on the child's PYTHONPATH), then PYTHONPATH."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [root, *extra]


def module_problem(module: str) -> str | None:
    """Why ``python -m <module>`` cannot run, or None if it can.  The module is located
    with the path entry finders only: neither it nor its parent packages are imported."""
    parts = module.split(".")
    found = _find(parts[0], _search_path())
    if found is None:
        try:
            spec = importlib.util.find_spec(parts[0])  # a top level name: nothing imported
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            locations = spec.submodule_search_locations
            found = (list(locations) if locations is not None else None,)
    if found is None:
        return f"no module named {module}" + (f' ("{parts[0]}" not found)' if parts[1:] else "")
    for i in range(1, len(parts)):
        dirs = found[0]
        parent, name = ".".join(parts[:i]), ".".join(parts[:i + 1])
        if dirs is None:
            return f"no module named {name} ({parent} is not a package)"
        found = _find(name, dirs)
        if found is None:
            return f"no module named {name}"
    dirs = found[0]
    if dirs is not None and _find(module + ".__main__", dirs) is None:
        return f"{module} is a package without __main__ (cannot be run)"
    return None


def _find(name: str, dirs: Sequence[str]) -> tuple[list[str] | None] | None:
    """Look module ``name`` (dotted) up in ``dirs``: None if absent, else a 1-tuple of
    its package directories (None for a plain module).  Uses each directory's path entry
    finder directly (pkgutil.get_importer): no parent package needs to be imported."""
    portions: list[str] = []
    for directory in dirs:
        finder = pkgutil.get_importer(directory)
        if finder is None:
            continue
        spec = finder.find_spec(name)
        if spec is None:
            continue
        locations = spec.submodule_search_locations
        if spec.loader is not None:  # a module or a regular package: it shadows the rest
            return (list(locations) if locations is not None else None,)
        portions += list(locations or [])  # a namespace package portion
    return (portions,) if portions else None


def inet_hosts(cfg: Config) -> list[str]:
    """The bind addresses of inet services without a host part (inet_interfaces: "all"
    -> the wildcard address "", "loopback-only" -> 127.0.0.1, else each address).
    Raises ConfigError (expansion)."""
    interfaces = cfg.get_list("inet_interfaces")
    if not interfaces or "all" in interfaces:
        return [""]
    hosts = ["127.0.0.1" if name == "loopback-only" else name for name in interfaces]
    return list(dict.fromkeys(host.strip("[]") for host in hosts))


def _check_inet(cfg: Config, svc: Service) -> None:
    """Port and host(s) of an inet service.  Raises ConfigError."""
    path, line = svc.path or None, svc.line or None
    host, sep, port = svc.name.rpartition(":")
    if port.isdigit():
        number = int(port)
    elif not port:
        raise ConfigError(f'missing port in inet service "{svc.name}"', path, line)
    else:
        try:
            number = socket.getservbyname(port, "tcp")
        except OSError:
            raise ConfigError(f'unknown service port "{port}" in inet service "{svc.name}" '
                              "(not a number, not in /etc/services)", path, line) from None
    if not 0 < number < 65536:
        raise ConfigError(f'bad port number "{port}" in inet service "{svc.name}"', path,
                          line)
    if sep:
        problem = _host_problem(host.strip("[]"))
        if problem is not None:
            raise ConfigError(f'{problem} in inet service "{svc.name}"', path, line)
        return
    for address in inet_hosts(cfg):  # the master binds with main.cf's inet_interfaces
        problem = _host_problem(address)
        if problem is not None:
            raise cfg.error("inet_interfaces", f"{problem} in parameter inet_interfaces")


def _host_problem(host: str) -> str | None:
    """None if ``host`` is "" (every address), an IP address or a name that resolves."""
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "bad name"
        return f'unknown host "{host}" ({reason})'
    return None
