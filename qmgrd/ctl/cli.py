"""cli — ``qmgr-ctl``, the administrator's command for a qmgrd mail queue.

Synopsis
    qmgr-ctl [-c config_dir] list [--json]
    qmgr-ctl [-c config_dir] flush
    qmgr-ctl [-c config_dir] status [--json]

Description
    ``list`` is Postfix's ``postqueue -p`` (``mailq``) and, with ``--json``,
    ``postqueue -j`` (postfix.md §7.1, §7.2). Instead of asking a showq daemon it reads
    the queue directory itself (qmgrd.ctl.showq): read-only, without locks, so it never
    holds up the qmgr. Output is byte-for-byte Postfix's long-queue-id layout
    (qmgrd.ctl.format).

    ``flush`` is ``postqueue -f`` (§7.3): it writes ``FADI`` (forget dead destinations,
    ignore deferred time stamps, scan deferred, scan incoming) to ``public/qmgr`` and
    ``W`` to ``public/pickup``. When either trigger cannot be delivered (no FIFO, or no
    process reading it) the mail system is down: ``qmgr-ctl: fatal: Cannot flush mail
    queue - mail system is down`` on standard error, exit 69, as postqueue does.

    ``status`` asks the running qmgr for its scheduler state over
    ``<queue_directory>/private/qmgr-status`` (qmgrd.qmgr.status): every transport and
    destination with its concurrency window, deliveries in flight and waiting, dead or
    rate-delay state with the saved reason, and the active queue's counts. ``--json``
    prints the qmgr's document as it is (indented). No qmgr answering: exit 69.

    ``-c DIR`` names the configuration directory holding main.cf (default:
    ``$QMGRD_CONFIG_DIR``, else ``/etc/qmgrd``); ``queue_directory``,
    ``hash_queue_names``, ``hash_queue_depth``, ``empty_address_recipient`` and
    ``duplicate_filter_limit`` are read from it. The configuration is loaded only when a
    command runs, so ``--help`` always works.

Exit status (sysexits.h)
    0   success
    64  usage error (EX_USAGE): unknown command or option
    69  the mail system is down (EX_UNAVAILABLE): flush could not trigger the qmgr/pickup,
        status got no answer from the qmgr
    75  the queue directory cannot be read (EX_TEMPFAIL)
    78  configuration error (EX_CONFIG): ``<file>, line <n>: <what>``

    Errors are printed on standard error as ``qmgr-ctl: fatal: <text>``. When the reader
    of the listing goes away (``qmgr-ctl list | head``) the listing stops quietly, exit 0,
    as postqueue does on EPIPE.

Public API
    main(argv: list[str] | None = None) -> NoReturn     the console script entry point
    cli                                                 the click group (for CliRunner)
    EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from master.config import Config, ConfigError
from qmgrd.ctl.format import format_json, format_mailq
from qmgrd.ctl.showq import scan
from qmgrd.qmgr.status import fetch, format_text
from qmgrd.spool.queue import Spool
from qmgrd.trigger import (
    QMGR_REQ_FLUSH_DEAD,
    QMGR_REQ_SCAN_ALL,
    QMGR_REQ_SCAN_DEFERRED,
    QMGR_REQ_SCAN_INCOMING,
    TRIGGER_REQ_WAKEUP,
    send_trigger,
)

__all__ = ["EX_CONFIG", "EX_OK", "EX_TEMPFAIL", "EX_UNAVAILABLE", "EX_USAGE", "cli", "main"]

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78

PROG = "qmgr-ctl"
DEFAULT_CONFIG_DIR = "/etc/qmgrd"
_FLUSH_QMGR = QMGR_REQ_FLUSH_DEAD + QMGR_REQ_SCAN_ALL + QMGR_REQ_SCAN_DEFERRED \
    + QMGR_REQ_SCAN_INCOMING
_DUP_FILTER_DEFAULT = 1000

_EXIT_HELP = """
\b
Exit status:
  0   success
  64  usage error
  69  mail system down (flush could not trigger qmgr or pickup; no qmgr status)
  75  queue directory unreadable
  78  configuration error
"""


def _fatal(ctx: click.Context, code: int, msg: str) -> NoReturn:
    click.echo(f"{PROG}: fatal: {msg}", err=True)
    ctx.exit(code)


class _Cli(click.Group):
    """A click group whose usage errors exit with EX_USAGE (64) instead of click's 2."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            exc.show()
            sys.exit(EX_USAGE)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else EX_OK)


def _quiet_stdout() -> None:
    """After EPIPE on stdout, point it at /dev/null so the exit-time flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


@click.group(name=PROG, cls=_Cli, help=f"""Inspect and control a qmgrd mail queue.
{_EXIT_HELP}""", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "config_dir", metavar="DIR", envvar="QMGRD_CONFIG_DIR",
              default=DEFAULT_CONFIG_DIR, show_default=True, show_envvar=True,
              help="Configuration directory holding main.cf.")
@click.pass_context
def cli(ctx: click.Context, config_dir: str) -> None:
    ctx.obj = config_dir


def _load(ctx: click.Context) -> Config:
    try:
        return Config.load(str(ctx.obj))
    except ConfigError as exc:
        _fatal(ctx, EX_CONFIG, str(exc))


def _settings(ctx: click.Context, cfg: Config) -> tuple[Spool, str, int]:
    """(spool, empty_address_recipient, duplicate_filter_limit); EX_CONFIG when bad."""
    try:
        spool = Spool.from_config(cfg)
        empty = cfg.get("empty_address_recipient") or "MAILER-DAEMON"
        limit = _DUP_FILTER_DEFAULT
        if cfg.get("duplicate_filter_limit"):
            limit = cfg.get_int("duplicate_filter_limit")
    except (ConfigError, ValueError) as exc:
        _fatal(ctx, EX_CONFIG, str(exc))
    return spool, empty, limit


@cli.command("list", help=f"""List the queue as Postfix's mailq / postqueue -p does.

Reads maildrop, active, incoming, deferred and hold directly (read-only, no locks).
Markers after the queue id: * active, ! on hold, # forced to expire.
{_EXIT_HELP}""")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per message and line, as postqueue -j.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    spool, empty, limit = _settings(ctx, _load(ctx))
    qdir = spool.queue_directory
    try:
        if not stat.S_ISDIR(os.stat(qdir).st_mode):
            _fatal(ctx, EX_TEMPFAIL, f"open queue directory {qdir}: Not a directory")
    except OSError as exc:
        _fatal(ctx, EX_TEMPFAIL, f"open queue directory {qdir}: {exc.strerror}")
    entries = scan(spool, empty_address=empty, dup_filter_limit=limit)
    try:
        chunks = (format_json(e) for e in entries) if as_json else format_mailq(entries)
        for chunk in chunks:  # UTF-8 bytes whatever the locale, as Postfix writes them
            click.echo(chunk.encode("utf-8"), nl=False)
    except BrokenPipeError:  # the reader went away (qmgr-ctl list | head): as postqueue
        _quiet_stdout()
        ctx.exit(EX_OK)
    except OSError as exc:
        _fatal(ctx, EX_TEMPFAIL, f"scan queue directory {qdir}: {exc.strerror or exc}")


@cli.command("flush", help=f"""Attempt to deliver all queued mail, as postqueue -f.

Sends FADI to public/qmgr and W to public/pickup.
{_EXIT_HELP}""")
@click.pass_context
def flush_cmd(ctx: click.Context) -> None:
    cfg = _load(ctx)
    try:
        public = os.path.join(cfg.get("queue_directory"), "public")
    except ConfigError as exc:
        _fatal(ctx, EX_CONFIG, str(exc))
    for service, data in (("qmgr", _FLUSH_QMGR), ("pickup", TRIGGER_REQ_WAKEUP)):
        if not send_trigger(os.path.join(public, service), data):
            _fatal(ctx, EX_UNAVAILABLE, "Cannot flush mail queue - mail system is down")


@cli.command("status", help=f"""Show the qmgr's scheduler state.

Asks the running qmgr over private/qmgr-status: transports, destinations (concurrency
window, busy, todo, dead or suspended with the saved reason), active queue counts.
{_EXIT_HELP}""")
@click.option("--json", "as_json", is_flag=True, help="The qmgr's JSON document, indented.")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    cfg = _load(ctx)
    try:
        path = os.path.join(cfg.get("queue_directory"), "private", "qmgr-status")
    except ConfigError as exc:
        _fatal(ctx, EX_CONFIG, str(exc))
    try:
        snap = fetch(path)
    except (OSError, ValueError, TypeError) as exc:
        _fatal(ctx, EX_UNAVAILABLE, f"cannot get the qmgr status from {path}: {exc}")
    try:
        if as_json:
            click.echo(json.dumps(snap, indent=2, sort_keys=True))
        else:
            click.echo(format_text(snap), nl=False)
    except BrokenPipeError:
        _quiet_stdout()
        ctx.exit(EX_OK)


@cli.command("config", help="""Print main.cf parameters, as postconf does: every
effective value; -d the defaults; -n only what main.cf sets; -x expanded. With NAMEs, only
those (an unknown name: exit 64).""")
@click.option("-d", "defaults", is_flag=True, help="Print the default values.")
@click.option("-n", "nondefault", is_flag=True, help="Print only what main.cf sets.")
@click.option("-x", "expand", is_flag=True, help="Expand $name in the values.")
@click.argument("names", nargs=-1)
@click.pass_context
def config_cmd(ctx: click.Context, defaults: bool, nondefault: bool, expand: bool,
               names: tuple[str, ...]) -> None:
    cfg = _load(ctx)
    if defaults and nondefault:
        _fatal(ctx, EX_USAGE, "-d and -n are mutually exclusive")
    lines = cfg.dump(defaults=defaults, nondefault=nondefault, expand=expand)
    if names:
        by_name = {line.split(" =", 1)[0]: line for line in lines}
        missing = [n for n in names if n not in by_name]
        if missing:
            _fatal(ctx, EX_USAGE, f"unknown parameter: {missing[0]}")
        lines = [by_name[n] for n in names]
    for line in lines:
        click.echo(line)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run qmgr-ctl with ``argv`` (default sys.argv[1:]); exits with the status above."""
    cli.main(args=argv, prog_name=PROG)
    sys.exit(EX_OK)  # not reached: _Cli.main always exits in standalone mode


if __name__ == "__main__":
    main()
