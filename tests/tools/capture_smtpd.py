"""A capturing SMTP server for tests: aiosmtpd on 127.0.0.1, one record per message.

Usage::

    capture_smtpd.py PORT DIR
    capture_smtpd.py --transactions DIR [--delay SECONDS] PORT [PORT ...]

First form (tests.harness.CaptureServer): each accepted message is saved as
DIR/msg-<n>.eml (the content bytes exactly as received, CRLF and dot-stuffing undone by
aiosmtpd) and DIR/msg-<n>.env (sender, then one recipient per line, written after the
.eml). The file DIR/mode selects the answers: "accept", "defer" (450 to every RCPT),
"reject:<addr>" (550 5.1.1 for that recipient, others accepted).

Second form (``TxnCapture`` below): one process listening on every PORT, accepting
everything (DATA answered after ``--delay`` seconds, default 0); the content is not kept.
Each finished transaction is appended to DIR/transactions.jsonl as one JSON line
(written with a single ``write`` on an O_APPEND descriptor, so a reader sees whole lines
only, except possibly an unterminated last one)::

    {"port": listening port, "client": client TCP port, "start": epoch s of MAIL FROM,
     "end": epoch s of the DATA reply, "sender": ..., "rcpts": [recipients, in order]}

DIR/ready is written once every port listens.

Public API (client side of the second form; importing starts nothing)
    TxnCapture(root: Path, names: list[str], delay: float = 0.0)  starts the process,
        one port per name (``ports``: name -> port); raises AssertionError when the
        peer does not come up within 15 s.
    .transport_lines() -> str    ``name smtp:[127.0.0.1]:port`` lines (texthash table)
    .transactions() -> list[dict]   every complete record so far, in arrival order
    .stop() -> None              terminate and wait
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

TXN_LOG = "transactions.jsonl"


class Handler:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.n = 0

    def mode(self) -> str:
        try:
            with open(os.path.join(self.dir, "mode")) as f:
                return f.read().strip()
        except OSError:
            return "accept"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        mode = self.mode()
        if mode == "defer":
            return "450 4.2.0 try again later"
        if mode.startswith("reject:") and address.lower() == mode[7:].lower():
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.save(envelope)
        return "250 2.0.0 Ok: queued"

    def save(self, envelope: Envelope) -> None:
        self.n += 1
        base = os.path.join(self.dir, f"msg-{os.getpid()}-{self.n:06d}")
        content = envelope.original_content or b""
        with open(base + ".eml", "wb") as f:
            f.write(content)
        with open(base + ".tmp", "w") as f:
            f.write("\n".join([envelope.mail_from or ""] + list(envelope.rcpt_tos)) + "\n")
        os.rename(base + ".tmp", base + ".env")


class TxnHandler:
    """Second form: accept everything, append one JSON line per finished transaction."""

    def __init__(self, fd: int, port: int, delay: float) -> None:
        self.fd, self.port, self.delay = fd, port, delay

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.start = time.time()  # type: ignore[attr-defined]
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        peer = session.peer
        rec = {"port": self.port, "client": peer[1] if isinstance(peer, tuple) else 0,
               "start": getattr(envelope, "start", 0.0), "end": time.time(),
               "sender": envelope.mail_from or "", "rcpts": list(envelope.rcpt_tos)}
        os.write(self.fd, (json.dumps(rec) + "\n").encode())
        return "250 2.0.0 Ok: queued"


async def single(port: int, directory: str) -> None:
    handler = Handler(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True, decode_data=False, hostname="capture.test",
                     data_size_limit=0),
        "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def mark_ready(directory: str) -> None:
    """Write DIR/ready (every port listens)."""
    with open(os.path.join(directory, "ready"), "w") as f:
        f.write("ok\n")


async def transactions(directory: str, delay: float, ports: list[int]) -> None:
    fd = os.open(os.path.join(directory, TXN_LOG),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    loop = asyncio.get_running_loop()
    servers = []
    for port in ports:
        handler = TxnHandler(fd, port, delay)
        servers.append(await loop.create_server(
            functools.partial(SMTP, handler, enable_SMTPUTF8=True, decode_data=False,
                              hostname="capture.test", data_size_limit=0),
            "127.0.0.1", port))
    mark_ready(directory)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str]) -> None:
    if argv[:1] != ["--transactions"]:
        asyncio.run(single(int(argv[0]), argv[1]))
        return
    directory, rest = argv[1], argv[2:]
    delay = 0.0
    if rest[:1] == ["--delay"]:
        delay, rest = float(rest[1]), rest[2:]
    asyncio.run(transactions(directory, delay, [int(p) for p in rest]))


# --------------------------------------------------------------------------- client side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TxnCapture:
    """The second form as a subprocess (see module docstring)."""

    def __init__(self, root: Path, names: list[str], delay: float = 0.0) -> None:
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: _free_port() for name in names}
        with open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--transactions", str(self.dir), "--delay",
                 str(delay), *(str(p) for p in self.ports.values())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)
        deadline = time.monotonic() + 15
        while not (self.dir / "ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("capture_smtpd did not start: "
                                     + (self.dir / "stderr").read_text())
            time.sleep(0.05)

    def transport_lines(self) -> str:
        """``name smtp:[127.0.0.1]:port`` lines for every name (a texthash table)."""
        return "".join(f"{n} smtp:[127.0.0.1]:{p}\n" for n, p in self.ports.items())

    def transactions(self) -> list[dict[str, Any]]:
        """Every complete transaction record so far, in arrival order."""
        try:
            data = (self.dir / TXN_LOG).read_bytes()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in data.split(b"\n")[:-1]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
