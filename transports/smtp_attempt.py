"""smtp_attempt — the smtp agent's bookkeeping of one delivery request across the servers
it tries: what each recipient got, from which server, and the hop status.

Summary
    One Attempt per request (transports.smtp), filled in by the transactions
    (transports.smtp_tx) and the session failures of each server tried, and read at the
    end for one Dsn per recipient:

    * ``final``: recipients whose outcome is decided (relayed, or bounced with 5.x.x):
      no later server gets them.
    * ``soft``: recipients with a 4.x.x from a server that was not the last: kept for
      the next server; their Dsn is the outcome when none is left (deferred).
    * ``relay``: the ``relay=`` text (``host[ip]:port``, as SmtpSession.relay) of the
      server that gave each recipient its answer; ``none`` when no server did.
    * ``site``: the site-level failure (a soft Dsn) of the last server that failed
      as a whole; the request's hop status when recipients are left (Postfix's
      smtp_site_fail() marks the destination).

    Site-level failures follow Postfix's smtp_bulk_fail(): a hard (5.x.x) one bounces
    the recipients at once, whether or not more servers are left; a soft one leaves them
    for the next server; with ``soft_bounce = yes`` a hard one from a server that is not
    the last counts as soft, so the next server is still tried (soft_bounce_error).
    A reply to MAIL FROM, RCPT TO, DATA or end of DATA that is not a success is recorded
    with Postfix's reason ``host H[ip] said: <reply> (in reply to <cmd> command)``: a
    5xx is final, anything else (4xx, or a reply outside 4xx/5xx, as 4.5.0) soft.
    A recipient no server answered for gets ``4.4.1 delivery to <nexthop> not
    attempted: no server left to try``.

Public API
    Attempt()                   .final, .soft, .relay (dict[int, ...] by recipient index),
                                .site (Dsn | None)
        .settle(indexes, dsn, relay)                    the final outcome of these
        .fail(which, exc, relay, *, last, soft_bounce)  an SmtpFailure of a whole server
        .refused(i, reply, sess, reply_to)              a non-success reply for one
        .left(pending) -> list[int]                     those not final yet
        .save() -> snapshot; .restore(snapshot)         undo a reused session's attempt
        .results(req) -> list[(RecipientInfo, Dsn, relay)]
Logs nothing, raises nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from qmgrd.delivery import DeliverRequest, RecipientInfo
from transports.agent import Dsn, make_dsn
from transports.smtp_session import Reply, SmtpFailure, SmtpSession

__all__ = ["Attempt"]

_Snapshot = tuple[dict[int, Dsn], dict[int, Dsn], dict[int, str], Dsn | None]


@dataclass
class Attempt:
    """Per-recipient bookkeeping across the servers tried for one request."""

    final: dict[int, Dsn] = field(default_factory=dict)
    soft: dict[int, Dsn] = field(default_factory=dict)
    relay: dict[int, str] = field(default_factory=dict)
    site: Dsn | None = None

    def settle(self, indexes: Iterable[int], dsn: Dsn, relay: str) -> None:
        """The final outcome ``dsn`` (with relay= ``relay``) for these recipients."""
        for i in indexes:
            self.final[i], self.relay[i] = dsn, relay

    def left(self, pending: Iterable[int]) -> list[int]:
        """The recipients of ``pending`` whose outcome is not final yet."""
        return [i for i in pending if i not in self.final]

    def save(self) -> _Snapshot:
        """A copy of the bookkeeping, for :meth:`restore`."""
        return dict(self.final), dict(self.soft), dict(self.relay), self.site

    def restore(self, snapshot: _Snapshot) -> None:
        """The bookkeeping as :meth:`save` found it (a reused session that turned out
        dead leaves no trace)."""
        self.final, self.soft, self.relay, self.site = snapshot

    def fail(self, which: Iterable[int], exc: SmtpFailure, relay: str, *, last: bool,
             soft_bounce: bool) -> None:
        """Apply a site-level failure to recipients ``which``, as Postfix's
        smtp_bulk_fail(): a hard (5.x.x) failure bounces them at once, whether or not
        more servers are left; a soft one leaves them for the next server (deferral
        after the last).  With soft_bounce = yes a hard failure from a server that is
        not the last counts as soft (Postfix's soft_bounce_error), so the next server
        is still tried."""
        dsn = exc.dsn()
        if dsn.status[0] == "5" and (last or not soft_bounce):
            for i in which:
                self.relay[i] = relay
                self.final[i] = dsn
            return
        soft = Dsn("4" + dsn.status[1:], "delayed", dsn.reason, dsn.diag_type, dsn.diag_text,
                   dsn.mta_type, dsn.mta_mname)
        self.site = soft
        for i in which:
            self.relay[i] = relay
            self.soft[i] = soft

    def refused(self, i: int, reply: Reply, sess: SmtpSession, reply_to: str) -> None:
        """Record a non-success reply for recipient ``i``: 5xx final, else left pending."""
        reason = f"host {sess.addr.namaddr} said: {reply.text} (in reply to {reply_to} command)"
        status = reply.dsn if reply.code // 100 in (4, 5) else "4.5.0"
        dsn = make_dsn(status, reason, diag_type="smtp", diag_text=reply.text,
                       mta_type="dns", mta_mname=sess.addr.hostname)
        self.relay[i] = sess.relay
        if status[0] == "5":
            self.final[i] = dsn
        else:
            self.soft[i] = dsn

    def results(self, req: DeliverRequest) -> list[tuple[RecipientInfo, Dsn, str]]:
        """One (recipient, Dsn, relay=) per recipient of ``req``, in order: the final
        outcome, else the soft one, else ``4.4.1 ... not attempted``."""
        return [(rcpt, self.final.get(i) or self.soft.get(i) or make_dsn(
                    "4.4.1", f"delivery to {req.nexthop} not attempted: no server left to try"),
                 self.relay.get(i, "none"))
                for i, rcpt in enumerate(req.recipients)]
