"""change — the qmgr-ctl commands that change the queue: hold, release, delete, requeue,
suspend, resume, repair, and flush by id or site (the work is qmgrd.ctl.admin's;
repair's is qmgrd.spool.structure's).

Output: one line per message on standard output (postsuper's wording: ``<id>:
removed``, ``placed on hold``, ``released from hold``, ``requeued``; ``--dry-run``:
``<id>: would be removed (queue deferred)``), warnings for messages not found or still
being delivered on standard error (``<id>: in delivery; will be held when the delivery in
progress ends ...``, exit 75: such a message is not counted as done, and the qmgr logs
whether the change happened or was moot). A message whose recipients were all delivered
while the qmgr waited for its delivery in progress is not counted as done either:
``<id>: not removed: delivered meanwhile`` (``not placed on hold``, ``not requeued``;
standard output, exit 0: nothing is left to change). When the qmgr stopped before it
answered, a warning says so, the messages it held are counted as done (they are in
``hold/``) and those gone from the queue are ``<id>: outcome unknown: ...`` (exit 75;
removed by the qmgr or delivered meanwhile: the maillog tells). When the qmgr is alive
but does not answer within ``--wait`` + 2 seconds (stopped, overloaded), the whole
command ends then: a warning (``no answer from the qmgr (control reply timed out after
12s): it may be stopped or overloaded; the messages in the active queue were left to
it``, only when an active message was), and each message still in the active queue is ``<id>: outcome unknown: ...; it
has the request and makes the change when it runs again`` (exit 75; nothing is changed
under the qmgr). Then postsuper's summary on
standard error (``qmgr-ctl: Deleted: 3 messages``; ``...; outcome unknown: 2
messages``). An invalid queue id among the ids named (arguments or ``-``) is warned
about on standard error (``qmgr-ctl: warning: invalid mail queue id: '../x'``, postsuper's
words) and the valid ones are done, as postsuper does; the exit status is then 65 unless
it is 75 (postsuper exits 0, as it does for an id not in the queue, where qmgr-ctl exits
66). Exit codes: qmgrd.ctl.cli.

``repair`` (postsuper -s): nothing on standard output; each file it could not move on
standard error (``qmgr-ctl: warning: rename file deferred/C/<id> as deferred/C/E/<id>:
File exists (both kept; ...)``), then ``qmgr-ctl: Moved to the right queue
subdirectory: 2 messages, 2 log files`` when it moved anything; the same lines go to
the mail log. Exit 0, also when files were left because their place was taken; 74
(EX_IOERR) when some file could not be renamed (a warning each, then ``qmgr-ctl:
warning: <n> file[s] left out of place: ...``; the rest was done: postsuper warns and
goes on); 75 (EX_TEMPFAIL) when a directory of the queue could not be read (its files
were not checked; postsuper: fatal), whatever else happened. qmgr-master start goes on
after 74 (with a warning in the mail log) and fails on anything else but 0.

Public API
    COMMANDS: list[click.Command]       registered on the qmgr-ctl group by cli.py
    flush_some(ctx, site, ids, batch, pace) -> None     flush --site / --id
    MAX_SUSPEND_FOR = 365 days (seconds): suspend --for longer exits 64

Declaring the commands needs only click, qmgrd.ctl.common and qmgrd.ctl.queues, so that
the other qmgr-ctl commands start fast (issue 8). A command checks its arguments with light
modules (qmgrd.ctl.guard, qmgrd.ctl.select); the work, qmgrd.ctl.admin (asyncio for the
qmgr-control client), is loaded by common.changing once the caller may change the queue.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from qmgrd.ctl.common import (
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    EXIT_HELP,
    PROG,
    Seconds,
    changing,
    fatal,
    load,
    make_selector,
    selector_options,
    settings,
    warn,
)
from qmgrd.ctl.queues import QUEUES_FOR

if TYPE_CHECKING:
    from qmgrd.ctl.admin import Report

__all__ = ["COMMANDS", "MAX_SUSPEND_FOR", "flush_some"]

MAX_SUSPEND_FOR = 365 * 86400  # seconds: a longer --for is a usage error

_HELP = {
    "hold": "Put mail on hold, as postsuper -h: no delivery until it is released.",
    "release": "Release mail from hold, as postsuper -H (back to the deferred queue).",
    "delete": "Delete mail, as postsuper -d (with its bounce/defer/trace logs).",
    "requeue": "Requeue mail, as postsuper -r: routed again at once (transport maps "
               "re-read).",
}


def _exit_code(reports: list[Report]) -> int:
    from qmgrd.ctl.admin import UNKNOWN
    from qmgrd.qmgr.admin import ABSENT, BUSY

    results = {r.result for r in reports}
    if results & {BUSY, "error", "pending", UNKNOWN}:
        return EX_TEMPFAIL
    if ABSENT in results:
        return EX_NOINPUT
    return EX_OK


def _print(reports: list[Report]) -> None:
    from qmgrd.ctl.admin import UNKNOWN
    from qmgrd.qmgr.admin import ABSENT, BUSY

    for r in reports:
        if not r.text:  # admin.NOOP: hold of a message already on hold (postsuper: silent)
            continue
        if r.result in (ABSENT, BUSY, "error", "pending", UNKNOWN):
            warn(r.text)
        else:
            click.echo(r.text)


def _make(action: str) -> click.Command:
    @click.command(action, help=f"""{_HELP[action]}

IDs are queue ids; "-" reads ids from standard input; ALL (upper case) selects every
message of the queues ({", ".join(QUEUES_FOR[action])}); the selectors select
(and, with ids, narrow) the messages as in list. Active mail is changed by the qmgr
when its delivery in progress ends.
{EXIT_HELP}""")
    @click.option("--dry-run", is_flag=True, help="Only print what would be done.")
    @click.option("--wait", type=Seconds(60), default=10.0, show_default=True,
                  help="Seconds to wait for deliveries in progress (the qmgr's "
                       "answer: at most 2 s more).")
    @selector_options
    @click.argument("ids", nargs=-1, metavar="[ID... | - | ALL]")
    @click.pass_context
    def command(ctx: click.Context, /, dry_run: bool, wait: float, ids: tuple[str, ...],
                **sel: Any) -> None:
        from qmgrd.ctl.guard import BadIds, split_ids

        cfg = load(ctx)
        spool, _, _ = settings(ctx, cfg)
        selector = make_selector(ctx, **sel)
        everything = "ALL" in ids
        if everything and len(ids) > 1:
            fatal(ctx, EX_USAGE, "ALL cannot be combined with queue ids")
        if not ids and not selector.active:
            fatal(ctx, EX_USAGE, f"{action}: name the messages: ID..., -, ALL or selectors")
        bad = [q for q in selector.queues if q not in QUEUES_FOR[action]
               and not (action == "delete" and q == "maildrop")]
        if bad:
            fatal(ctx, EX_USAGE, f"{action}: not for the {bad[0]} queue")
        invalid: list[str] = []
        try:
            # None: no ids named (ALL, or selectors alone); else the valid ids named - an
            # empty list when "-" read nothing, and then nothing is done
            named = None
            if not everything and ids:
                named, invalid = split_ids(ids, sys.stdin)
        except BadIds as exc:
            fatal(ctx, EX_DATAERR, str(exc))
        for text in invalid:  # postsuper: a warning each, the valid ones are done
            warn(f"invalid mail queue id: {text}")
        if invalid and not named:
            ctx.exit(EX_DATAERR)
        with changing(ctx, cfg, spool, action):
            from qmgrd.ctl import admin  # loaded by changing()

            targets = admin.select_targets(spool, action, named, everything, selector)
            runner = admin.Admin(spool, action, dry_run=dry_run, wait=wait)
            reports = runner.run(targets)
            if runner.tables_unconfirmed:
                warn("could not confirm that the qmgr uses the current transport maps "
                     f"({runner.tables_unconfirmed}): it may be stopped or overloaded; "
                     "if a transport map changed, the requeued messages may be "
                     "routed with the old one")
            if runner.left_to_qmgr:
                warn(f"no answer from the qmgr ({runner.lost_reason}): it may be stopped "
                     "or overloaded; the messages in the active queue were left to it")
            elif runner.lost_reason and not runner.tables_unconfirmed:
                warn(f"no answer from the qmgr ({runner.lost_reason}): what it did is "
                     "read from the queue directory")
            if not dry_run:
                admin.release_trigger(spool, action)
        if named is None:
            # ALL or selectors: a message gone since it was selected (delivered, or
            # deleted meanwhile) is no error, as with postsuper -h ALL
            from qmgrd.qmgr.admin import ABSENT

            reports = [r for r in reports if r.result != ABSENT]
        _print(reports)
        n = sum(1 for r in reports if r.result in ("done", "would"))
        plural = "" if n == 1 else "s"
        if dry_run:
            click.echo(f"{PROG}: dry run: {n} message{plural} would be "
                       f"{admin.DONE_TEXT[action]}", err=True)
        else:
            unknown = sum(1 for r in reports if r.result == admin.UNKNOWN)
            more = (f"; outcome unknown: {unknown} message{'' if unknown == 1 else 's'}"
                    if unknown else "")
            click.echo(f"{PROG}: {admin.SUMMARY[action]}: {n} message{plural}{more}",
                       err=True)
        code = _exit_code(reports)
        ctx.exit(EX_DATAERR if invalid and code != EX_TEMPFAIL else code)

    return command


def _key(ctx: click.Context, text: str) -> str:
    from qmgrd.qmgr.suspend import valid_key

    key = text.removesuffix(".")  # a fully qualified name
    if not valid_key(key):
        fatal(ctx, EX_USAGE, f"bad domain {text[:60]!r} (a domain, .domain or "
                             "[address]:port)")
    return key.lower()


def _why(exc: OSError | ValueError) -> str:
    """What could not be done, and where, for suspend's and resume's fatal line: the
    suspension file (``cannot update <queue_directory>/private/qmgr-suspend: No space
    left on device``), or another file (resume's flush: ``<file>: <strerror>``),
    without Python's ``[Errno N]``."""
    from master.config import describe
    from qmgrd.qmgr.suspend import SUSPEND_FILE

    if isinstance(exc, OSError) and os.path.basename(str(exc.filename or "")) \
            in (SUSPEND_FILE, SUSPEND_FILE + ".lock"):
        return f"cannot update {exc.filename}: {exc.strerror or exc}"
    return describe(exc)


@click.command("suspend", help=f"""Stop delivery to DOMAIN until resumed (or for a time).

DOMAIN is a recipient domain, .domain (its subdomains) or a nexthop [address]:port.
Its mail is deferred without delivery attempts while other mail flows; the suspension
is shown by status and survives a qmgr restart. With --for it ends by itself.
{EXIT_HELP}""")
@click.option("--for", "duration", metavar="DURATION",
              help="End after DURATION (30s, 5m, 2h, 1d, 1w; at most 365d).")
@click.option("--reason", default="", help="Why (shown in the defer reason and status).")
@click.argument("domain")
@click.pass_context
def suspend_cmd(ctx: click.Context, duration: str | None, reason: str, domain: str) -> None:
    from qmgrd.ctl.select import parse_age
    from qmgrd.qmgr.suspend import MAX_REASON

    key = _key(ctx, domain)
    try:
        seconds = parse_age(duration) if duration else 0
    except ValueError as exc:
        fatal(ctx, EX_USAGE, str(exc))
    if duration and seconds <= 0:
        fatal(ctx, EX_USAGE, "--for must be longer than 0s")
    if seconds > MAX_SUSPEND_FOR:
        fatal(ctx, EX_USAGE, f"--for: at most {MAX_SUSPEND_FOR // 86400}d (omit --for to "
                             "suspend until resume)")
    if len(reason) > MAX_REASON or not reason.isprintable():
        fatal(ctx, EX_USAGE, f"--reason: at most {MAX_REASON} printable characters")
    cfg = load(ctx)
    spool, _, _ = settings(ctx, cfg)
    now = time.time()
    with changing(ctx, cfg, spool, "suspend"):
        from qmgrd.ctl import admin  # loaded by changing()

        try:
            text = admin.suspend(spool, key, now + seconds if seconds else 0.0, reason, now)
        except (OSError, ValueError) as exc:
            fatal(ctx, EX_TEMPFAIL, f"suspend {key}: {_why(exc)}; nothing changed")
    click.echo(text)


@click.command("resume", help=f"""Resume delivery to DOMAIN (see suspend).

The suspension ends at once; the mail it deferred is then moved back for delivery,
--batch messages every --pace seconds (by default 100 a second, so that a backlog does
not reach the destination all at once; --pace 0: all at once), and the command returns
when all of it is moved. If it is interrupted, the rest goes at its next retry time or
with a later "flush --site DOMAIN".
{EXIT_HELP}""")
@click.option("--batch", type=click.IntRange(min=1), default=100, show_default=True,
              help="Messages per batch.")
@click.option("--pace", type=Seconds(86400), default=1.0, show_default=True,
              help="Seconds between batches (0: no pause).")
@click.argument("domain")
@click.pass_context
def resume_cmd(ctx: click.Context, batch: int, pace: float, domain: str) -> None:
    key = _key(ctx, domain)
    cfg = load(ctx)
    spool, _, _ = settings(ctx, cfg)
    with changing(ctx, cfg, spool, "resume"):
        from qmgrd.ctl import admin  # loaded by changing()

        try:
            text = admin.resume(spool, key, batch, pace)
        except (OSError, ValueError) as exc:
            why = _why(exc)
            if why.startswith("cannot update "):
                why += "; the suspension still holds"
            fatal(ctx, EX_TEMPFAIL, f"resume {key}: {why}")
    click.echo(text)


def flush_some(ctx: click.Context, site: str | None, ids: tuple[str, ...], batch: int,
               pace: float) -> None:
    """``flush --site`` / ``flush --id`` (see qmgrd.ctl.admin)."""
    from qmgrd.ctl.guard import BadIds, parse_ids

    if site and ids:
        fatal(ctx, EX_USAGE, "flush: --site and --id are mutually exclusive")
    cfg = load(ctx)
    spool, _, _ = settings(ctx, cfg)
    if site is not None:
        key = _key(ctx, site)
        if key.startswith("["):
            fatal(ctx, EX_USAGE, "flush --site: a domain, not a nexthop")
        with changing(ctx, cfg, spool, "flush"):
            from qmgrd.ctl import admin  # loaded by changing()

            moved = admin.flush_site(spool, key, batch, pace)
        click.echo(f"{PROG}: flushed {moved} deferred message{'' if moved == 1 else 's'} "
                   f"for {key}", err=True)
        return
    try:
        named = parse_ids(ids, None)
    except BadIds as exc:
        fatal(ctx, EX_DATAERR, str(exc))
    with changing(ctx, cfg, spool, "flush"):
        from qmgrd.ctl import admin  # loaded by changing()

        reports = admin.flush_ids(spool, named)
    _print(reports)
    ctx.exit(_exit_code(reports))


@click.command("repair", help=f"""Move queue files to where the hashing wants them, as
postsuper -s (structure check and repair).

After hash_queue_names or hash_queue_depth changes, mail already queued (and its bounce,
defer and trace logs) sits in the hash directories of the old setting, where the qmgr,
show, delete and hold do not look for it. repair renames each such file into its place
(nothing is copied; a file whose place is taken already is left where it is, with a
warning) and removes the hash directories no longer used. Names that are not queue ids
are left alone; maildrop is not touched. qmgr-master start runs it before the services
start, and a reload that changes the hashing runs it too.
{EXIT_HELP}""")
@click.pass_context
def repair_cmd(ctx: click.Context) -> None:
    cfg = load(ctx)
    spool, _, _ = settings(ctx, cfg)
    with changing(ctx, cfg, spool, "repair", work="qmgrd.spool.structure"):
        from qmgrd.spool import structure  # loaded by changing()

        report = structure.repair(spool)
    for text in report.problems:
        warn(text)
    if report.summary():
        click.echo(f"{PROG}: {report.summary()}", err=True)
    if report.errors:
        files = "file" if report.errors == 1 else "files"
        warn(f"{report.errors} {files} left out of place: the processes that open a "
             "file by its queue id do not find it there (fix the cause, then run "
             "qmgr-ctl repair again)")
    ctx.exit(EX_TEMPFAIL if report.unreadable else EX_IOERR if report.errors else EX_OK)


COMMANDS: list[click.Command] = [_make(a) for a in QUEUES_FOR] + [suspend_cmd, resume_cmd,
                                                                  repair_cmd]
