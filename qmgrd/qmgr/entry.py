"""entry — one delivery request in the making (qmgr_entry).

Summary
    An Entry is one message and up to ``<transport>_destination_recipient_limit`` of its
    recipients for one destination queue (postfix.md §4.4, §4.5). It sits on its queue's
    ``todo`` chain and its peer's chain until the scheduler selects it, then on the
    queue's ``busy`` chain while a delivery agent works on it.

Public API
    Entry(message, queue, peer, recipients)
        .queue_link (on DestQueue.todo or .busy), .peer_link (on Peer.entries while todo)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmgrd.qmgr.chain import Link
from qmgrd.spool.envelope import Recipient

if TYPE_CHECKING:
    from qmgrd.qmgr.destqueue import DestQueue
    from qmgrd.qmgr.message import Message
    from qmgrd.qmgr.peer import Peer

__all__ = ["Entry"]


class Entry:
    """One delivery request: a message and some of its recipients for one queue."""

    __slots__ = ("message", "peer", "peer_link", "queue", "queue_link", "recipients")

    def __init__(self, message: Message, queue: DestQueue, peer: Peer,
                 recipients: list[Recipient] | None = None) -> None:
        self.message = message
        self.queue = queue
        self.peer = peer
        self.recipients: list[Recipient] = recipients if recipients is not None else []
        self.queue_link: Link[Entry] = Link(self)
        self.peer_link: Link[Entry] = Link(self)

    def __repr__(self) -> str:
        return (f"Entry({self.message.qid}, {self.queue.transport.name}:{self.queue.name}, "
                f"{len(self.recipients)} rcpt)")
