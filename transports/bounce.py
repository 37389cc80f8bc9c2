"""bounce — the bounce/defer/trace notice service (``python -m transports.bounce``), bounce(8).

Summary
    One program serves the master.cf services ``bounce``, ``defer`` and ``trace``; the
    service name chooses the status log it reads (``bounce/<id>``, ``defer/<id>``,
    ``trace/<id>``). The qmgr asks it, over ``private/<service>`` with Postfix's
    ``delivery_status_protocol`` (postfix.md §5.4), to turn a message's log into a
    notice:

    * FLUSH to ``bounce``: a non-delivery notice for the recipients in ``bounce/<id>``;
    * FLUSH to ``defer``: the message expired — a non-delivery notice for the recipients
      in ``defer/<id>`` (Action: failed);
    * WARN to ``defer``: a delay warning (Action: delayed), the log is kept;
    * TRACE to ``trace``: a success notice (Action: delivered/relayed).

    Notices are RFC 3464 ``multipart/report; report-type=delivery-status`` messages built
    with the standard ``email`` package: a human-readable part naming each recipient and
    the reason, a ``message/delivery-status`` part (Reporting-MTA, Arrival-Date,
    per recipient Final-Recipient, Original-Recipient, Action, Status, Remote-MTA,
    Diagnostic-Code, Last-Attempt-Date), and the original message (``message/rfc822``)
    or only its headers (``text/rfc822-headers``) when RET=HDRS or it is larger than
    ``bounce_size_limit``. Notices go through cleanup with the null sender. DSN NOTIFY
    decides which recipients are listed (no NOTIFY or FAILURE for non-delivery; DELAY
    for warnings; SUCCESS for success notices); with none the notice is cancelled.

    A notice for mail from the null sender is a double bounce: it goes to
    ``2bounce_notice_recipient`` from ``double-bounce@$myhostname`` when
    ``notify_classes`` has ``bounce`` or ``2bounce``, and is otherwise discarded (logged).

Replies ``status=0`` on success (the log is then removed, except for WARN), non-zero
on failure (the qmgr keeps the message deferred and asks again later).

Logs: ``<id>: sender non-delivery notification: <new id>`` (and delay/success variants).
"""

from __future__ import annotations

import email.utils
import os
import socket
import time
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesParser
from email.policy import compat32

from master import log
from master.server.skeleton import ServerContext, single_server
from qmgrd.delivery import (
    BOUNCE_CMD_FLUSH,
    BOUNCE_CMD_TRACE,
    BOUNCE_CMD_WARN,
    STATUS_PROTOCOL,
    ProtocolError,
    StatusRequest,
    encode,
    protocol_greeting,
    read_list,
)
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import Cleanup, CleanupError
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.message import CorruptQueueFile, QueueFile
from qmgrd.spool.queue import Spool
from qmgrd.spool.queueid import valid_id

__all__ = ["BounceService", "build_notice", "main"]

NOTIFY_SUCCESS, NOTIFY_FAILURE, NOTIFY_DELAY = 2, 4, 8

_SUBJECT = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
}

_TEXT = {
    "failed": (
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients. It's attached below.\n\n"
        "For further assistance, please send mail to postmaster.\n\n"
        "If you do so, please include this problem report. You can\n"
        "delete your own text from the attached returned message.\n"
    ),
    "delayed": (
        "####################################################################\n"
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
        "####################################################################\n\n"
        "Your message could not be delivered for {delay} hour(s).\n"
        "It will be retried until it is {lifetime} day(s) old.\n"
    ),
    "delivered": (
        "Your message was successfully delivered to the destination(s)\n"
        "listed below. If the message was delivered to mailbox you will\n"
        "receive no further notifications. Otherwise you may still receive\n"
        "notifications of mail delivery errors from other systems.\n"
    ),
}


def _addr_type(addr: str) -> str:
    return "rfc822"


def _field_block(fields: list[tuple[str, str]]) -> Message:
    m = Message(policy=compat32)
    for name, value in fields:
        m[name] = value
    return m


def build_notice(
    *,
    kind: str,
    myhostname: str,
    qid: str,
    sender: str,
    to: str,
    arrival: float,
    entries: list[tuple[Recipient, statuslog.Dsn]],
    original: bytes,
    headers_only: bool,
    envid: str = "",
    lifetime_days: float = 5,
    postmaster_copy: bool = False,
) -> bytes:
    """Build an RFC 3464 notice (bytes, LF line ends).

    Args:
        kind: "failed" (non-delivery or expiry), "delayed" (warning), "delivered".
        original: the original message (headers + body), LF line ends.
        headers_only: return only the headers (RET=HDRS or over bounce_size_limit).
    """
    now = time.time()
    outer = MIMEMultipart("report", report_type="delivery-status", policy=compat32)
    subject = _SUBJECT[kind]
    if postmaster_copy:
        subject = "Postmaster Copy: " + subject if kind == "failed" else "Postmaster Warning: " + subject
    outer["From"] = f"MAILER-DAEMON@{myhostname} (Mail Delivery System)"
    outer["Subject"] = subject
    outer["To"] = to
    outer["Auto-Submitted"] = "auto-generated" if postmaster_copy else "auto-replied"
    outer["Date"] = email.utils.formatdate(now, localtime=True)
    outer["Message-ID"] = f"<{qid}.notice.{int(now)}@{myhostname}>"
    orig_hdrs = BytesParser(policy=compat32).parsebytes(original, headersonly=True)
    orig_mid = orig_hdrs.get("Message-ID")
    if orig_mid:
        outer["In-Reply-To"] = str(orig_mid).strip()
        outer["References"] = str(orig_mid).strip()
    outer.preamble = "This is a MIME-encapsulated message.\n"

    hours = max(0.0, (now - arrival) / 3600)
    intro = (
        f"This is the mail system at host {myhostname}.\n\n"
        + _TEXT[kind].format(delay=f"{hours:.0f}", lifetime=f"{lifetime_days:g}")
        + "\n                   The mail system\n\n"
    )
    lines = [f"<{r.address}>: {d.reason}" for r, d in entries]
    text = MIMEText(intro + "\n".join(lines) + "\n", "plain", "utf-8")
    text["Content-Description"] = "Notification" if kind == "failed" else (
        "Delayed Mail" if kind == "delayed" else "Notification")
    outer.attach(text)

    msg_fields = [("Reporting-MTA", f"dns; {myhostname}")]
    if envid:
        msg_fields.append(("Original-Envelope-Id", envid))
    msg_fields += [
        ("X-Postfix-Queue-ID", qid),
        ("X-Postfix-Sender", f"rfc822; {sender}"),
        ("Arrival-Date", email.utils.formatdate(arrival, localtime=True)),
    ]
    blocks = [_field_block(msg_fields)]
    last = email.utils.formatdate(now, localtime=True)
    for rcpt, dsn in entries:
        f = [("Final-Recipient", f"{_addr_type(rcpt.address)}; {rcpt.address}")]
        if rcpt.dsn_orcpt:
            f.append(("Original-Recipient", rcpt.dsn_orcpt))
        elif rcpt.orig_rcpt and rcpt.orig_rcpt.lower() != rcpt.address.lower():
            f.append(("Original-Recipient", f"rfc822; {rcpt.orig_rcpt}"))
        action = kind if kind != "failed" else "failed"
        if kind == "delivered":
            action = dsn.action if dsn.action in ("delivered", "relayed", "expanded") else "delivered"
        f.append(("Action", action))
        f.append(("Status", dsn.status or ("5.0.0" if kind == "failed" else "4.0.0")))
        if dsn.mta_type and dsn.mta_mname:
            f.append(("Remote-MTA", f"{dsn.mta_type}; {dsn.mta_mname}"))
        if dsn.diag_type and dsn.diag_text:
            f.append(("Diagnostic-Code", f"{dsn.diag_type}; {dsn.diag_text}"))
        else:
            f.append(("Diagnostic-Code", f"X-Postfix; {dsn.reason}"))
        f.append(("Last-Attempt-Date", last))
        if kind == "delayed":
            f.append(("Will-Retry-Until", email.utils.formatdate(
                arrival + lifetime_days * 86400, localtime=True)))
        blocks.append(_field_block(f))
    report = MIMEBase("message", "delivery-status", policy=compat32)
    report.set_payload(blocks)  # type: ignore[arg-type]
    del report["MIME-Version"]
    report["Content-Description"] = "Delivery report"
    outer.attach(report)

    header_end = original.find(b"\n\n")
    head = original if header_end < 0 else original[: header_end + 1]
    returned_head = b"Return-Path: <" + sender.encode("utf-8", "surrogateescape") + b">\n"
    if headers_only:
        part = MIMEBase("text", "rfc822-headers", policy=compat32)
        part.set_payload((returned_head + head).decode("utf-8", "surrogateescape"))
        del part["MIME-Version"]
        part["Content-Description"] = "Undelivered Message Headers"
    else:
        inner = BytesParser(policy=compat32).parsebytes(returned_head + original)
        part = MIMEMessage(inner, policy=compat32)
        del part["MIME-Version"]
        part["Content-Description"] = "Undelivered Message"
    outer.attach(part)
    data = outer.as_bytes(policy=compat32.clone(linesep="\n"))
    return data


class BounceService:
    """Serves one of bounce/defer/trace (chosen by the service name)."""

    def __init__(self, ctx: ServerContext):
        cfg = ctx.config
        self.ctx = ctx
        self.cfg = cfg
        self.service = ctx.service
        self.logname = {"defer": "defer", "trace": "trace"}.get(ctx.service, "bounce")
        self.spool = Spool(ctx.queue_directory, tuple(cfg.get_list("hash_queue_names")),
                           cfg.get_int("hash_queue_depth"))
        self.cleanup = Cleanup(cfg, self.spool)
        self.myhostname = cfg.get("myhostname")
        self.size_limit = cfg.get_int("bounce_size_limit")
        self.notify_classes = {c.lower() for c in cfg.get_list("notify_classes")}
        self.double_bounce = f"{cfg.get('double_bounce_sender')}@{self.myhostname}"
        self.lifetime_days = cfg.get_time("maximal_queue_lifetime") / 86400

    def serve(self, conn: socket.socket, ctx: ServerContext) -> None:
        """Handle one connection: greeting, one request, one ``status`` reply."""
        conn.settimeout(float(self.cfg.get_time("ipc_timeout")))
        try:
            conn.sendall(protocol_greeting(STATUS_PROTOCOL))
            req = StatusRequest.from_attrs(read_list(conn))
        except (OSError, ProtocolError) as exc:
            log.warning(f"{self.service}: bad request: {exc}")
            return
        try:
            status = self.handle(req)
        except (OSError, CorruptQueueFile, CleanupError) as exc:
            log.warning(f"{req.queue_id}: {self.service}: cannot send notice: {exc}")
            status = 1
        try:
            conn.sendall(encode([("status", status)]))
        except OSError as exc:
            log.warning(f"{req.queue_id}: {self.service}: reply: {exc}")

    def handle(self, req: StatusRequest) -> int:
        """Build and queue the notice for ``req``. Returns 0 on success."""
        if not valid_id(req.queue_id) or req.queue_name not in (
                "active", "incoming", "deferred", "hold"):
            log.warning(f"{self.service}: bad queue id or name in request: {req.queue_id!r}")
            return 1
        if req.nrequest == BOUNCE_CMD_WARN:
            kind, want = "delayed", NOTIFY_DELAY
        elif req.nrequest == BOUNCE_CMD_TRACE:
            kind, want = "delivered", NOTIFY_SUCCESS
        elif req.nrequest == BOUNCE_CMD_FLUSH:
            kind, want = "failed", NOTIFY_FAILURE
        else:
            log.warning(f"{req.queue_id}: {self.service}: unsupported request {req.nrequest}")
            return 1
        entries = statuslog.read(self.spool, self.logname, req.queue_id)
        if kind == "delivered":
            selected = [(r, d) for r, d in entries if r.notify & NOTIFY_SUCCESS]
        else:
            selected = [(r, d) for r, d in entries if r.notify == 0 or r.notify & want]
        if selected:
            self._send(req, kind, selected)
        if req.nrequest != BOUNCE_CMD_WARN:
            try:
                os.unlink(self.spool.path(self.logname, req.queue_id))
            except FileNotFoundError:
                pass
        return 0

    def _send(self, req: StatusRequest, kind: str,
              entries: list[tuple[Recipient, statuslog.Dsn]]) -> None:
        qf = QueueFile.open(self.spool, req.queue_name, req.queue_id, lock=None)
        try:
            original = b"\n".join(qf.iter_lines()) + b"\n"
            arrival = qf.arrival[0] + qf.arrival[1] / 1e6
        finally:
            qf.close()
        headers_only = req.ret_flags == 2 or len(original) > self.size_limit
        if req.sender:
            to, env_sender, pm = req.sender, "", False
        else:
            if not self.notify_classes & {"bounce", "2bounce"}:
                log.info(f"{req.queue_id}: discarding undeliverable {kind} notice for the "
                         f"null sender")
                return
            to, env_sender, pm = self.cfg.get("2bounce_notice_recipient"), self.double_bounce, True
            if "@" not in to:
                to = f"{to}@{self.myhostname}"
        data = build_notice(
            kind=kind, myhostname=self.myhostname, qid=req.queue_id, sender=req.sender,
            to=to, arrival=arrival, entries=entries, original=original,
            headers_only=headers_only, envid=req.envelope_id,
            lifetime_days=self.lifetime_days, postmaster_copy=pm,
        )
        env = Envelope(sender=env_sender, recipients=[Recipient(to)])
        new_id = self.cleanup.submit(env, data, origin="bounce")
        what = {"failed": "non-delivery", "delayed": "delay status",
                "delivered": "delivery status"}[kind]
        who = "postmaster" if pm else "sender"
        log.info(f"{req.queue_id}: {who} {what} notification: {new_id}")


def _warm_up(svc: BounceService) -> None:
    """Build one notice in memory, so that every module the email package loads lazily
    (generator, charset, encoders...) is loaded before the jail (design.md §4 rule 5)."""
    rcpt = Recipient("warm-up@example.invalid")
    dsn = statuslog.Dsn(status="5.0.0", action="failed", reason="warm-up",
                        diag_type="smtp", diag_text="550 warm-up", mta_type="dns",
                        mta_mname="example.invalid")
    original = "Subject: warm-up\nMessage-ID: <w@x>\n\nbody \u00e9\n".encode()
    for kind in ("failed", "delayed", "delivered"):
        for headers_only in (False, True):
            build_notice(kind=kind, myhostname=svc.myhostname, qid="0", sender="a@b",
                         to="a@b", arrival=time.time(), entries=[(rcpt, dsn)],
                         original=original, headers_only=headers_only, envid="e",
                         postmaster_copy=headers_only)


def main() -> None:
    """Entry point for the bounce, defer and trace services."""
    state: dict[str, BounceService] = {}

    def pre_jail(ctx: ServerContext) -> None:
        svc = state["svc"] = BounceService(ctx)
        _warm_up(svc)

    def post_jail(ctx: ServerContext) -> None:
        # After a chroot the queue is at "/": rebuild the paths from the context.
        state["svc"] = BounceService(ctx)

    def handler(conn: socket.socket, ctx: ServerContext) -> None:
        state["svc"].serve(conn, ctx)

    single_server(handler, pre_jail=pre_jail, post_jail=post_jail)


if __name__ == "__main__":
    main()
