"""common — what every qmgr-ctl command shares: exit codes, errors, configuration,
the selector options, streamed output and the privilege/log set-up of changing commands.

Public API
    EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_IOERR, EX_TEMPFAIL,
    EX_NOPERM, EX_CONFIG (sysexits.h values); EXIT_HELP (the table shown by --help)
    PROG = "qmgr-ctl"
    fatal(ctx, code, msg) -> NoReturn        ``qmgr-ctl: fatal: msg`` on stderr, exit code
    denied(ctx, what, exc=None) -> NoReturn  EX_NOPERM: "permission denied ... run as root"
    warn(msg)                                ``qmgr-ctl: warning: msg`` on stderr
    load(ctx) -> Config; settings(ctx, cfg) -> (Spool, empty_address, dup_filter_limit)
    check_queue_dir(ctx, spool)              EX_TEMPFAIL when it cannot be used
    down_or_missing(ctx, queue_directory, down)   EX_UNAVAILABLE: ``down``, or that the
                                             queue directory does not exist
    selector_options(f)                      the decorator adding list's selectors
    make_selector(ctx, **options) -> Selector   EX_USAGE for bad values
    Output(stream)                           buffered writer: .write(bytes), .flush();
                                             the first chunk is flushed at once
    quiet_stdout()                           after EPIPE: stdout to /dev/null
    Seconds(maximum)                         click type: a finite float in [0, maximum]
    changing(ctx, cfg, spool, what, work="qmgrd.ctl.admin")
                                             context manager: open the maillog, load
                                             ``work``, become the queue owner
                                             (EX_NOPERM otherwise)

Imports only click, master.config, master.log and qmgrd.ctl.queues when loaded: what a
function needs beyond that (the spool, the selectors, qmgrd.ctl.guard, qmgrd.ctl.admin) is
imported when it is called, so that ``qmgr-ctl flush`` and ``--help`` start fast (issue 8).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from master import log
from master.config import Config, ConfigError
from qmgrd.ctl.queues import QUEUE_ORDER

if TYPE_CHECKING:
    from qmgrd.ctl.select import Selector
    from qmgrd.spool.queue import Spool

__all__ = ["EXIT_HELP", "EX_CONFIG", "EX_DATAERR", "EX_IOERR", "EX_NOINPUT", "EX_NOPERM",
           "EX_OK", "EX_TEMPFAIL", "EX_UNAVAILABLE", "EX_USAGE", "PROG", "Output", "Seconds",
           "changing", "check_queue_dir", "denied", "down_or_missing", "fatal", "load",
           "make_selector", "quiet_stdout", "selector_options", "settings", "warn"]


class Seconds(click.FloatRange):
    """A number of seconds from 0 to ``maximum`` (``--wait``, ``--pace``). click's FloatRange
    lets ``nan`` through (every comparison with it is false) and has no upper bound
    here before: ``--pace inf`` or ``1e300`` ended in time.sleep()'s OverflowError,
    a traceback, once the first batch was moved."""

    def __init__(self, maximum: float) -> None:
        super().__init__(0, maximum)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return rv


EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
PROG = "qmgr-ctl"
_DUP_FILTER_DEFAULT = 1000
_OUT_CHUNK = 1 << 16

EXIT_HELP = """
\b
Exit status:
  0   success
  64  usage error (also: a bad selector, time, domain or pattern)
  65  invalid queue id given (hold/release/delete/requeue: warned about, the valid ones
      done; otherwise nothing was done); show: the message's queue file
      is damaged (or not a regular file)
  66  some named message is not in the queue (the others were done); flush --id: not
      in the deferred queue (e.g. on hold: release it first)
  69  mail system down (flush could not trigger qmgr or pickup; no qmgr status),
      or the queue directory does not exist (flush, status)
  74  repair: some files could not be renamed into place (each named in a
      warning; the rest was done)
  75  queue directory unreadable (repair: or one of its subdirectories); a message still being delivered (try again);
      the qmgr stopped before it answered (some outcomes unknown: see the maillog);
      suspend/resume: the suspension file could not be written (e.g. a full disk)
  77  permission denied: reading (list, show, shape, status) or changing the queue
      needs root or mail_owner
  78  configuration error
"""

F = TypeVar("F", bound=Callable[..., Any])


def fatal(ctx: click.Context, code: int, msg: str) -> NoReturn:
    """Print ``qmgr-ctl: fatal: msg`` on stderr and exit with ``code``."""
    click.echo(f"{PROG}: fatal: {msg}", err=True)
    ctx.exit(code)
    raise AssertionError("not reached")  # ctx.exit raises


def denied(ctx: click.Context, what: str, exc: OSError | None = None) -> NoReturn:
    """EX_NOPERM with a hint: reading or changing the queue needs root or mail_owner.

    (Postfix's mailq works for everyone through its showq service; qmgrd has none, so
    qmgr-ctl reads the queue directory itself.)
    """
    where = f" ({exc.filename})" if exc is not None and exc.filename else ""
    fatal(ctx, EX_NOPERM, f"{what}: permission denied{where}: run qmgr-ctl as root or as "
                          "the mail queue owner (mail_owner)")


def warn(msg: str) -> None:
    """Print ``qmgr-ctl: warning: msg`` on stderr."""
    click.echo(f"{PROG}: warning: {msg}", err=True)


def load(ctx: click.Context) -> Config:
    """The configuration of ``-c`` (EX_CONFIG when it is broken)."""
    try:
        return Config.load(str(ctx.find_root().obj))
    except ConfigError as exc:
        fatal(ctx, EX_CONFIG, str(exc))


def settings(ctx: click.Context, cfg: Config) -> tuple[Spool, str, int]:
    """(spool, empty_address_recipient, duplicate_filter_limit); EX_CONFIG when bad."""
    from qmgrd.spool.queue import Spool

    try:
        spool = Spool.from_config(cfg)
        empty = cfg.get("empty_address_recipient") or "MAILER-DAEMON"
        limit = _DUP_FILTER_DEFAULT
        if cfg.get("duplicate_filter_limit"):
            limit = cfg.get_int("duplicate_filter_limit")
    except (ConfigError, ValueError) as exc:
        fatal(ctx, EX_CONFIG, str(exc))
    return spool, empty, limit


def check_queue_dir(ctx: click.Context, spool: Spool) -> None:
    """EX_TEMPFAIL unless the queue directory is a directory we can stat: ``open queue
    directory <path>: No such file or directory`` (or Not a directory, ...)."""
    from master.daemon.queuedirs import directory_problem

    qdir = spool.queue_directory
    problem = directory_problem(qdir)
    if problem is not None:
        fatal(ctx, EX_TEMPFAIL, f"open queue directory {qdir}: {problem}")


def down_or_missing(ctx: click.Context, queue_directory: str, down: str) -> NoReturn:
    """No qmgr (or pickup) answered: EX_UNAVAILABLE with ``down`` - or, when the queue
    directory itself is not there, ``queue directory <path>: No such file or
    directory`` (Postfix's postqueue: fatal "chdir <path>: ...", EX_UNAVAILABLE), so
    that a missing or mistyped directory is not reported as a mail system that is
    down."""
    from master.daemon.queuedirs import directory_problem

    problem = directory_problem(queue_directory)
    if problem is not None:
        fatal(ctx, EX_UNAVAILABLE, f"queue directory {queue_directory}: {problem}")
    fatal(ctx, EX_UNAVAILABLE, down)


def selector_options(f: F) -> F:
    """Add list's selector options (qmgrd.ctl.select) to a click command."""
    opts = [
        click.option("--queue", "queues", multiple=True, type=click.Choice(QUEUE_ORDER),
                     help="Only messages in this queue (repeatable)."),
        click.option("--sender", "senders", multiple=True, metavar="PATTERN",
                     help="Envelope sender matches (wildcards; <> = null sender)."),
        click.option("--recipient", "recipients", multiple=True, metavar="PATTERN",
                     help="A recipient still to do matches (wildcards)."),
        click.option("--domain", "domains", multiple=True, metavar="DOMAIN",
                     help="A recipient still to do is in DOMAIN (.DOMAIN: subdomains)."),
        click.option("--older-than", metavar="AGE", help="Arrived at least AGE ago "
                     "(30s, 5m, 2h, 1d, 1w)."),
        click.option("--younger-than", metavar="AGE", help="Arrived less than AGE ago."),
        click.option("--reason", metavar="REGEX",
                     help="The last delay reason (defer log) matches REGEX."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_selector(ctx: click.Context, queues: tuple[str, ...] = (),
                  senders: tuple[str, ...] = (), recipients: tuple[str, ...] = (),
                  domains: tuple[str, ...] = (), older_than: str | None = None,
                  younger_than: str | None = None, reason: str | None = None) -> Selector:
    """The Selector of the options (EX_USAGE for a bad value)."""
    from qmgrd.ctl.select import Selector, parse_age

    try:
        return Selector(queues=tuple(queues), senders=tuple(senders),
                        recipients=tuple(recipients), domains=tuple(domains),
                        older_than=parse_age(older_than) if older_than else None,
                        younger_than=parse_age(younger_than) if younger_than else None,
                        reason=reason)
    except ValueError as exc:
        fatal(ctx, EX_USAGE, str(exc))


class Output:
    """Buffered binary output that shows its first chunk at once (a listing streams)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.parts: list[bytes] = []
        self.size = 0
        self.first = True

    def write(self, data: bytes) -> None:
        """Queue ``data``; write when 64 KiB are waiting (or for the first chunk)."""
        self.parts.append(data)
        self.size += len(data)
        if self.first or self.size >= _OUT_CHUNK:
            self.first = False
            self.flush()

    def flush(self) -> None:
        """Write and flush what is waiting."""
        if self.parts:
            self.stream.write(b"".join(self.parts))
            self.parts.clear()
            self.size = 0
        self.stream.flush()


def quiet_stdout() -> None:
    """After EPIPE on stdout, point it at /dev/null so the exit-time flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


@contextlib.contextmanager
def changing(ctx: click.Context, cfg: Config, spool: Spool, what: str,
             work: str = "qmgrd.ctl.admin") -> Iterator[None]:
    """Open the maillog (as the caller) and run the block as the queue's owner.

    Once the caller is known to be allowed, the module ``work`` (by default
    qmgrd.ctl.admin, the work with asyncio) is loaded, still with the caller's ids: as
    root the block runs with the queue owner's effective ids, which need not be allowed
    to read the interpreter's files.
    Exits EX_NOPERM (not root, not mail_owner) or EX_TEMPFAIL (no queue directory).
    """
    from qmgrd.ctl.guard import NotPrivileged, owner_stat
    from qmgrd.spool.owner import as_owner

    check_queue_dir(ctx, spool)
    try:
        # the host name field as every daemon writes it (the system's short name)
        log.setup(PROG, cfg.maillog_file(), cfg.get("syslog_name") or "qmgrd")
    except (OSError, ConfigError) as exc:
        warn(f"cannot open the mail log: {exc}")
    try:
        st = owner_stat(spool, what)
        importlib.import_module(work)
        with as_owner(st):
            yield
    except NotPrivileged as exc:
        fatal(ctx, EX_NOPERM, str(exc))
    except FileNotFoundError as exc:
        fatal(ctx, EX_TEMPFAIL, f"{what}: {exc}")
    finally:
        log.close()
