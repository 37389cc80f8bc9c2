"""message — one queue file while it is in the active queue (qmgr_message).

Summary
    The in-memory view of a message the qmgr has taken into ``active/``: envelope facts
    needed to build delivery requests and to finish the message, and the bookkeeping of
    its outstanding delivery entries.

Public API
    Message (dataclass)
        qid, sender, arrival (epoch s, float), create_time (epoch s), active_arrival,
        size (content bytes), data_offset (bytes), encoding, smtputf8, envid, ret,
        client/helo/protocol log attributes,
        refcount: outstanding entries; deferred: some recipient must be retried;
        completing: completion in progress.
    Message.from_queue_file(qf, now) -> Message
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Message"]


@dataclass(eq=False)
class Message:
    """A message in the active queue (see module docstring)."""

    qid: str
    sender: str
    arrival: float
    create_time: float
    active_arrival: float
    size: int
    data_offset: int
    encoding: str = ""
    smtputf8: int = 0
    envid: str = ""
    ret: int = 0
    client_name: str = ""
    client_address: str = ""
    protocol_name: str = ""
    helo_name: str = ""
    rewrite_context: str = "local"
    warn_time: int = 0
    refcount: int = 0
    deferred: bool = False
    completing: bool = False
    nrcpt: int = 0

    @classmethod
    def from_queue_file(cls, qf: Any, now: float) -> Message:
        """Build from an open ``qmgrd.spool.message.QueueFile``."""
        attrs: dict[str, str] = dict(getattr(qf, "attrs", {}) or {})
        arrival = qf.arrival
        if isinstance(arrival, tuple):
            arrival = arrival[0] + arrival[1] / 1e6
        return cls(
            qid=qf.qid,
            sender=qf.sender,
            arrival=float(arrival),
            create_time=float(qf.create_time or arrival),
            active_arrival=now,
            size=int(qf.content_size or qf.data_size),
            data_offset=int(qf.data_offset),
            encoding=qf.encoding or "",
            smtputf8=int(qf.smtputf8 or 0),
            envid=qf.envid or "",
            ret=int(qf.ret or 0),
            client_name=attrs.get("log_client_name", attrs.get("client_name", "")),
            client_address=attrs.get("log_client_address", attrs.get("client_address", "")),
            protocol_name=attrs.get("log_protocol_name", attrs.get("protocol_name", "")),
            helo_name=attrs.get("log_helo_name", attrs.get("helo_name", "")),
            rewrite_context=attrs.get("rewrite_context", "local") or "local",
            warn_time=int(getattr(qf, "warn_time", 0) or 0),
        )
