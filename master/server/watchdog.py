"""master.server.watchdog - the per-process watchdog timer of every qmgrd daemon.

Summary
    Postfix's daemons abort when one request takes longer than ``daemon_timeout``
    (default 18000s; the queue manager uses ``qmgr_daemon_timeout``, 1000s) so that a
    wedged process cannot hold a service slot for ever (postfix.md §3.5).  qmgrd does the
    same with the kernel's alarm clock, not with a handler:

    * SIGALRM keeps its default action (the master spawns children with SIGALRM reset to
      SIG_DFL), so when the alarm fires the kernel terminates the process - no Python
      code has to run in a wedged process, and no signal handler does any work (design.md
      §4 rule 1 holds trivially).
    * single_server and trigger_server call :meth:`Watchdog.arm` (``alarm(timeout)``)
      before each request and :meth:`Watchdog.disarm` (``alarm(0)``) after it; while idle
      no alarm is pending, the max_idle limit ends an idle process.
    * async_server runs :meth:`Watchdog.keepalive` as a task of its event loop: it
      re-arms the alarm every ``interval()`` seconds (a quarter of the timeout, between
      0.25 s and 10 s) until main() returns (the drain after ``stopping`` included).  A
      loop that stops turning (a blocking call, an endless computation) stops re-arming
      and is killed ``timeout`` seconds later. A process that turns other loops in
      threads of their own (transports.smtpd's session threads) registers a probe for
      each with :meth:`Watchdog.watch`: the keepalive re-arms only while every probe
      says its loop turns, so a wedged thread gets the process killed as a wedged main
      loop does.
    * The master sees the child "killed by signal 14" and logs
      ``warning: process <module> pid <n> killed by signal 14 (watchdog timeout after
      <t>s?)``, where ``t`` is :func:`watchdog_timeout` of that service (the "?" because
      anyone may send SIGALRM).

    Which parameter: ``<process_name>_daemon_timeout`` when the parameter table knows it
    (``qmgr_daemon_timeout`` for the qmgr), else ``daemon_timeout``; the service's
    ``-o`` overrides apply.  The skeleton's ``watchdog=`` argument names another one.

Public API
    watchdog_param(process_name) -> str
    watchdog_timeout(cfg, process_name, param=None) -> int        seconds; ConfigError
    Watchdog(timeout): arm(), disarm(), interval() -> float, async keepalive(),
        watch(alive), unwatch(alive)      alive() -> bool: another loop still turns

Logs
    Nothing.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from master.config import PARAMS, Config

__all__ = ["Watchdog", "watchdog_param", "watchdog_timeout"]

MIN_INTERVAL = 0.25
MAX_INTERVAL = 10.0


def watchdog_param(process_name: str) -> str:
    """``<process_name>_daemon_timeout`` if the parameter table has it, else
    ``daemon_timeout``."""
    own = f"{process_name}_daemon_timeout"
    return own if own in PARAMS else "daemon_timeout"


def watchdog_timeout(cfg: Config, process_name: str, param: str | None = None) -> int:
    """The watchdog time (seconds, >= 1) of a process.  Raises ConfigError."""
    return max(1, cfg.get_time(param or watchdog_param(process_name)))


class Watchdog:
    """``alarm(2)`` based watchdog (module docstring).  The constructor does nothing."""

    def __init__(self, timeout: int) -> None:
        self.timeout = max(1, int(timeout))
        self._probes: list[Callable[[], bool]] = []

    def watch(self, alive: Callable[[], bool]) -> None:
        """Re-arm in keepalive only while ``alive()`` is true too (called in the
        keepalive's thread: a loop of another thread that must keep turning)."""
        self._probes.append(alive)

    def unwatch(self, alive: Callable[[], bool]) -> None:
        """Forget a probe of watch() (its thread has ended)."""
        if alive in self._probes:
            self._probes.remove(alive)

    def arm(self) -> None:
        """Start (or restart) the countdown: the process dies in ``timeout`` seconds."""
        signal.alarm(self.timeout)

    def disarm(self) -> None:
        """Cancel the countdown."""
        signal.alarm(0)

    def interval(self) -> float:
        """Seconds between two re-arms of :meth:`keepalive`."""
        return min(MAX_INTERVAL, max(MIN_INTERVAL, self.timeout / 4))

    async def keepalive(self) -> None:
        """Re-arm every interval() seconds until cancelled (not while a probe of
        watch() says its loop has stopped turning); disarm when cancelled."""
        import asyncio  # loaded by async_server already; kept out of the sync servers

        try:
            while True:
                if all(alive() for alive in self._probes):
                    self.arm()
                await asyncio.sleep(self.interval())
        finally:
            self.disarm()
