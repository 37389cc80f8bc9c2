"""A capturing SMTP server for tests: aiosmtpd on 127.0.0.1:<port>, one file per message.

Usage: capture_smtpd.py PORT DIR. Each accepted message is saved as DIR/msg-<n>.eml (the
content bytes exactly as received, CRLF and dot-stuffing undone by aiosmtpd) and
DIR/msg-<n>.env (sender, then one recipient per line, written after the .eml). The file
DIR/mode selects the answers: "accept", "defer" (450 to every RCPT), "reject:<addr>"
(550 5.1.1 for that recipient, others accepted).
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


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


async def main() -> None:
    port, directory = int(sys.argv[1]), sys.argv[2]
    handler = Handler(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True, decode_data=False, hostname="capture.test",
                     data_size_limit=0),
        "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
