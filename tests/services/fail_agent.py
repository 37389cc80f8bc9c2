"""tests.services.fail_agent - a service whose start-up always fails (throttling tests)."""

from __future__ import annotations

import socket

from master.server.skeleton import ServerContext, single_server


def _broken(ctx: ServerContext) -> None:
    raise RuntimeError("this service cannot start")


def handle(conn: socket.socket, ctx: ServerContext) -> None:
    """Never reached."""


if __name__ == "__main__":
    single_server(handle, pre_jail=_broken)
