"""tests.services.async_agent - an async_server service for the skeleton tests.

main() writes ``<queue_directory>/<service>.loop`` = the module of its running event
loop's class, ``<queue_directory>/<service>.state`` = "running", waits for ctx.stopping,
then writes "stopped" and returns.
"""

from __future__ import annotations

import asyncio
import os

from master.server.skeleton import ServerContext, async_server


def _write(ctx: ServerContext, text: str, what: str = "state") -> None:
    path = os.path.join(ctx.queue_directory, f"{ctx.service}.{what}")
    with open(path + ".tmp", "w", encoding="ascii") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


async def main(ctx: ServerContext) -> None:
    """Run until the master (or SIGTERM) says stop."""
    _write(ctx, type(asyncio.get_running_loop()).__module__, "loop")
    _write(ctx, "running")
    await ctx.stopping.wait()
    _write(ctx, "stopped")


if __name__ == "__main__":
    async_server(main)
