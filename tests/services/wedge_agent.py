"""tests.services.wedge_agent - a single_server that wedges on request (watchdog tests).

Each connection: read one line; ``wedge`` blocks for ever in select() (only the watchdog's
SIGALRM ends it); anything else is answered ``ok <pid>``.
"""

from __future__ import annotations

import os
import select
import socket

from master.server.skeleton import ServerContext, single_server


def handle(conn: socket.socket, ctx: ServerContext) -> None:
    """Answer or wedge (module docstring)."""
    line = conn.recv(1024).strip()
    if line == b"wedge":
        conn.sendall(b"wedged\n")
        while True:
            select.select([], [], [])
    conn.sendall(f"ok {os.getpid()}\n".encode())


if __name__ == "__main__":
    single_server(handle)
