"""tests.services.jail_agent - a single_server that reports what its jail looks like.

Each connection: read one line, answer one JSON object: pid, uid/euid/saved uid, gid/egid/
saved gid, supplementary groups, whether setuid(0) failed ("setuid0": "denied" or "ALLOWED"),
the current directory, ``ctx.queue_directory``, the names in "/" (sorted), and whether the
argument ``pre_jail`` hook saw an absolute queue_directory it could list.
"""

from __future__ import annotations

import json
import os
import socket

from master.server.skeleton import ServerContext, single_server

_SEEN: dict[str, object] = {}


def _pre_jail(ctx: ServerContext) -> None:
    """What a real service does before the jail: look at the queue by its full path."""
    _SEEN["pre_jail_queue_directory"] = ctx.queue_directory
    _SEEN["pre_jail_listing"] = sorted(os.listdir(ctx.queue_directory))
    _SEEN["pre_jail_cwd"] = os.getcwd()


def _try_setuid0() -> str:
    try:
        os.setuid(0)
    except PermissionError:
        return "denied"
    return "ALLOWED"


def handle(conn: socket.socket, ctx: ServerContext) -> None:
    """Answer one request with the JSON report (module docstring)."""
    conn.recv(1024)
    report = {
        "pid": os.getpid(), "uids": list(os.getresuid()), "gids": list(os.getresgid()),
        "groups": os.getgroups(), "setuid0": _try_setuid0(), "cwd": os.getcwd(),
        "queue_directory": ctx.queue_directory, "root_listing": sorted(os.listdir("/")),
        **_SEEN,
    }
    conn.sendall(json.dumps(report).encode() + b"\n")


if __name__ == "__main__":
    single_server(handle, pre_jail=_pre_jail)
