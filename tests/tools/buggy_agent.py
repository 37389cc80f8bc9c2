"""buggy_agent — a delivery agent whose transport hook always raises (issue-5 tests).

Run by the master as ``tests.tools.buggy_agent`` (a master.cf command naming a Python
module). Every request ends in the agent base's "software" path: the recipients are
deferred with ``4.3.0 unknown mail transport error`` and, when notify_classes has
``software``, the postmaster gets a notice (transports.notify).
"""

from __future__ import annotations

from qmgrd.delivery import DeliverRequest, RecipientInfo
from qmgrd.spool.message import QueueFile
from transports.agent import DeliveryAgent, Dsn, run


class BuggyAgent(DeliveryAgent):
    """Raises RuntimeError for every request."""

    name = "buggy"

    def deliver(self, req: DeliverRequest, msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        raise RuntimeError(f"simulated agent bug while delivering {req.queue_id}")


if __name__ == "__main__":
    run(BuggyAgent())
