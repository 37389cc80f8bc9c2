"""cli — ``qmgr-ctl``, the administrator's command for a qmgrd mail queue.

Synopsis
    qmgr-ctl [-c config_dir] list [--json] [SELECTORS]
    qmgr-ctl [-c config_dir] show [--envelope] [--headers] [--body] [--json] ID
    qmgr-ctl [-c config_dir] shape [-s] [-p] [-m N] [-b N] [-t N] [-l] [-w N] [--json]
                                   [QUEUE...]
    qmgr-ctl [-c config_dir] hold|release|delete|requeue [--dry-run] [--wait S]
                                   [SELECTORS] [ID... | - | ALL]
    qmgr-ctl [-c config_dir] flush [--site DOMAIN | --id ID...] [--batch N] [--pace S]
    qmgr-ctl [-c config_dir] status [--json]
    qmgr-ctl [-c config_dir] suspend [--for DURATION] [--reason TEXT] DOMAIN
    qmgr-ctl [-c config_dir] resume [--batch N] [--pace S] DOMAIN
    qmgr-ctl [-c config_dir] repair
    qmgr-ctl [-c config_dir] config [-d] [-n] [-x] [NAME...]
    qmgr-ctl [-c config_dir] config NAME=VALUE...

Description
    Postfix spreads this over postqueue, postsuper, postcat and qshape; qmgr-ctl does it
    in one tool, with selectors instead of awk pipelines.

    ``list`` is Postfix's ``postqueue -p`` (``mailq``) and, with ``--json``,
    ``postqueue -j`` (postfix.md §7.1, §7.2), byte for byte (qmgrd.ctl.format). It reads
    the queue directory itself (qmgrd.ctl.showq, qmgrd.ctl.qread): read-only, without
    locks, streaming. SELECTORS (qmgrd.ctl.select) narrow it: ``--queue``, ``--sender``,
    ``--recipient``, ``--domain``, ``--older-than``, ``--younger-than``, ``--reason``.

    ``show ID`` prints one queue file as postcat does (qmgrd.ctl.show) and its bounce,
    defer and trace log entries. ``shape`` is qshape's table (qmgrd.ctl.shape).

    ``hold``, ``release``, ``delete``, ``requeue`` are postsuper -h, -H, -d, -r
    (qmgrd.ctl.admin): by queue id, ``-`` (ids on standard input), ``ALL``, or the
    selectors; ``--dry-run`` prints what would be done. Messages in the active queue
    are changed by the running qmgr once their deliveries in flight end (``--wait``
    seconds are waited for that; later ones are reported as pending; the command waits
    at most ``--wait`` + 2 s for the qmgr in all: a qmgr that does not answer by then
    is left the change, ``outcome unknown``, exit 75). ``requeue`` makes
    the qmgr route the mail anew (a changed transport map applies).

    ``flush`` is ``postqueue -f`` (``FADI`` to public/qmgr, ``W`` to public/pickup; no
    reader: ``Cannot flush mail queue - mail system is down``, exit 69; no queue
    directory at all: ``queue directory <path>: No such file or directory``, exit 69,
    as postqueue's ``chdir <path>: ...``). ``--id`` is
    ``postqueue -i``, ``--site`` ``postqueue -s``, paced: ``--batch`` messages every
    ``--pace`` seconds.

    ``repair`` is ``postsuper -s`` (qmgrd.spool.structure): queue files and their
    bounce/defer/trace logs that are not where hash_queue_names and hash_queue_depth
    want them (after a change of either) are renamed into place, one rename each; a
    file whose place is taken is left, with a warning. qmgr-master start runs it before
    the services start (as postfix start runs postsuper), and a master reload that
    changes the hashing runs it too (as postfix reload does, in the background).

    ``status`` asks the running qmgr for its scheduler state over
    ``private/qmgr-status`` (qmgrd.qmgr.status), operator suspensions included.

    ``suspend DOMAIN`` stops delivery to a destination (a recipient domain,
    ``.domain`` for its subdomains, or a nexthop ``[address]:port``) without attempts
    until ``resume`` or the end of ``--for``; it survives qmgr restarts
    (qmgrd.qmgr.suspend). ``config`` prints main.cf parameters as postconf does, and
    ``config NAME=VALUE`` edits main.cf as ``postconf -e`` (qmgrd.ctl.postconf). An
    unknown NAME is warned about (``qmgr-ctl: warning: NAME: unknown parameter``): when
    printing, the others are printed (exit 0); when setting, it is written anyway.

    Queue ids and domains given by the user are validated before they touch a path.
    Commands that change the queue (hold, release, delete, requeue, flush --id/--site,
    suspend, resume, repair) need root or the queue owner (mail_owner); as root they
    work with the queue owner's ids. They log postsuper's lines (``<id>: removed`` ...) to the
    mail log.

    ``-c DIR`` names the configuration directory holding main.cf (default:
    ``$QMGRD_CONFIG_DIR``, else ``/etc/qmgrd``). The configuration is loaded only when a
    command runs, so ``--help`` always works.

Exit status (sysexits.h)
    0   success
    64  usage error (EX_USAGE): unknown command or option, a bad selector value
    65  an invalid queue id was given (EX_DATAERR); hold, release, delete and requeue
        warn about each and do the valid ones (postsuper), the others do nothing. show: the
        message's queue file is damaged (``<path>: damaged queue file: offset 269:
        truncated record data``) or not a regular file (bad data all the same)
    66  a named message is not in the queue (EX_NOINPUT); the others were done
    69  the mail system is down (EX_UNAVAILABLE): flush could not trigger the qmgr/pickup,
        status got no answer from the qmgr; or, for these two, the queue directory does
        not exist (``queue directory <path>: No such file or directory``)
    74  repair: some files could not be renamed into place (EX_IOERR; each is named in
        a ``warning: rename file <from> as <to>: <strerror>`` line and left where it
        is; the rest was done); postsuper only warns about these, and qmgr-master
        start goes on after a warning
    75  the queue directory cannot be used, or a message was still being delivered and
        could not be changed yet (EX_TEMPFAIL: try again), or the qmgr stopped before it
        answered a hold/delete/requeue (what it did is read from the queue directory;
        ``outcome unknown`` for messages gone from the queue: see the mail log), or did
        not answer within ``--wait`` + 2 s (stopped, overloaded: ``outcome unknown`` for
        its active messages, which it changes when it runs again); repair:
        a directory of the queue could not be read (its files were not checked:
        qmgr-master start fails on this, as postfix start on postsuper's fatal error)
    77  permission denied (EX_NOPERM): list, show, shape and status read the queue
        directory and private/qmgr-status themselves (there is no showq service, unlike
        Postfix's mailq), so they need root or mail_owner, as the changing commands do
    78  configuration error (EX_CONFIG): ``<file>, line <n>: <what>``, e.g. an empty or
        relative queue_directory (``bad queue_directory parameter value "spool": not an
        absolute path``; master.config.Config.queue_directory)

    Errors are printed on standard error as ``qmgr-ctl: fatal: <text>``. list and shape
    skip a damaged queue file with ``qmgr-ctl: warning: <queue>/<id>: damaged queue
    file: <why>; skipped`` on standard error (exit 0: the listing of the rest is valid,
    as Postfix's showq warns and goes on). When the reader
    of a listing goes away (``qmgr-ctl list | head``) the listing stops quietly, exit 0,
    as postqueue does on EPIPE.

Public API
    main(argv: list[str] | None = None) -> NoReturn     click's half of the qmgr-ctl command
                                                        (qmgrd.ctl.entry runs a plain flush
                                                        itself and calls this otherwise)
    cli                                                 the click group (for CliRunner)
    EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_IOERR, EX_TEMPFAIL,
    EX_NOPERM, EX_CONFIG
    fetch(path: str) -> dict[str, Any]                  the status command's client

Start-up
    qmgr-ctl starts once per ``flush`` (issue 8). A plain ``flush`` does not get here
    (qmgrd.ctl.entry sends its triggers without click) unless main.cf needs the full
    parser (queue_directory not a literal absolute path, among others) or the mail
    system is down; importing this module, ``--help`` and such a
    flush load only click, master.config, qmgrd.ctl.common/queues/change and
    qmgrd.trigger. Each command imports the modules doing its work (asyncio, json, the
    queue readers, qmgrd.ctl.admin) when it runs (tests/test_ctl_startup.py).
"""

from __future__ import annotations

# click's gettext imports locale at its first message: loaded with the rest, so that a
# process that loads qmgr-ctl and then drops its privileges runs it without reading the
# interpreter's files again (tests/test_issue7_admin.py, the refused "hold ALL").
import locale  # noqa: F401
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from master.config import ConfigError
from qmgrd.ctl import change
from qmgrd.ctl.common import (
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    EXIT_HELP,
    PROG,
    Output,
    Seconds,
    check_queue_dir,
    denied,
    down_or_missing,
    fatal,
    load,
    make_selector,
    quiet_stdout,
    selector_options,
    settings,
    warn,
)
from qmgrd.ctl.entry import DEFAULT_CONFIG_DIR
from qmgrd.ctl.queues import QUEUE_NAMES, QUEUE_ORDER
from qmgrd.trigger import flush_all

if TYPE_CHECKING:
    from master.config import Config

__all__ = ["EX_CONFIG", "EX_DATAERR", "EX_IOERR", "EX_NOINPUT", "EX_NOPERM", "EX_OK",
           "EX_TEMPFAIL", "EX_UNAVAILABLE", "EX_USAGE", "cli", "main"]


def fetch(path: str) -> dict[str, Any]:
    """The qmgr's status document from ``path`` (qmgrd.qmgr.status.fetch, loaded on use).

    Raises:
        OSError: no qmgr listens (or timeout); ValueError: bad JSON or too large;
        TypeError: JSON, but not an object.
    """
    from qmgrd.qmgr import status  # asyncio: only for the status command

    return status.fetch(path)


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
        except ConfigError as exc:
            # a value main.cf gives that only fails when it is expanded (config -x, a
            # parameter a command reads late): one line naming file and line, as
            # ``qmgr-master start`` reports it, never a traceback
            click.echo(f"{PROG}: fatal: {exc}", err=True)
            sys.exit(EX_CONFIG)
        sys.exit(rv if isinstance(rv, int) else EX_OK)


@click.group(name=PROG, cls=_Cli, help=f"""Inspect and control a qmgrd mail queue.
{EXIT_HELP}""", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "config_dir", metavar="DIR", envvar="QMGRD_CONFIG_DIR",
              default=DEFAULT_CONFIG_DIR, show_default=True, show_envvar=True,
              help="Configuration directory holding main.cf.")
@click.pass_context
def cli(ctx: click.Context, config_dir: str) -> None:
    ctx.obj = config_dir


@cli.command("list", help=f"""List the queue as Postfix's mailq / postqueue -p does.

Reads maildrop, active, incoming, deferred and hold directly (read-only, no locks).
Markers after the queue id: * active, ! on hold, # forced to expire. The selectors
narrow the listing (each one must match; a repeated one matches any of its values).
{EXIT_HELP}""")
@click.option("--json", "as_json_", is_flag=True,
              help="One JSON object per message and line, as postqueue -j.")
@selector_options
@click.pass_context
def list_cmd(ctx: click.Context, /, as_json_: bool, **sel: Any) -> None:
    from qmgrd.ctl.format import format_json, format_mailq
    from qmgrd.ctl.showq import scan

    spool, empty, limit = settings(ctx, load(ctx))
    selector = make_selector(ctx, **sel)
    check_queue_dir(ctx, spool)
    entries = scan(spool, empty_address=empty, dup_filter_limit=limit,
                   queues=selector.queues or QUEUE_ORDER)
    if selector.active:
        entries = (e for e in entries if selector.match(e))
    out = Output(sys.stdout.buffer)
    try:
        chunks = (format_json(e) for e in entries) if as_json_ else format_mailq(entries, selector.active)
        for chunk in chunks:  # UTF-8 bytes whatever the locale, as Postfix writes them
            out.write(chunk.encode("utf-8", "surrogateescape"))
        out.flush()
    except BrokenPipeError:  # the reader went away (qmgr-ctl list | head): as postqueue
        quiet_stdout()
        ctx.exit(EX_OK)
    except PermissionError as exc:
        out.flush()
        denied(ctx, "list: read the mail queue", exc)
    except OSError as exc:
        fatal(ctx, EX_TEMPFAIL, f"scan queue directory {spool.queue_directory}: "
                                f"{exc.strerror or exc}")


@cli.command("show", help=f"""Show one queued message as Postfix's postcat does.

The envelope records, the headers and the body (all three by default), then the
message's bounce, defer and trace log entries (with the envelope).
{EXIT_HELP}""")
@click.option("-e", "--envelope", is_flag=True, help="The envelope records (and logs).")
@click.option("--headers", is_flag=True, help="The message headers.")
@click.option("-b", "--body", is_flag=True, help="The message body.")
@click.option("--json", "as_json_", is_flag=True, help="The message as one JSON object.")
@click.argument("qid", metavar="ID")
@click.pass_context
def show_cmd(ctx: click.Context, envelope: bool, headers: bool, body: bool, as_json_: bool,
             qid: str) -> None:
    import json

    from qmgrd.ctl.qread import NotRegular
    from qmgrd.ctl.show import as_json, locate, render, render_logs
    from qmgrd.spool.message import CorruptQueueFile
    from qmgrd.spool.queueid import valid_id

    spool, _, _ = settings(ctx, load(ctx))
    if not valid_id(qid):
        fatal(ctx, EX_DATAERR, f"invalid queue id: {qid[:60]!r}")
    check_queue_dir(ctx, spool)
    try:
        found = locate(spool, qid)
    except PermissionError as exc:
        denied(ctx, f"show {qid}", exc)
    if found is None:
        fatal(ctx, EX_NOINPUT, f"{qid}: no such message in the queue")
    queue, path = found
    if not (envelope or headers or body):
        envelope = headers = body = True
    out = Output(sys.stdout.buffer)
    try:
        if as_json_:
            out.write(json.dumps(as_json(spool, queue, qid, path), indent=1).encode() + b"\n")
        else:
            for chunk in render(path, envelope=envelope, headers=headers, body=body):
                out.write(chunk)
            if envelope:
                for chunk in render_logs(spool, qid):
                    out.write(chunk)
        out.flush()
    except BrokenPipeError:
        quiet_stdout()
        ctx.exit(EX_OK)
    except FileNotFoundError:
        fatal(ctx, EX_NOINPUT, f"{qid}: the message left the queue")
    except NotRegular:
        out.flush()
        fatal(ctx, EX_DATAERR, f"{path}: not a regular file (FIFO, device or symbolic "
                               "link): not shown")
    except PermissionError as exc:
        out.flush()
        denied(ctx, f"show {qid}", exc)
    except CorruptQueueFile as exc:
        out.flush()
        fatal(ctx, EX_DATAERR, f"{path}: damaged queue file: {exc}")
    except OSError as exc:
        fatal(ctx, EX_TEMPFAIL, f"{path}: {exc.strerror or exc}")


@cli.command("shape", help=f"""Show the queue's shape as Postfix's qshape does.

Recipients (-s: senders) by domain and age: bucket i holds mail between
bucket_time * 2^(i-2) and bucket_time * 2^(i-1) minutes old. Default queues:
incoming active.
{EXIT_HELP}""")
@click.option("-s", "by_sender", is_flag=True, help="Count sender domains.")
@click.option("-p", "parents", is_flag=True, help="Also count parent domains (.domain).")
@click.option("-m", "min_sub", type=click.IntRange(min=1), default=5, show_default=True,
              help="Show a parent with at least this many subdomains.")
@click.option("-b", "buckets", type=click.IntRange(1, 100), default=10, show_default=True,
              help="Number of age buckets (each twice the previous: 100 is far past any "
                   "queue lifetime; a billion was a MemoryError traceback).")
@click.option("-t", "bucket_time", type=click.IntRange(min=1), default=5,
              show_default=True, help="Minutes of the first bucket.")
@click.option("-l", "linear", is_flag=True, help="Linear buckets.")
@click.option("-w", "width", type=int, default=80, show_default=True,
              help="Width of the table (values up to 80 are ignored, as in qshape).")
@click.option("--json", "as_json_", is_flag=True, help="The table as one JSON object.")
@click.argument("queues", nargs=-1, type=click.Choice(QUEUE_NAMES))
@click.pass_context
def shape_cmd(ctx: click.Context, by_sender: bool, parents: bool, min_sub: int,
              buckets: int, bucket_time: int, linear: bool, width: int, as_json_: bool,
              queues: tuple[str, ...]) -> None:
    import json

    from qmgrd.ctl.shape import Shape, count, format_table

    spool, _, _ = settings(ctx, load(ctx))
    check_queue_dir(ctx, spool)
    opts = Shape(queues=queues or ("incoming", "active"), by_sender=by_sender,
                 parents=parents, min_subdomains=min_sub, buckets=buckets,
                 bucket_time=bucket_time, linear=linear)
    try:
        table = count(spool, opts)
        text = (json.dumps(table.as_json()) + "\n" if as_json_
                else format_table(table, max(80, width)))
        click.echo(text, nl=False)
    except BrokenPipeError:
        quiet_stdout()
        ctx.exit(EX_OK)
    except PermissionError as exc:
        denied(ctx, "shape: read the mail queue", exc)
    except OSError as exc:
        fatal(ctx, EX_TEMPFAIL, f"scan queue directory {spool.queue_directory}: {exc}")


@cli.command("flush", help=f"""Attempt to deliver queued mail, as postqueue -f/-s/-i.

Without options: FADI to public/qmgr and W to public/pickup (everything). --id: move
those deferred messages to incoming now (postqueue -i). --site: the deferred mail for
DOMAIN, --batch messages every --pace seconds (postqueue -s).
{EXIT_HELP}""")
@click.option("--site", metavar="DOMAIN", help="Only mail for DOMAIN (.DOMAIN: below).")
@click.option("--id", "ids", multiple=True, metavar="ID", help="Only this message.")
@click.option("--batch", type=click.IntRange(min=1), default=100, show_default=True,
              help="Messages per batch (--site).")
@click.option("--pace", type=Seconds(86400), default=1.0, show_default=True,
              help="Seconds between batches (--site).")
@click.pass_context
def flush_cmd(ctx: click.Context, site: str | None, ids: tuple[str, ...], batch: int,
              pace: float) -> None:
    if site is not None or ids:
        change.flush_some(ctx, site, ids, batch, pace)
        return
    cfg = load(ctx)
    try:
        queue_directory = cfg.queue_directory()
    except ConfigError as exc:
        fatal(ctx, EX_CONFIG, str(exc))
    if not flush_all(queue_directory):
        down_or_missing(ctx, queue_directory, "Cannot flush mail queue - mail system is down")


@cli.command("status", help=f"""Show the qmgr's scheduler state.

Asks the running qmgr over private/qmgr-status: transports, destinations (concurrency
window, busy, todo, dead or suspended with the saved reason), operator suspensions,
active queue counts.
{EXIT_HELP}""")
@click.option("--json", "as_json_", is_flag=True, help="The qmgr's JSON document, indented.")
@click.pass_context
def status_cmd(ctx: click.Context, as_json_: bool) -> None:
    import json

    from qmgrd.qmgr.status import format_text

    cfg = load(ctx)
    try:
        qdir = cfg.queue_directory()
    except ConfigError as exc:
        fatal(ctx, EX_CONFIG, str(exc))
    path = os.path.join(qdir, "private", "qmgr-status")
    try:
        snap = fetch(path)
    except PermissionError as exc:
        denied(ctx, f"status: connect to {path}", exc)
    except (FileNotFoundError, ConnectionRefusedError):
        down_or_missing(ctx, qdir, f"the qmgr is not running (nothing listens on {path}): "
                        "is the mail system up?")
    except (OSError, ValueError, TypeError) as exc:
        fatal(ctx, EX_UNAVAILABLE, f"cannot get the qmgr status from {path}: {exc}")
    try:
        if as_json_:
            click.echo(json.dumps(snap, indent=2, sort_keys=True))
        else:
            click.echo(format_text(snap), nl=False)
    except BrokenPipeError:
        quiet_stdout()
        ctx.exit(EX_OK)


@cli.command("config", help=f"""Print main.cf parameters, as postconf does: every
effective value; -d the defaults; -n only what main.cf sets; -x expanded. With NAMEs, only
those (an unknown name: a warning, the others are printed, as postconf). With NAME=VALUE arguments: set them in main.cf, as
postconf -e (the result must be a valid configuration; nothing is written otherwise).
{EXIT_HELP}""")
@click.option("-d", "defaults", is_flag=True, help="Print the default values.")
@click.option("-n", "nondefault", is_flag=True, help="Print only what main.cf sets.")
@click.option("-x", "expand", is_flag=True, help="Expand $name in the values.")
@click.argument("names", nargs=-1)
@click.pass_context
def config_cmd(ctx: click.Context, defaults: bool, nondefault: bool, expand: bool,
               names: tuple[str, ...]) -> None:
    if any("=" in n for n in names):
        _config_set(ctx, names, defaults or nondefault or expand)
        return
    cfg = load(ctx)
    if defaults and nondefault:
        fatal(ctx, EX_USAGE, "-d and -n are mutually exclusive")
    if not names:  # the whole configuration: as postconf, unused parameters are named
        _warn_unused(cfg)
    lines = cfg.dump(defaults=defaults, nondefault=nondefault, expand=expand,
                     only=names or None)
    if names:
        from master.config.maincf import transport_fallback

        by_name = {line.split(" =", 1)[0]: line for line in lines}
        for n in names:  # as postconf: warn about unknown names, print the others
            fallback = transport_fallback(n) if n not in by_name else None
            if fallback is not None:  # smtp_destination_recipient_limit, as postconf
                value = cfg.get(fallback) if expand else f"${fallback}"
                by_name[n] = f"{n} = {value}" if value else f"{n} ="
            elif n not in by_name:
                warn(f"{_escaped(n)}: unknown parameter")
        lines = [by_name[n] for n in names if n in by_name]
    for line in lines:
        click.echo(line)


def _warn_unused(cfg: Config) -> None:
    """As postconf: a warning for each main.cf parameter that nothing reads (a misspelt
    name: ``qmgr-ctl: warning: <main.cf>, line <n>: unused parameter: name=value``),
    master.cf's ``-o`` values counting as readers; a master.cf that cannot be read only
    leaves those out. Printed by ``config`` and ``config -n`` (postconf prints them in
    every mode; here a lookup of named parameters stays quiet)."""
    from master.config import load_master_cf
    from master.config.validate import unused_parameters

    try:
        services = load_master_cf(os.path.join(cfg.config_directory, "master.cf"), cfg)
    except (ConfigError, OSError):
        services = []
    for text in unused_parameters(cfg, services):
        warn(text)


def _escaped(text: str) -> str:
    """A name from the command line, safe to show (escaped when not plain, bounded)."""
    return text if text.isprintable() and text.isascii() and len(text) <= 80 \
        else ascii(text[:80])


def _config_set(ctx: click.Context, names: tuple[str, ...], flags: bool) -> None:
    """``config NAME=VALUE...`` (qmgrd.ctl.postconf)."""
    from master.config.maincf import param_spec
    from qmgrd.ctl.postconf import edit_main_cf, parse_assignments

    if flags:
        fatal(ctx, EX_USAGE, "config: -d, -n and -x do not go with NAME=VALUE")
    try:
        changes = parse_assignments(names)
    except ValueError as exc:
        fatal(ctx, EX_USAGE, str(exc))
    directory = str(ctx.find_root().obj)
    for name in changes:
        if param_spec(name) is None:  # postconf -e writes it too, silently; we warn
            warn(f"{_escaped(name)}: unknown parameter (no qmgrd program reads it); "
                 "written to main.cf anyway")
    try:
        edit_main_cf(directory, changes, warn)
    except ConfigError as exc:
        fatal(ctx, EX_CONFIG, f"not changed: {exc}")
    except PermissionError as exc:
        fatal(ctx, EX_NOPERM, f"cannot change {exc.filename}: {exc.strerror}")
    except OSError as exc:
        fatal(ctx, EX_CONFIG, f"cannot change main.cf in {directory}: {exc.strerror or exc}")


for _command in change.COMMANDS:
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run qmgr-ctl with ``argv`` (default sys.argv[1:]); exits with the status above."""
    cli.main(args=argv, prog_name=PROG)
    sys.exit(EX_OK)  # not reached: _Cli.main always exits in standalone mode


if __name__ == "__main__":
    main()
