"""scenario_smtpd — an SMTP test peer with one behaviour per 127.0.0.1 port, and its client.

Usage (a process of its own)::

    scenario_smtpd.py DIR PORT=BEHAVIOUR[:DATA_DELAY] ...

Behaviours (one per port):

    accept     aiosmtpd; every RCPT 250, DATA 250 after DATA_DELAY seconds (default 0)
    defer      aiosmtpd; every RCPT ``450 4.2.0 try again later``
    reject     aiosmtpd; every RCPT ``550 5.1.1 ... User unknown``
    greet421   the greeting is ``421 4.3.2 service not available``, then the connection
               is closed
    silent     the TCP connection is accepted and nothing is ever sent (the peer reads
               and discards until the client hangs up)

Records, per port, in ``DIR/stats.json`` (rewritten atomically through a temporary file
and rename after every change)::

    {"<port>": {"behaviour", "sessions", "current", "max_concurrent", "messages",
                "session_times": [epoch seconds of each connection]}}

Each accepted message is also saved as ``DIR/<port>/msg-<n>.eml`` (content bytes) plus
``.env`` (sender, then recipients, one a line; written after the .eml, by rename).
``DIR/ready`` is written once every port listens.

Public API (for tests; importing this module does not start anything)
    Scenario(root: Path, behaviours: dict[str, str])  starts the process; ``ports``
        maps each name to its port; stats() -> dict (name -> record above),
        messages(name) -> list[bytes], stop() -> None (terminates, waits).
    Raises AssertionError (via the harness's wait_for) when the peer does not come up
    within 15 s.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

STATS = "stats.json"


class Recorder:
    """Per-port counters, written to DIR/stats.json atomically after each change."""

    def __init__(self, directory: str, specs: dict[int, tuple[str, float]]) -> None:
        self.dir = directory
        self.data: dict[str, dict[str, Any]] = {
            str(p): {"behaviour": b, "sessions": 0, "current": 0, "max_concurrent": 0,
                     "messages": 0, "session_times": []}
            for p, (b, _d) in specs.items()}
        self.n = 0
        self.flush()

    def opened(self, port: int) -> None:
        r = self.data[str(port)]
        r["sessions"] += 1
        r["current"] += 1
        r["max_concurrent"] = max(r["max_concurrent"], r["current"])
        r["session_times"].append(time.time())
        self.flush()

    def closed(self, port: int) -> None:
        self.data[str(port)]["current"] -= 1
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
    """aiosmtpd handler for the accept/defer/reject behaviours of one port."""

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
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        self.rec.message(self.port, envelope)
        return "250 2.0.0 Ok: queued"


class CountingSMTP(SMTP):
    """aiosmtpd's SMTP, counting its sessions in the Recorder."""

    def __init__(self, rec: Recorder, port: int, handler: Handler) -> None:
        super().__init__(handler, enable_SMTPUTF8=True, decode_data=False,
                         hostname="scenario.test", data_size_limit=0)
        self._rec, self._port = rec, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._rec.opened(self._port)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._rec.closed(self._port)
        super().connection_lost(exc)


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


def parse(args: list[str]) -> dict[int, tuple[str, float]]:
    """``PORT=BEHAVIOUR[:DELAY]`` arguments -> {port: (behaviour, delay seconds)}."""
    out = {}
    for a in args:
        port, _, rest = a.partition("=")
        behaviour, _, delay = rest.partition(":")
        if behaviour not in ("accept", "defer", "reject", "greet421", "silent"):
            raise SystemExit(f"unknown behaviour {behaviour!r}")
        out[int(port)] = (behaviour, float(delay or 0))
    return out


def mark_ready(directory: str) -> None:
    """Write DIR/ready (every port listens)."""
    with open(os.path.join(directory, "ready"), "w") as f:
        f.write("ok\n")


async def main() -> None:
    directory = sys.argv[1]
    specs = parse(sys.argv[2:])
    rec = Recorder(directory, specs)
    loop = asyncio.get_running_loop()
    servers: list[asyncio.base_events.Server] = []
    for port, (behaviour, delay) in specs.items():
        if behaviour in ("greet421", "silent"):
            async def cb(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                         port: int = port, behaviour: str = behaviour) -> None:
                await raw_session(rec, port, behaviour, r, w)
            servers.append(await asyncio.start_server(cb, "127.0.0.1", port))
        else:
            handler = Handler(rec, port, behaviour, delay)
            servers.append(await loop.create_server(
                functools.partial(CountingSMTP, rec, port, handler), "127.0.0.1", port))
    mark_ready(directory)
    await asyncio.gather(*(s.serve_forever() for s in servers))


# --------------------------------------------------------------------------- client side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scenario:
    """The peer as a subprocess; ``behaviours`` maps a name (e.g. a domain) to a
    behaviour spec (``accept``, ``accept:0.3``, ``defer``, ...)."""

    def __init__(self, root: Path, behaviours: dict[str, str]) -> None:
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: _free_port() for name in behaviours}
        args = [f"{self.ports[n]}={b}" for n, b in behaviours.items()]
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

    def transport_lines(self) -> str:
        """``domain smtp:[127.0.0.1]:port`` lines for every name (a texthash table)."""
        return "".join(f"{n} smtp:[127.0.0.1]:{p}\n" for n, p in self.ports.items())

    def stats(self) -> dict[str, dict[str, Any]]:
        data = json.loads((self.dir / STATS).read_text())
        return {n: data[str(p)] for n, p in self.ports.items()}

    def messages(self, name: str) -> list[bytes]:
        d = self.dir / str(self.ports[name])
        if not d.exists():
            return []
        return [p.with_suffix(".eml").read_bytes() for p in sorted(d.glob("msg-*.env"))]

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
