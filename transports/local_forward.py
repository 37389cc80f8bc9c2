"""local_forward — alias forwarding to remote addresses for local(8) (Postfix local/forward.c).

Summary
    The remote targets of one original recipient's alias expansion (transports.local_alias)
    are sent on as ONE new message through cleanup (qmgrd.spool.cleanup.Cleanup.submit,
    origin "forward"), after the expansion, and only when the recipient is not deferred:
    a deferred recipient is tried again later with its whole expansion, so forwarding
    now would send a second copy then (Postfix's forward_finish() cancels the forwarded
    copy in that case).

    The new message, as Postfix's forward_open()/forward_append()/forward_send() write it:

    * envelope sender: the original message's (the null sender stays null);
    * arrival time: now (Postfix writes the posting time into the new message's T
      record, not the original arrival time);
    * DSN ENVID and RET copied; each forwarded recipient gets the original recipient's
      NOTIFY flags (``rcpt.notify``: the local agent has taken SUCCESS off when the
      alias expanded to more than one address) and ORCPT, and as original recipient
      (``O`` record) the original's
      own original recipient, or the original recipient itself;
    * the rewrite context and the log_client_name/address, log_protocol_name and
      log_helo_name attributes of the request copied (when set); SMTPUTF8 flags copied;
    * content: ``Received: by $myhostname ($mail_name)`` / ``<TAB>id <new queue id>;
      <date>`` (written by cleanup), ``Delivered-To: <original recipient, lower-cased>``,
      then the original message's headers and body unchanged (cleanup adds a missing
      Message-ID:, Date: or From: as for any local submission). The Delivered-To:
      header lets the local agent's loop check (``5.4.6 mail forwarding loop``) stop a
      message that comes back to the same address.

    The queue file is written with the queue owner's rights (qmgrd.spool.owner.as_owner
    on incoming/'s owner: the local agent runs as root, the qmgr as mail_owner reads the
    file). A message cleanup refuses for good (5.x.x: too big, bad envelope data) is
    queued with its recipients bounced (Cleanup.bounce; Postfix's forwarding asks
    cleanup for CLEANUP_FLAG_BOUNCE), and counts as forwarded. A message cleanup
    cannot write (CleanupError 4.x.x, OSError) leaves nothing in incoming/ and defers
    the original recipient ``4.3.0 unable to forward message: <why>``; one that can
    be neither queued nor bounced bounces it with cleanup's status.

    Success: ``2.0.0 forwarded as <new queue id>``, action ``relayed`` (Postfix's
    forward_send() sent() text). As in Postfix, that step itself sends no success
    notice (the forwarded recipients carry NOTIFY=SUCCESS on to the next hop; for an
    alias expanded to several addresses the local agent sends the ``alias expanded``
    notice instead).

Public API
    Forwarder(cfg, spool)
    Forwarder.forward(req, rcpt, lines, targets) -> Dsn
        ``lines``: the original content lines without line ends (QueueFile.iter_lines);
        ``targets``: the remote addresses, in order, non-empty.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from qmgrd.delivery import DeliverRequest, RecipientInfo
from qmgrd.spool.cleanup import Cleanup, CleanupError
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.owner import as_owner
from qmgrd.spool.queue import Spool
from qmgrd.spool.statuslog import quote_822_local
from transports.agent import Dsn, make_dsn

if TYPE_CHECKING:
    from master.config import Config

__all__ = ["Forwarder"]


def _attrs(req: DeliverRequest) -> dict[str, str]:
    """The request attributes Postfix's forward_open() passes on (PASS_ATTR: only
    those that are set)."""
    pairs = {
        "log_client_name": req.client_name,
        "log_client_address": req.client_address,
        "log_protocol_name": req.protocol_name,
        "log_helo_name": req.helo_name,
        "rewrite_context": req.rewrite_context,
    }
    return {k: v for k, v in pairs.items() if v}


def forward_envelope(req: DeliverRequest, rcpt: RecipientInfo,
                     targets: list[str]) -> Envelope:
    """The new message's envelope (module docstring)."""
    orig = rcpt.orig_rcpt or rcpt.address
    return Envelope(
        req.sender,
        [Recipient(t, orig, rcpt.dsn_orcpt, rcpt.notify) for t in targets],
        ret=req.ret_flags,
        envid=req.envelope_id,
        attrs=_attrs(req),
        smtputf8=req.smtputf8,
    )


def forward_content(rcpt: RecipientInfo, lines: list[bytes]) -> bytes:
    """``Delivered-To: <recipient, lower-cased>`` and the original content (cleanup
    puts its Received: header before it)."""
    head = f"Delivered-To: {quote_822_local(rcpt.address.lower())}\n".encode(
        "utf-8", "surrogateescape")
    return head + b"".join(line + b"\n" for line in lines)


class Forwarder:
    """Submits forwarded copies through cleanup (module docstring)."""

    def __init__(self, cfg: Config, spool: Spool) -> None:
        self.spool = spool
        self.cleanup = Cleanup(cfg, spool)

    def forward(self, req: DeliverRequest, rcpt: RecipientInfo, lines: list[bytes],
                targets: list[str]) -> Dsn:
        """Queue one message for ``targets``; the original recipient's status."""
        env = forward_envelope(req, rcpt, targets)
        content = forward_content(rcpt, lines)
        try:
            with as_owner(os.stat(self.spool.queue_path("incoming"))):
                qid = self._submit(env, content)
        except CleanupError as exc:
            if exc.status.startswith("5"):  # neither queued nor bounced
                return make_dsn(exc.status, f"unable to forward message: {exc.text}")
            return make_dsn("4.3.0", f"unable to forward message: {exc.text}")
        except OSError as exc:
            return make_dsn("4.3.0", f"unable to forward message: {exc.strerror or exc}")
        return make_dsn("2.0.0", f"forwarded as {qid}", action="relayed")

    def _submit(self, env: Envelope, content: bytes) -> str:
        """Cleanup.submit; a permanent refusal -> Cleanup.bounce (CLEANUP_FLAG_BOUNCE).

        Raises:
            CleanupError: 4.x.x from either call, 5.x.x from bounce.
            OSError: from the privilege switch.
        """
        try:
            return self.cleanup.submit(env, content, origin="forward")
        except CleanupError as exc:
            if exc.status.startswith("4"):
                raise
            refusal = exc
        return self.cleanup.bounce(env, content, refusal.status, refusal.text,
                                   origin="forward")
