"""tests.services.echo_agent - a tiny single_server service for the master's process tests.

Each connection: read one line, answer ``<service> <pid> <generation> <line>\\n``.  With
the argument ``slow`` the request is held open: after the first line it answers
``started <pid> <generation>\\n`` and waits for a second line before the real answer.
"""

from __future__ import annotations

import os
import socket

from master.server.skeleton import ServerContext, single_server


def _readline(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1024)
        if not chunk:
            break
        data += chunk
    return data.strip()


def handle(conn: socket.socket, ctx: ServerContext) -> None:
    """Answer one request (see the module docstring)."""
    line = _readline(conn)
    if "slow" in ctx.args:
        conn.sendall(f"started {os.getpid()} {ctx.generation}\n".encode())
        _readline(conn)
    reply = f"{ctx.service} {os.getpid()} {ctx.generation} {line.decode()}\n"
    conn.sendall(reply.encode())


if __name__ == "__main__":
    single_server(handle)
