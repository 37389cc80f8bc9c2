"""tests.services.trigger_agent - a trigger_server that appends what it reads to a file.

The file is ``<queue_directory>/<service>.triggers``; each handler call adds one line
``<pid> <repr(data)>``.
"""

from __future__ import annotations

import os

from master.server.skeleton import ServerContext, trigger_server


def handle(data: bytes, ctx: ServerContext) -> None:
    """Record one trigger read."""
    path = os.path.join(ctx.queue_directory, f"{ctx.service}.triggers")
    with open(path, "a", encoding="ascii") as f:
        f.write(f"{os.getpid()} {data!r}\n")


if __name__ == "__main__":
    trigger_server(handle)
