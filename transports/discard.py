"""discard — the discard(8) delivery agent: every recipient is "delivered" to nowhere.

Summary
    Postfix's discard(8): each recipient of the request is reported as sent with DSN
    ``2.0.0``; the reason is the request's nexthop text (from ``discard:text`` in a
    transport map), or ``discarded`` when it is empty. No content is read.

Public API
    DiscardAgent(DeliveryAgent)       .deliver(req, msg)
    main() -> NoReturn                ``python -m transports.discard``

Logs ``<qid>: to=<rcpt>, relay=none, ..., dsn=2.0.0, status=sent (<text>)`` via the base.
"""

from __future__ import annotations

from typing import NoReturn

from qmgrd.delivery import DeliverRequest, RecipientInfo
from qmgrd.spool.message import QueueFile
from transports.agent import DeliveryAgent, Dsn, make_dsn, run

__all__ = ["DiscardAgent", "main"]


class DiscardAgent(DeliveryAgent):
    """Discard every recipient with status 2.0.0."""

    name = "discard"

    def deliver(self, req: DeliverRequest, msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        """Every recipient: Dsn("2.0.0", "delivered", nexthop or "discarded")."""
        dsn = make_dsn("2.0.0", req.nexthop or "discarded")
        return [(rcpt, dsn) for rcpt in req.recipients]


def main() -> NoReturn:
    """Run the discard service under single_server."""
    run(DiscardAgent())


if __name__ == "__main__":
    main()
