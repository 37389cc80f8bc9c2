"""jsonsock — the qmgr's private UNIX sockets that speak one JSON object each way.

Summary
    ``private/qmgr-status`` (qmgrd.qmgr.status) and ``private/qmgr-control``
    (qmgrd.qmgr.control) share this plumbing: a server the qmgr creates itself (mode
    0600, so only root and mail_owner connect; it works inside the chroot) that answers
    each connection with one JSON object and a newline, and the client side used by
    ``qmgr-ctl``.

Public API
    JsonServer(path, what, limit=None)
        ``await start() -> bool`` (False and a warning when the socket cannot be made),
        ``await close()`` (the socket is removed unless a newer qmgr has replaced it);
        subclasses implement ``await reply(reader) -> dict``.
    exchange(path, doc, limit, what, timeout) -> dict
        connect, send ``doc`` (unless None) as one line, read the reply until EOF;
        ``timeout`` (seconds) bounds the whole exchange, not each step.
        Raises OSError (no qmgr listens), TimeoutError (an OSError: the qmgr did not
        take the request within ``timeout`` - it does not accept connections, e.g.
        stopped with SIGSTOP and its listen queue full - so nothing was asked),
        ValueError (not JSON, or more than ``limit`` bytes), TypeError (JSON, but not
        an object); :class:`ReplyLost` (an OSError) when the request was sent but no
        complete reply came back - the qmgr closed the connection before its
        newline-ended reply (it died or was stopped) - so what the request did is
        unknown; :class:`ReplyTimedOut` (a ReplyLost) when the request was sent but the
        reply did not come within ``timeout``: the qmgr is alive but does not answer
        (stopped with SIGSTOP, or overloaded), and the request waits in its socket - it
        acts on it when it runs again.
    ReplyLost(OSError), ReplyTimedOut(ReplyLost)

Logs: ``warning: cannot remove stale <path>``, ``warning: cannot create <what> socket``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from typing import Any

from master import log

__all__ = ["JsonServer", "ReplyLost", "ReplyTimedOut", "exchange"]

IO_TIMEOUT = 10  # seconds a peer may take to send its request or read the reply


class ReplyLost(OSError):
    """The request was sent, but the reply was cut off or never came: its outcome is
    unknown (the text says why: ``connection closed before the reply``, ``timed out``,
    or the socket error)."""


class ReplyTimedOut(ReplyLost):
    """The request was sent, but no reply came within the time allowed: the peer holds
    the connection open without answering (stopped, hung or overloaded) and still has
    the request, which it carries out when it runs again.  Text: ``<what> reply timed
    out after <n>s``."""


class JsonServer:
    """One JSON reply per connection on a UNIX socket (see module docstring)."""

    def __init__(self, path: str, what: str, limit: int | None = None) -> None:
        self.path = path
        self.what = what
        self.limit = limit
        self._server: asyncio.AbstractServer | None = None
        self._ident: tuple[int, int] | None = None

    async def reply(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        """The reply to one connection (its request, if any, is read from ``reader``)."""
        raise NotImplementedError

    async def start(self) -> bool:
        """Create the socket (mode 0600). False (and a warning) when that fails."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning(f"cannot remove stale {self.path}: {exc}")
            return False
        old = os.umask(0o177)
        try:
            if self.limit is None:
                self._server = await asyncio.start_unix_server(self._serve, path=self.path)
            else:
                self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                               limit=self.limit)
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._ident = (st.st_dev, st.st_ino)
        except OSError as exc:
            log.warning(f"cannot create {self.what} socket {self.path}: {exc}")
            return False
        finally:
            os.umask(old)
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            doc = await self.reply(reader)
            writer.write(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def close(self) -> None:
        """Stop serving; remove the socket unless a newer qmgr has replaced it."""
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass


def exchange(path: str, doc: dict[str, Any] | None, limit: int, what: str,
             timeout: float) -> dict[str, Any]:
    """Send ``doc`` (None: nothing) to the qmgr at ``path``; its reply.  ``timeout``
    (seconds) bounds connect, send and every read together (see module docstring for
    what is raised)."""
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout

    def left() -> float:
        """Seconds left of ``timeout`` (the socket timeout of the next step); raises
        TimeoutError once none are (a timeout of 0 would make the socket
        non-blocking)."""
        rest = deadline - time.monotonic()
        if rest <= 0:
            raise TimeoutError(f"{what}: timed out after {timeout:.3g}s")
        return rest

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(left())
        try:
            sock.connect(path)
        except TimeoutError as exc:  # a full listen queue: nobody takes connections
            raise TimeoutError(f"{what}: no connection within {timeout:.3g}s") from exc
        if doc is not None:
            request = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
            sock.settimeout(left())  # no time left to send: nothing was asked (TimeoutError)
        try:
            if doc is not None:
                # a request that cannot be written in full is lost as well: a peer may
                # act on the part it reads
                sock.sendall(request)
            while True:
                sock.settimeout(left())
                data = sock.recv(65536)
                if not data:
                    break
                size += len(data)
                if size > limit:
                    raise ValueError(f"{what} reply too large")
                chunks.append(data)
        except TimeoutError as exc:
            raise ReplyTimedOut(f"{what} reply timed out after {timeout:.3g}s") from exc
        except OSError as exc:
            raise ReplyLost(f"{what} reply: {exc.strerror or exc}") from exc
    raw = b"".join(chunks)
    if not raw.endswith(b"\n"):  # every reply ends with one: this one was cut off
        raise ReplyLost(f"{what}: connection closed before the reply"
                        + (f" ended ({len(raw)} bytes)" if raw else ""))
    reply = json.loads(raw)
    if not isinstance(reply, dict):
        raise TypeError(f"{what} reply is not a JSON object")
    return reply
