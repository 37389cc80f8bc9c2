"""tests.services.async_wedge_agent - an async_server whose loop can be wedged.

main() writes ``<queue_directory>/<service>.ticks`` (the number of 0.1 s ticks so far)
until ctx.stopping is set.  When ``<queue_directory>/<service>.wedge`` appears it blocks
the event loop for ever (a synchronous select(), so the watchdog's keepalive task can no
longer run and SIGALRM ends the process).
"""

from __future__ import annotations

import asyncio
import os
import select

from master.server.skeleton import ServerContext, async_server


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="ascii") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


async def main(ctx: ServerContext) -> None:
    """Tick, or wedge (module docstring)."""
    ticks = os.path.join(ctx.queue_directory, f"{ctx.service}.ticks")
    wedge = os.path.join(ctx.queue_directory, f"{ctx.service}.wedge")
    count = 0
    while not ctx.stopping.is_set():
        if os.path.exists(wedge):
            while True:
                select.select([], [], [])
        count += 1
        _write(ticks, str(count))
        try:
            await asyncio.wait_for(ctx.stopping.wait(), 0.1)
        except TimeoutError:
            pass


if __name__ == "__main__":
    async_server(main)
