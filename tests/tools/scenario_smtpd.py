"""scenario_smtpd — an SMTP test peer with one behaviour per 127.0.0.1 port, and its client.

Usage (a process of its own)::

    scenario_smtpd.py DIR PORT=BEHAVIOUR[:DATA_DELAY] ... PORT=cap:N[:DATA_DELAY] ...

PORT 0 lets the peer pick a free port (it binds port 0 itself, so no other process can
take the port between choosing and binding); the ports in use are in ``DIR/ready``.

Behaviours (one per port):

    accept     aiosmtpd; every RCPT 250, DATA 250 after DATA_DELAY seconds (default 0;
               a message with an ``X-Scenario-Delay: SECONDS`` header waits that long
               instead, so a test can hold chosen deliveries open; one with an
               ``X-Scenario-Hold: NAME`` header (letters, digits, ``-``, ``_``) is
               answered only once ``DIR/release-NAME`` exists (Scenario.release), at most
               HOLD_LIMIT (60) seconds later: held open exactly as long as the test needs)
    cap:N      as accept, but at most N sessions are served at once: a connection that
               arrives while N are open gets ``421 4.7.0 scenario.test too many
               connections`` as its greeting and is closed (counted in ``cap_refused``)
    defer      aiosmtpd; every RCPT ``450 4.2.0 try again later``
    reject     aiosmtpd; every RCPT ``550 5.1.1 ... User unknown``
    greet421   the greeting is ``421 4.3.2 service not available``, then the connection
               is closed
    silent     the TCP connection is accepted and nothing is ever sent (the peer reads
               and discards until the client hangs up)
    refuse     nothing listens: the port stays bound (so no other process takes it) but
               is never put in the listening state, so every connect gets ECONNREFUSED;
               no session is ever recorded

Records, per port, in ``DIR/stats.json`` (rewritten atomically, through a temporary file
and rename, after every change)::

    {"<port>": {"behaviour", "cap" (N, 0 = none), "sessions", "current",
                "max_concurrent", "messages", "cap_refused",
                "session_times": [epoch seconds of each connection],
                "cap_refused_times": [epoch seconds of each connection refused by cap],
                "timeline": [[epoch seconds, current], ...]}}

``current`` counts every open connection, those refused by ``cap`` included (until the
peer has closed them); ``timeline`` has one pair after each open and each close, in
order, so a test can see the concurrency at any moment.

Each accepted message is also saved as ``DIR/<port>/msg-<n>.eml`` (content bytes) plus
``.env`` (sender, then recipients, one a line; written after the .eml, by rename; its
mtime is the moment the message was accepted). ``DIR/ready`` is written (by rename)
once every port listens (or, for ``refuse``, is bound): a JSON list of the ports, in the
order of the arguments.

Public API (for tests; importing this module does not start anything)
    Scenario(root: Path, behaviours: dict[str, str])  starts the process (every port
        chosen by the peer: PORT 0); ``ports`` maps each name to its port;
        stats() -> dict (name -> record above), messages(name) -> list[bytes],
        deliveries(name) -> list[(epoch, bytes)] (accept time and content, in
        acceptance order), transport_lines() -> str (a texthash transport table routing
        each name to its port), release(hold) -> None (answers the DATA of the
        messages with ``X-Scenario-Hold: <hold>``, now and from then on), stop() -> None
        (terminates, waits).
    concurrency_at(timeline, t) -> int    the open connections at epoch ``t``
    Raises AssertionError when the peer does not come up within 15 s. The peer exits
    with an error for an unknown behaviour or a bad ``cap`` (N must be >= 1).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

STATS = "stats.json"
DELAY_HEADER = re.compile(rb"^X-Scenario-Delay:[ \t]*([0-9]+(?:\.[0-9]*)?)[ \t]*\r?$",
                          re.IGNORECASE | re.MULTILINE)
HOLD_HEADER = re.compile(rb"^X-Scenario-Hold:[ \t]*([A-Za-z0-9_-]+)[ \t]*\r?$",
                         re.IGNORECASE | re.MULTILINE)
HOLD_LIMIT = 60.0  # s: the longest a held DATA waits for its release file
BEHAVIOURS = ("accept", "cap", "defer", "reject", "greet421", "silent", "refuse")


class Spec:
    """One port's behaviour: ``name``, ``delay`` (DATA, seconds), ``cap`` (0 = none)."""

    def __init__(self, name: str, delay: float = 0.0, cap: int = 0) -> None:
        self.name, self.delay, self.cap = name, delay, cap


class Recorder:
    """Per-port counters, written to DIR/stats.json atomically after each change."""

    def __init__(self, directory: str, specs: dict[int, Spec]) -> None:
        self.dir = directory
        self.data: dict[str, dict[str, Any]] = {
            str(p): {"behaviour": s.name, "cap": s.cap, "sessions": 0, "current": 0,
                     "max_concurrent": 0, "messages": 0, "cap_refused": 0,
                     "session_times": [], "cap_refused_times": [], "timeline": []}
            for p, s in specs.items()}
        self.served = dict.fromkeys(specs, 0)
        self.n = 0
        self.flush()

    def opened(self, port: int) -> None:
        r = self.data[str(port)]
        now = time.time()
        r["sessions"] += 1
        r["current"] += 1
        r["max_concurrent"] = max(r["max_concurrent"], r["current"])
        r["session_times"].append(now)
        r["timeline"].append([now, r["current"]])
        self.flush()

    def closed(self, port: int) -> None:
        r = self.data[str(port)]
        r["current"] -= 1
        r["timeline"].append([time.time(), r["current"]])
        self.flush()

    def cap_refused(self, port: int) -> None:
        r = self.data[str(port)]
        r["cap_refused"] += 1
        r["cap_refused_times"].append(time.time())
        self.flush()

    def message(self, port: int, envelope: Envelope) -> None:
        self.n += 1
        d = os.path.join(self.dir, str(port))
        os.makedirs(d, exist_ok=True)
        base = os.path.join(d, f"msg-{self.n:06d}")
        content = envelope.original_content or b""
        with open(base + ".eml", "wb") as f:
            f.write(content)
        with open(base + ".tmp", "w") as f:
            f.write("\n".join([envelope.mail_from or ""] + list(envelope.rcpt_tos)) + "\n")
        os.rename(base + ".tmp", base + ".env")
        self.data[str(port)]["messages"] += 1
        self.flush()

    def flush(self) -> None:
        tmp = os.path.join(self.dir, STATS + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.rename(tmp, os.path.join(self.dir, STATS))


class Handler:
    """aiosmtpd handler for the accept/cap/defer/reject behaviours of one port."""

    def __init__(self, rec: Recorder, port: int, behaviour: str, delay: float) -> None:
        self.rec, self.port, self.behaviour, self.delay = rec, port, behaviour, delay

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if self.behaviour == "defer":
            return "450 4.2.0 try again later"
        if self.behaviour == "reject":
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        delay = self.delay
        header = (envelope.original_content or b"").split(b"\r\n\r\n", 1)[0]
        m = DELAY_HEADER.search(header)
        if m is not None:
            delay = float(m.group(1))
        if delay > 0:
            await asyncio.sleep(delay)
        hold = HOLD_HEADER.search(header)
        if hold is not None:
            released = os.path.join(self.rec.dir, f"release-{hold.group(1).decode()}")
            deadline = time.monotonic() + HOLD_LIMIT
            while not os.path.exists(released) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self.rec.message(self.port, envelope)
        return "250 2.0.0 Ok: queued"


class CountingSMTP(SMTP):
    """aiosmtpd's SMTP, counting its sessions in the Recorder (and, for ``cap``, the
    sessions it serves: Recorder.served, released when the connection is lost)."""

    def __init__(self, rec: Recorder, port: int, handler: Handler) -> None:
        super().__init__(handler, enable_SMTPUTF8=True, decode_data=False,
                         hostname="scenario.test", data_size_limit=0)
        self._rec, self._port = rec, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._rec.opened(self._port)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._rec.served[self._port] -= 1
        self._rec.closed(self._port)
        super().connection_lost(exc)


class TooMany(asyncio.Protocol):
    """A ``cap`` port's answer to a connection beyond N: 421 greeting, then close."""

    def __init__(self, rec: Recorder, port: int) -> None:
        self._rec, self._port = rec, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._rec.opened(self._port)
        self._rec.cap_refused(self._port)
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"421 4.7.0 scenario.test too many connections\r\n")
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._rec.closed(self._port)


def smtp_factory(rec: Recorder, port: int, spec: Spec, handler: Handler) -> asyncio.Protocol:
    """The protocol for a new connection. The served count is taken here, when the
    connection is accepted, so two connections accepted in one loop iteration cannot
    both slip under the cap."""
    if spec.cap and rec.served[port] >= spec.cap:
        return TooMany(rec, port)
    rec.served[port] += 1
    return CountingSMTP(rec, port, handler)


async def raw_session(rec: Recorder, port: int, behaviour: str,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """greet421 / silent: one connection."""
    rec.opened(port)
    try:
        if behaviour == "greet421":
            writer.write(b"421 4.3.2 scenario.test service not available\r\n")
            await writer.drain()
        else:
            while await reader.read(4096):
                pass
    except OSError:
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        rec.closed(port)


def parse(args: list[str]) -> list[tuple[int, Spec]]:
    """``PORT=BEHAVIOUR[:DELAY]`` / ``PORT=cap:N[:DELAY]`` arguments -> [(port, Spec)]."""
    out = []
    for a in args:
        port, _, rest = a.partition("=")
        behaviour, _, tail = rest.partition(":")
        if behaviour not in BEHAVIOURS:
            raise SystemExit(f"unknown behaviour {behaviour!r}")
        cap = 0
        if behaviour == "cap":
            n, _, tail = tail.partition(":")
            cap = int(n) if n.isdigit() else 0
            if cap < 1:
                raise SystemExit(f"bad cap in {rest!r}: cap:N needs N >= 1")
        out.append((int(port), Spec(behaviour, float(tail or 0), cap)))
    return out


def mark_ready(directory: str, ports: list[int]) -> None:
    """Write DIR/ready: the ports in use, as a JSON list (atomically, by rename)."""
    tmp = os.path.join(directory, "ready.tmp")
    with open(tmp, "w") as f:
        json.dump(ports, f)
    os.rename(tmp, os.path.join(directory, "ready"))


async def main() -> None:
    directory = sys.argv[1]
    socks: list[tuple[socket.socket, Spec]] = []
    for port, spec in parse(sys.argv[2:]):
        s = socket.socket()
        if port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # 0: a free port, ours from now on
        socks.append((s, spec))
    specs = {int(s.getsockname()[1]): spec for s, spec in socks}
    rec = Recorder(directory, specs)
    loop = asyncio.get_running_loop()
    servers: list[asyncio.base_events.Server] = []
    bound: list[socket.socket] = []  # ``refuse`` ports: bound, never listening
    for s, spec in socks:
        port = int(s.getsockname()[1])
        if spec.name == "refuse":
            bound.append(s)
        elif spec.name in ("greet421", "silent"):
            async def cb(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                         port: int = port, behaviour: str = spec.name) -> None:
                await raw_session(rec, port, behaviour, r, w)
            servers.append(await asyncio.start_server(cb, sock=s))
        else:
            handler = Handler(rec, port, spec.name, spec.delay)
            servers.append(await loop.create_server(
                functools.partial(smtp_factory, rec, port, spec, handler), sock=s))
    mark_ready(directory, [int(s.getsockname()[1]) for s, _spec in socks])
    try:
        await asyncio.gather(*(s.serve_forever() for s in servers), loop.create_future())
    finally:
        for s in bound:
            s.close()


# --------------------------------------------------------------------------- client side
def concurrency_at(timeline: list[list[float]], t: float) -> int:
    """The number of open connections at epoch ``t`` according to ``timeline``."""
    current = 0
    for when, value in timeline:
        if when > t:
            break
        current = int(value)
    return current


class Scenario:
    """The peer as a subprocess; ``behaviours`` maps a name (e.g. a domain) to a
    behaviour spec (``accept``, ``accept:0.3``, ``cap:3:0.5``, ``defer``, ``refuse``,
    ...)."""

    def __init__(self, root: Path, behaviours: dict[str, str]) -> None:
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        names = list(behaviours)
        args = [f"0={behaviours[n]}" for n in names]
        with open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(self.dir), *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)
        deadline = time.monotonic() + 15
        while not (self.dir / "ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("scenario_smtpd did not start: "
                                     + (self.dir / "stderr").read_text())
            time.sleep(0.05)
        ports = json.loads((self.dir / "ready").read_text())
        self.ports: dict[str, int] = dict(zip(names, ports, strict=True))

    def transport_lines(self) -> str:
        """``domain smtp:[127.0.0.1]:port`` lines for every name (a texthash table)."""
        return "".join(f"{n} smtp:[127.0.0.1]:{p}\n" for n, p in self.ports.items())

    def stats(self) -> dict[str, dict[str, Any]]:
        data = json.loads((self.dir / STATS).read_text())
        return {n: data[str(p)] for n, p in self.ports.items()}

    def messages(self, name: str) -> list[bytes]:
        return [content for _t, content in self.deliveries(name)]

    def deliveries(self, name: str) -> list[tuple[float, bytes]]:
        """(epoch accepted, content) of each message accepted on ``name``'s port."""
        d = self.dir / str(self.ports[name])
        if not d.exists():
            return []
        return [(p.stat().st_mtime, p.with_suffix(".eml").read_bytes())
                for p in sorted(d.glob("msg-*.env"))]

    def release(self, hold: str) -> None:
        """Answer the DATA of every message with ``X-Scenario-Hold: <hold>`` (held now or
        later)."""
        (self.dir / f"release-{hold}").touch()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
