"""Shared helpers for the delivery-agent tests (test_agent_*, test_smtp_*, test_local_*).

A temporary queue directory with a real Config, messages queued by the real Cleanup and
moved to active/, delivery requests built from the queue file, and a request/reply
round trip over a socketpair (the request is written before serve() runs, so no thread
is needed: the socket buffers hold both directions).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from master import log
from master.config import Config
from master.server.skeleton import ServerContext
from qmgrd import delivery
from qmgrd.delivery import DeliverRequest, DeliverStatus, RecipientInfo
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from transports.agent import DeliveryAgent

CORPUS = Path(__file__).resolve().parent / "data" / "corpus"
SIMPLE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\nworld\r\n"


@dataclass
class Env:
    """One temporary mail system: config, spool, maillog path."""

    root: Path
    cfg: Config
    spool: Spool
    maillog: Path

    def ctx(self, service: str = "test") -> ServerContext:
        return ServerContext(service=service, config=self.cfg,
                             queue_directory=self.spool.queue_directory, listen_fds=[],
                             generation=0, args=[])

    def log(self) -> str:
        return self.maillog.read_text() if self.maillog.exists() else ""

    def queue(self, rcpts: Iterable[str | Recipient], content: bytes = SIMPLE,
              sender: str = "alice@example.com", **envkw: Any) -> str:
        """Queue a message with the real Cleanup and move it to active/; return its id."""
        rl = [r if isinstance(r, Recipient) else Recipient(r) for r in rcpts]
        env = Envelope(sender, rl, **envkw)
        qid = Cleanup(self.cfg, self.spool).submit(env, content, origin="smtp")
        self.spool.move(qid, "incoming", "active")
        return qid

    def request(self, qid: str, nexthop: str = "", flags: int = delivery.DEL_REQ_FLAG_DEFLT,
                queue: str = "active") -> DeliverRequest:
        """The request the qmgr would send for every undone recipient of ``qid``."""
        with QueueFile.open(self.spool, queue, qid, lock=None, readonly=True) as qf:
            return DeliverRequest(
                queue_name=queue, queue_id=qid, offset=qf.data_offset, size=qf.content_size,
                nexthop=nexthop, sender=qf.sender,
                recipients=[RecipientInfo(r.address, r.orig_rcpt, r.offset, r.dsn_orcpt,
                                          r.notify) for r in qf.recipients],
                flags=flags, encoding=qf.encoding, smtputf8=qf.smtputf8,
                envelope_id=qf.envid, ret_flags=qf.ret,
                arrival=qf.arrival[0] + qf.arrival[1] / 1e6)

    def undone(self, qid: str, queue: str = "active") -> list[str]:
        with QueueFile.open(self.spool, queue, qid, lock=None, readonly=True) as qf:
            return [r.address for r in qf.recipients]


@pytest.fixture(autouse=True)
def close_log() -> Iterator[None]:
    """Import this fixture into a test module: make_env() points the process-wide log at
    a file; close it after each test so later tests see the default (stderr) again."""
    yield
    log.close()


def make_env(root: Path, **main: str) -> Env:
    """Write main.cf under ``root`` and return the environment (log set up to a file)."""
    qdir = root / "queue"
    maillog = root / "maillog"
    settings = {
        "queue_directory": str(qdir),
        "maillog_file": str(maillog),
        "myhostname": "mail.test.example",
        "mydomain": "test.example",
        "local_recipient_maps": "",
        "smtp_connect_timeout": "5s",
        "smtp_helo_timeout": "5s",
        "smtp_host_lookup": "dns, native",
    }
    settings.update(main)
    settings.setdefault("alias_maps", "")  # not the system's /etc/aliases
    confdir = root / "etc"
    confdir.mkdir(parents=True, exist_ok=True)
    (confdir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    cfg = Config.load(str(confdir))
    spool = Spool.from_config(cfg)
    spool.make_dirs()
    log.setup("test", str(maillog), myhostname="mail.test.example")
    return Env(root, cfg, spool, maillog)


def round_trip(agent: DeliveryAgent, req: DeliverRequest | bytes,
               ctx: ServerContext) -> tuple[list[tuple[str, str]], DeliverStatus | None]:
    """Run one request through ``agent.serve`` over a socketpair.

    A DeliverRequest is sent as the qmgr sends it: the connection stays open for the
    reply (an agent delivers nothing once the qmgr's end is closed). Raw bytes are
    followed by EOF (SHUT_WR), so that a truncated request ends.

    Returns the greeting list and the decoded reply (None when the agent closed without
    replying).
    """
    client, server = socket.socketpair()
    with client, server:
        client.sendall(req if isinstance(req, bytes) else req.encode())
        if isinstance(req, bytes):
            client.shutdown(socket.SHUT_WR)
        agent.serve(server, ctx)
        server.close()
        client.settimeout(5)
        dec = delivery.AttrDecoder()
        lists: list[list[tuple[str, str]]] = []
        while True:
            data = client.recv(65536)
            if not data:
                break
            dec.feed(data)
            while (lst := dec.pop()) is not None:
                lists.append(lst)
    assert lists, "no greeting"
    reply = DeliverStatus.from_attrs(lists[1]) if len(lists) > 1 else None
    return lists[0], reply
