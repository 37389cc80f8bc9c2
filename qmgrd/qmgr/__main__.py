"""qmgrd.qmgr — the queue manager daemon (``python -m qmgrd.qmgr``), Postfix's qmgr(8).

Started by the master for the ``qmgr`` service of master.cf (a FIFO, ``public/qmgr``,
maxproc 1, wakeup 300; the bundled master.cf runs it unprivileged and chrooted into
``queue_directory``). Reads one-byte triggers from the FIFO and runs the
:class:`qmgrd.qmgr.scheduler.Scheduler` loop until the master closes the status pipe
(reload, stop, master death) or SIGTERM; then it stops feeding and dispatching at once,
lets in-flight deliveries finish (bounded by ``qmgr_ipc_timeout``, at most 2 s) and exits
0. A delivery that fails then because the agents go away too (with the master) leaves
its message in ``active/`` untouched, for the next qmgr to retry at once - no deferral, no
dead transport (qmgrd.qmgr.scheduler, "Going away"); a failed delivery asks whether
the status descriptor is readable, so this holds when an agent notices the master's
death before the qmgr does.

Triggers are untrusted (any local user may write into ``public/qmgr``): up to 1024 bytes
are read at a time, at most one read per ``TRIGGER_INTERVAL`` (10 ms; a lone trigger is
read at once, a flood waits in the FIFO and is coalesced), and a full 1024-byte read also
counts as a ``W`` wakeup: the FIFO is backing up, and writers that find it full drop their
trigger as already pending, so a flood of garbage cannot hide new mail. Nor can it make
the qmgr hammer a destination: the scheduler starts at most one forced (``A``,
ignore-time) deferred scan per second, coalescing later requests.

It also serves the scheduler's state on ``private/qmgr-status`` (qmgrd.qmgr.status; a
UNIX socket it creates itself, mode 0600, under the queue directory so that it works in
the chroot), read by ``qmgr-ctl status``, and takes qmgr-ctl's requests (hold, delete,
requeue of active mail; suspensions, read from ``private/qmgr-suspend`` at start) on
``private/qmgr-control`` (qmgrd.qmgr.control).

Pre-jail (before chroot): read master.cf for the transports' process limits, open the
transport maps (kept open, so that a changed map is still noticed inside the jail: the
qmgr then exits and the master starts a fresh one, Postfix's pre_accept check), and
load what would otherwise be loaded lazily (time zone, codecs). After the jail every
path is relative to the queue directory. A transport map that cannot be read is one
line, ``fatal: parameter transport_maps: hash:/x: No such file or directory`` (exit 1;
``qmgr-master start``/``reload`` refuse such a configuration before, see
master.config.validate, so this happens only when the file goes away later).

Start-up (active/ back to incoming/, the incoming and deferred directories opened) is
done before the first trigger is read: a queue directory it cannot read is one line,
``fatal: scan_dir_push: open directory active: Permission denied`` (Postfix's), exit 1,
with no trigger counted as a use, so the master throttles the service for
``service_throttle_time`` instead of starting a new qmgr every second.

Unknown trigger bytes are logged once, as a count and the hex of the first 16 bytes.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import time

from master import log
from master.config.mastercf import load_master_cf
from master.server.skeleton import ServerContext, async_server
from qmgrd.maps import SETTLE_TIME, TableError
from qmgrd.qmgr.client import AgentClient
from qmgrd.qmgr.control import CONTROL_SOCKET, Control, ControlServer
from qmgrd.qmgr.resolve import Resolver
from qmgrd.qmgr.scheduler import Scheduler
from qmgrd.qmgr.status import StatusServer
from qmgrd.spool.queue import Spool
from qmgrd.trigger import TRIGGER_REQ_WAKEUP

TRIGGER_READ = 1024  # bytes per read of the FIFO, as Postfix's trigger server
TRIGGER_INTERVAL = 0.01  # s: reads closer together than this are paced (flood)


class _PreJail:
    """What the qmgr reads before the jail closes (see module docstring)."""

    def __init__(self) -> None:
        self.limits: dict[str, int] = {}
        self.resolver: Resolver | None = None


_PRE = _PreJail()


def _process_limits(ctx: ServerContext) -> dict[str, int]:
    cfg = ctx.config
    try:
        services = load_master_cf(os.path.join(cfg.get("config_directory"), "master.cf"), cfg)
    except Exception as exc:  # noqa: BLE001 - config trouble is the master's to report
        log.warning(f"cannot read master.cf for process limits: {exc}")
        return {}
    return {s.name: s.maxproc for s in services if s.type == "unix"}


def pre_jail(ctx: ServerContext) -> None:
    """Read everything that lives outside the queue directory."""
    _PRE.limits = _process_limits(ctx)
    try:
        _PRE.resolver = Resolver(ctx.config)
    except TableError as exc:  # bad input, not a bug: one fatal line, no traceback
        log.fatal(f"parameter transport_maps: {exc}")
    time.localtime()  # load the time zone before chroot hides /etc/localtime
    for name in ("idna", "utf-8", "ascii", "latin-1"):
        codecs.lookup(name)


async def qmgr_main(ctx: ServerContext) -> None:
    """The qmgr's asyncio main: wire triggers and the status pipe to the scheduler."""
    cfg = ctx.config
    spool = Spool(
        ctx.queue_directory,
        tuple(cfg.hash_queue_names()),
        cfg.get_int("hash_queue_depth"),
    )
    client = AgentClient(
        ctx.queue_directory,
        greeting_timeout=float(cfg.get_time("qmgr_ipc_timeout")),
        reply_timeout=float(cfg.get_time("daemon_timeout")),
    )
    sched = Scheduler(cfg, spool, client, process_limits=_PRE.limits,
                      resolver=_PRE.resolver, master_gone=ctx.status_closed)
    loop = asyncio.get_running_loop()
    fifo = ctx.listen_fds[0] if ctx.listen_fds else -1

    last_read = -TRIGGER_INTERVAL
    paused: list[asyncio.TimerHandle] = []

    def resume() -> None:
        paused.clear()
        loop.add_reader(fifo, on_trigger)

    def on_trigger() -> None:
        nonlocal last_read
        now = loop.time()
        if now < last_read + TRIGGER_INTERVAL:  # a flood: pace the reads, bytes wait
            loop.remove_reader(fifo)
            paused.append(loop.call_later(last_read + TRIGGER_INTERVAL - now, resume))
            return
        last_read = now
        try:
            data = os.read(fifo, TRIGGER_READ)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning(f"trigger read: {exc}")
            return
        if data:
            ctx.busy()
            # A full read: the FIFO is backing up, and a writer that finds it full drops
            # its trigger as "already pending" (send_trigger). So it counts as a wakeup.
            sched.trigger(data + TRIGGER_REQ_WAKEUP if len(data) >= TRIGGER_READ else data)
            ctx.idle()

    # Postfix's qmgr_post_init: recover active/ and open the scans before the first
    # trigger is read - a trigger read is a use for the master, and only a child that
    # dies before its first use throttles its service ("bad command startup").
    sched.startup()
    if fifo >= 0:
        os.set_blocking(fifo, False)
        loop.add_reader(fifo, on_trigger)

    async def watch_tables() -> None:
        while not ctx.stopping.is_set():
            await asyncio.sleep(5)
            table = sched.resolver.changed_table(SETTLE_TIME)  # a rewrite is complete
            if table is not None:
                log.info(f"table {table} has changed -- restarting")
                ctx.stopping.set()

    status = StatusServer(os.path.join(ctx.queue_directory, "private", "qmgr-status"),
                          sched.snapshot)
    await status.start()
    control = Control(sched, ctx.queue_directory, ctx.stopping.set)
    control.load_suspensions()
    control_server = ControlServer(os.path.join(ctx.queue_directory, "private",
                                                CONTROL_SOCKET), control)
    await control_server.start()
    watcher = loop.create_task(watch_tables())
    try:
        # On reload or stop, Postfix's qmgr exits at once. Give replies already on their way
        # a moment, but never hold up the new qmgr (the master runs one at a time): files
        # still being delivered are skipped by the next qmgr and retried.
        await sched.run(ctx.stopping, drain_timeout=min(2.0, float(cfg.get_time(
            "qmgr_ipc_timeout"))))
    finally:
        watcher.cancel()
        await status.close()
        await control_server.close()
        for handle in paused:
            handle.cancel()
        if fifo >= 0:
            loop.remove_reader(fifo)


def main() -> None:
    """Entry point: the async server skeleton runs :func:`qmgr_main`."""
    async_server(qmgr_main, pre_jail=pre_jail)


if __name__ == "__main__":
    main()
