"""error — the error(8) and retry delivery agents: fail or defer every recipient.

Summary
    Postfix's error(8) serves two master.cf services; the service name decides:

    * ``error`` — the nexthop is ``x.y.z text`` (e.g. ``5.1.1 User unknown in virtual
      alias table``): every recipient gets that status and text, so a ``5.x.x`` nexthop
      bounces and a ``4.x.x`` one defers. Without a valid leading status the default is
      ``5.0.0``.
    * ``retry`` — every recipient is deferred with the nexthop text; the status class is
      forced to 4 (default ``4.0.0``).

    No content is read; relay= is ``none``.

Public API
    ErrorAgent(DeliveryAgent)         .deliver(req, msg); .retry (service name "retry")
    split_dsn(text, default) -> (status, text)
    main() -> NoReturn                ``python -m transports.error``
"""

from __future__ import annotations

import re
from typing import NoReturn

from qmgrd.delivery import DeliverRequest, RecipientInfo
from qmgrd.spool.message import QueueFile
from transports.agent import DeliveryAgent, Dsn, make_dsn, run

__all__ = ["ErrorAgent", "main", "split_dsn"]

_LEAD_DSN = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})(?:\s+|\Z)")


def split_dsn(text: str, default: str) -> tuple[str, str]:
    """Split ``"5.1.1 User unknown"`` into ("5.1.1", "User unknown") (Postfix dsn_split).

    A text without a valid leading x.y.z (class 2, 4 or 5) keeps ``default``.
    """
    m = _LEAD_DSN.match(text)
    if m is None:
        return default, text.strip()
    return m.group(1), text[m.end():].strip()


class ErrorAgent(DeliveryAgent):
    """Bounce (service ``error``) or defer (service ``retry``) every recipient."""

    name = "error"

    @property
    def retry(self) -> bool:
        """True when running as the ``retry`` service."""
        return self.service == "retry"

    def deliver(self, req: DeliverRequest, msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        """Every recipient gets the nexthop's status and text."""
        if self.retry:
            status, text = split_dsn(req.nexthop, "4.0.0")
            status = "4" + status[1:]
            text = text or "delivery temporarily suspended"
        else:
            status, text = split_dsn(req.nexthop, "5.0.0")
            if status[0] == "2":
                status = "5" + status[1:]
            text = text or "delivery refused"
        dsn = make_dsn(status, text)
        return [(rcpt, dsn) for rcpt in req.recipients]


def main() -> NoReturn:
    """Run the error/retry service under single_server."""
    run(ErrorAgent())


if __name__ == "__main__":
    main()
