"""bounce — the bounce/defer/trace notice service (``python -m transports.bounce``), bounce(8).

Summary
    One program serves the master.cf services ``bounce``, ``defer`` and ``trace``; the
    service name chooses the status log it reads (``bounce/<id>``, ``defer/<id>``,
    ``trace/<id>``). The qmgr asks it, over ``private/<service>`` with Postfix's
    ``delivery_status_protocol`` (postfix.md §5.4), to turn a message's log into
    notices, and does not wait for anything else meanwhile (its request is asynchronous):

    * FLUSH to ``bounce``: a non-delivery notice for the recipients in ``bounce/<id>``;
    * FLUSH to ``defer``: the message expired — a non-delivery notice for the recipients
      in ``defer/<id>`` (Action: failed, the last 4.x.x status and reason of each: a
      recipient logged more than once is reported once, with its last entry);
    * FLUSH when the log is missing (a defer log never written or lost): the
      non-delivery notice goes out all the same, to everyone a log would have given
      one to, with Postfix's ``\t--- Delivery report unavailable ---`` in place of the
      recipients and no per-recipient delivery-status fields (bounce_diagnostic_log);
      an empty log sends nothing;
    * WARN to ``defer``: a delay warning (Action: delayed, Will-Retry-Until), the log is
      kept (the qmgr marks the warning as sent);
    * TRACE to ``trace``: a success notice (Action: delivered or relayed).

    Notices are RFC 3464 ``multipart/report; report-type=delivery-status`` messages built
    with the standard ``email`` package (:func:`build_notice`): a human-readable
    ``text/plain`` part naming each recipient and the reason, a
    ``message/delivery-status`` part (Reporting-MTA, Original-Envelope-Id, Arrival-Date;
    per recipient Final-Recipient, Original-Recipient from ORCPT or the pre-rewrite
    address, Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date), and the
    original message (``message/rfc822``, copied byte for byte as Postfix's
    bounce_original() does: never parsed and regenerated) or only its headers
    (``text/rfc822-headers``; ``message/global`` and ``message/global-headers`` for
    SMTPUTF8 mail, RFC 6533).
    Every notice enters the queue through cleanup.

Who gets what (Postfix bounce_notify_service, bounce_warn_service, bounce_trace_service)
    * A sender notice goes from the null sender to the envelope sender and lists the
      recipients whose DSN NOTIFY allows it (RFC 3461: none given or FAILURE for
      non-delivery, none or DELAY for delay warnings, SUCCESS for success notices);
      with none left (e.g. NOTIFY=NEVER) no sender notice is sent and that counts as
      success. Non-delivery notices return the message per RET (full unless
      RET=HDRS); delay warnings and success notices return the headers only; anything
      over ``bounce_size_limit`` bytes returns the headers only.
    * Postmaster notices go from ``double-bounce@$myhostname`` (``double_bounce_sender``),
      list every recipient of the log whatever its NOTIFY, carry no boiler-plate text,
      and are sent per ``notify_classes``: class ``bounce`` — a copy of every sender
      non-delivery notice (headers only) to ``bounce_notice_recipient``; class
      ``delay`` — a copy of every delay warning (headers only) to
      ``delay_notice_recipient``. A failed postmaster copy is a warning only.
    * A notice for mail from the null sender (a notice that could not be delivered) is
      a double bounce: with ``bounce`` or ``2bounce`` in ``notify_classes`` it goes to
      ``2bounce_notice_recipient`` with the full message (size limit applies), otherwise
      it is dropped. A delayed null-sender message warns ``delay_notice_recipient``
      only with class ``delay``; a success notice for null-sender mail goes, from the
      double-bounce address, to ``2bounce_notice_recipient`` with class ``2bounce``
      (only that class, as Postfix's bounce_trace_service), otherwise none is sent.
    * A notice for mail from the double-bounce address itself (a postmaster notice that
      could not be delivered) is never sent: ``undeliverable postmaster notification
      discarded``. So a notice can loop at most once, to the postmaster.
    Unqualified notice recipients get ``@$myorigin``.

Public API
    BounceService(ctx)              .serve(conn, ctx), .handle(request) -> int (0 = done)
    build_notice(*, kind, myhostname, qid, sender, to, arrival, entries, original,
                 headers_only, envid="", lifetime=432000, warn_after=0,
                 postmaster_copy=False, boilerplate=True, smtputf8=False,
                 unavailable=False) -> bytes
    REPORT_UNAVAILABLE              the text-part line of a notice whose log is missing
    main()                          the service's entry point (single_server)

Bad bytes
    Addresses and texts arrive decoded with "surrogateescape"; a byte that is not valid
    UTF-8 never makes a notice fail: it is shown as ``\\xff`` in the human-readable part,
    as ``+FF`` (xtext style, RFC 3461) in the address fields of the delivery-status part
    and as ``?`` in other fields and headers (To:, Return-Path:).

Replies ``status=0`` on success (the log is then removed, except for WARN), non-zero on
failure (cleanup refused the notice, the queue file or log could not be read): the log
is kept and the qmgr asks again later. Logs Postfix's lines
``<id>: sender non-delivery notification: <new id>`` (``sender delay notification``,
``sender delivery status notification``, ``postmaster non-delivery notification``,
``postmaster delay notification``) and warnings for bad requests and failures.
"""

from __future__ import annotations

import email.charset
import email.utils
import io
import socket
import time
from email.generator import BytesGenerator
from email.message import Message
from email.mime.base import MIMEBase
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
from qmgrd.spool.envelope import (
    DSN_NOTIFY_DELAY,
    DSN_NOTIFY_FAILURE,
    DSN_NOTIFY_SUCCESS,
    DSN_RET_HDRS,
    SMTPUTF8_FLAG_REQUESTED,
    Envelope,
    Recipient,
)
from qmgrd.spool.message import CorruptQueueFile, QueueFile
from qmgrd.spool.queue import Spool
from qmgrd.spool.queueid import valid_id
from qmgrd.utf8 import shown as _safe

__all__ = ["REPORT_UNAVAILABLE", "BounceService", "build_notice", "main"]

Entries = list[tuple[Recipient, statuslog.Dsn]]

_SUBJECT = {
    "failed": ("Undelivered Mail Returned to Sender", "Postmaster Copy: Undelivered Mail"),
    "delayed": ("Delayed Mail (still being retried)", "Postmaster Warning: Delayed Mail"),
    "delivered": ("Successful Mail Delivery Report", "Postmaster Copy: Delivery Report"),
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
        "Your message could not be delivered for more than {delay}.\n"
        "It will be retried until it is {lifetime} old.\n\n"
        "For further assistance, please send mail to postmaster.\n\n"
        "If you do so, please include this problem report. You can\n"
        "delete your own text from the attached returned message.\n"
    ),
    "delivered": (
        "Your message was successfully delivered to the destination(s)\n"
        "listed below. If the message was delivered to mailbox you will\n"
        "receive no further notifications. Otherwise you may still receive\n"
        "notifications of mail delivery errors from other systems.\n"
    ),
}

# Postfix's bounce_diagnostic_log() when the log is missing (a non-delivery notice only)
REPORT_UNAVAILABLE = "\t--- Delivery report unavailable ---"

_RETURNED = {
    "failed": ("Undelivered Message", "Undelivered Message Headers"),
    "delayed": ("Delayed Message", "Delayed Message Headers"),
    "delivered": ("Delivered Message", "Message Headers"),
}

# Header values are passed as "surrogateescape" text so that the compat32 generator
# writes them as they are (raw UTF-8 for SMTPUTF8 mail, never RFC 2047 words), and
# without folding (max_line_length 0).
_OUT_POLICY = compat32.clone(linesep="\n", max_line_length=0)
_UTF8_8BIT = email.charset.Charset("utf-8")
_UTF8_8BIT.body_encoding = None  # type: ignore[assignment]  # 8bit, not base64


class _Generator(BytesGenerator):
    """BytesGenerator that writes message/global-delivery-status (RFC 6533) as the header
    blocks it is, like message/delivery-status, and a returned message as it is."""

    def _handle_message_global_delivery_status(self, msg: Message) -> None:
        self._handle_message_delivery_status(msg)  # type: ignore[attr-defined]

    def _handle_message(self, msg: Message) -> None:
        """A message/rfc822 or message/global part whose payload is the returned message
        as text ("surrogateescape"): its bytes, unchanged."""
        # get_payload() would decode the surrogates
        payload = msg._payload  # type: ignore[attr-defined]
        if isinstance(payload, str):
            self._fp.write(payload.encode("ascii", "surrogateescape"))  # type: ignore[attr-defined]
        else:
            super()._handle_message(msg)  # type: ignore[misc]


def _raw(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").decode("ascii", "surrogateescape")


def _duration(seconds: float) -> str:
    """``4 hour(s)``, ``5 day(s)``, ``30 second(s)``: the largest unit that fits."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            return f"{round(seconds / size, 1):g} {unit}(s)"
    return f"{max(0, round(seconds)):g} second(s)"


def _field_block(fields: list[tuple[str, str]]) -> Message:
    m = Message(policy=compat32)
    for name, value in fields:
        # an address gets xtext-style +XX for a bad byte, other text (diagnostics) "?"
        style = "xtext" if name.endswith(("Recipient", "Sender")) else "header"
        m[name] = _raw(_safe(value, style))
    return m


def _text_part(text: str) -> MIMEText:
    text = _safe(text, "text")
    if text.isascii():
        return MIMEText(text, "plain", "us-ascii", policy=compat32)
    return MIMEText(text, "plain", _UTF8_8BIT, policy=compat32)  # type: ignore[arg-type]


def _recipient_line(rcpt: Recipient, dsn: statuslog.Dsn) -> str:
    """Postfix's ``<addr> (expanded from <orig>): reason`` line."""
    line = f"<{statuslog.quote_822_local(rcpt.address)}>"
    if rcpt.orig_rcpt and rcpt.orig_rcpt.lower() != rcpt.address.lower():
        line += f" (expanded from <{statuslog.quote_822_local(rcpt.orig_rcpt)}>)"
    return f"{line}: {dsn.reason.rstrip()}"  # Postfix's line wrapping drops end spaces


def _typed(addr: str, smtputf8: bool) -> str:
    """``utf-8; addr`` for an address that is valid non-ASCII UTF-8 in SMTPUTF8 mail (RFC
    6533), else ``rfc822; addr``: Postfix's IS_UTF8_ADDRESS rule (its "Fix 20140708":
    no "utf-8" type for an ASCII address or one that is not valid UTF-8)."""
    utf8 = smtputf8 and not addr.isascii()
    if utf8:
        try:
            addr.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 ("surrogateescape")
            utf8 = False
    return f"{'utf-8' if utf8 else 'rfc822'}; {statuslog.quote_822_local(addr)}"


def _recipient_fields(kind: str, rcpt: Recipient, dsn: statuslog.Dsn, smtputf8: bool,
                      last: str, retry_until: str) -> list[tuple[str, str]]:
    f = [("Final-Recipient", _typed(rcpt.address, smtputf8))]
    if rcpt.dsn_orcpt:
        f.append(("Original-Recipient", rcpt.dsn_orcpt))
    elif rcpt.orig_rcpt and rcpt.orig_rcpt.lower() != rcpt.address.lower():
        f.append(("Original-Recipient", _typed(rcpt.orig_rcpt, smtputf8)))
    if kind == "delivered":
        action = dsn.action if dsn.action in ("delivered", "relayed", "expanded") \
            else "delivered"
    else:
        action = kind
    f.append(("Action", action))
    f.append(("Status", dsn.status or {"failed": "5.0.0", "delayed": "4.0.0"}.get(kind,
                                                                                "2.0.0")))
    if dsn.mta_type and dsn.mta_mname:
        f.append(("Remote-MTA", f"{dsn.mta_type}; {dsn.mta_mname}"))
    # white space at the end (a command's output ends in a newline, made a space) is
    # dropped, as Postfix's line wrapping drops it
    if dsn.diag_type and dsn.diag_text:
        f.append(("Diagnostic-Code", f"{dsn.diag_type}; {dsn.diag_text.rstrip()}"))
    else:
        f.append(("Diagnostic-Code", f"X-Postfix; {dsn.reason.rstrip()}"))
    f.append(("Last-Attempt-Date", last))
    if kind == "delayed":
        f.append(("Will-Retry-Until", retry_until))
    return f


def build_notice(
    *,
    kind: str,
    myhostname: str,
    qid: str,
    sender: str,
    to: str,
    arrival: float,
    entries: Entries,
    original: bytes,
    headers_only: bool,
    envid: str = "",
    lifetime: float = 5 * 86400,
    warn_after: float = 0,
    postmaster_copy: bool = False,
    boilerplate: bool = True,
    smtputf8: bool = False,
    unavailable: bool = False,
) -> bytes:
    """Build an RFC 3464 notice (bytes, LF line ends; cleanup adds the Message-ID).

    Args:
        kind: "failed" (non-delivery or expiry), "delayed" (warning), "delivered".
        myhostname: the Reporting-MTA name.
        qid, sender: the original message's queue id and envelope sender.
        to: the notice's recipient (the To: header).
        arrival: when the original message arrived (epoch seconds).
        entries: the recipients to report with their status (in that order); addresses
            in the internal (unquoted) form, quoted here once (quote_822_local).
        original: the original message (headers + body, or only the headers when
            ``headers_only``), LF line ends.
        headers_only: return ``text/rfc822-headers`` instead of ``message/rfc822``.
        envid: the DSN ENVID ("" = none).
        lifetime: maximal_queue_lifetime in seconds (Will-Retry-Until, warning text).
        warn_after: delay_warning_time in seconds (warning text).
        postmaster_copy: the postmaster subject and ``Auto-Submitted: auto-generated``.
        boilerplate: include the explanatory text (postmaster notices have none).
        smtputf8: use ``message/global-delivery-status`` and ``message/global``
            (RFC 6533) and ``utf-8`` address types.
        unavailable: the status log is missing (``entries`` is empty): the text part
            says ``\t--- Delivery report unavailable ---`` where the recipients would
            be, and the delivery-status part has the per-message fields only, as
            Postfix's bounce_diagnostic_log() and bounce_diagnostic_dsn().
    """
    now = time.time()
    outer = MIMEMultipart("report", report_type="delivery-status", policy=compat32)
    outer["From"] = f"MAILER-DAEMON@{myhostname} (Mail Delivery System)"
    outer["Subject"] = _SUBJECT[kind][1 if postmaster_copy else 0]
    outer["To"] = _raw(_safe(to, "header"))
    outer["Auto-Submitted"] = "auto-generated" if postmaster_copy else "auto-replied"
    outer["Date"] = email.utils.formatdate(now, localtime=True)
    head_end = original.find(b"\n\n")
    orig_hdrs = BytesParser(policy=compat32).parsebytes(
        original if head_end < 0 else original[: head_end + 1], headersonly=True)
    orig_mid = orig_hdrs.get("Message-ID")
    if orig_mid and str(orig_mid).strip():
        outer["In-Reply-To"] = _raw(str(orig_mid).strip())
        outer["References"] = _raw(str(orig_mid).strip())
    outer.preamble = "This is a MIME-encapsulated message.\n"

    text = f"This is the mail system at host {myhostname}.\n\n" + _TEXT[kind].format(
        delay=_duration(warn_after), lifetime=_duration(lifetime)
    ) + "\n                   The mail system\n\n" if boilerplate else ""
    text += "".join(_recipient_line(r, d) + "\n" for r, d in entries)
    if unavailable:
        text += REPORT_UNAVAILABLE + "\n"
    part1 = _text_part(text)
    part1["Content-Description"] = "Notification"
    del part1["MIME-Version"]
    outer.attach(part1)

    msg_fields = [("Reporting-MTA", f"dns; {myhostname}")]
    if envid:
        msg_fields.append(("Original-Envelope-Id", envid))
    msg_fields.append(("X-Postfix-Queue-ID", qid))
    if sender:  # none for the null sender (a double bounce), as Postfix's
        msg_fields.append(("X-Postfix-Sender", _typed(sender, smtputf8)))
    msg_fields.append(("Arrival-Date", email.utils.formatdate(arrival, localtime=True)))
    last = email.utils.formatdate(now, localtime=True)
    retry_until = email.utils.formatdate(arrival + lifetime, localtime=True)
    fields = [msg_fields] + [_recipient_fields(kind, r, d, smtputf8, last, retry_until)
                             for r, d in entries]
    report = MIMEBase("message", "global-delivery-status" if smtputf8 else "delivery-status",
                      policy=compat32)
    report.set_payload([_field_block(block) for block in fields])
    del report["MIME-Version"]
    report["Content-Description"] = "Delivery report"
    outer.attach(report)

    returned = b"Return-Path: <" + _safe(statuslog.quote_822_local(sender),
                                          "header").encode() + b">\n"
    part: Message
    if headers_only:
        head = original if head_end < 0 else original[: head_end + 1]
        # RFC 6533 section 6.3: message/global-headers (RFC 6522: text/rfc822-headers)
        part = MIMEBase(*(("message", "global-headers") if smtputf8
                          else ("text", "rfc822-headers")), policy=compat32)
        part.set_payload((returned + head).decode("ascii", "surrogateescape"))
        del part["MIME-Version"]
        if not head.isascii():
            part["Content-Transfer-Encoding"] = "8bit"
    else:
        # The original goes out byte for byte, as Postfix's bounce_original() copies the
        # queue file's records: a string payload of a message/* part is written as it
        # is, where parsing and regenerating it would turn a body line "From ..." into
        # ">From ..." and a lone CR into a line break.
        part = MIMEBase("message", "global" if smtputf8 else "rfc822", policy=compat32)
        part.set_payload((returned + original).decode("ascii", "surrogateescape"))
        del part["MIME-Version"]
        if not original.isascii():
            part["Content-Transfer-Encoding"] = "8bit"
    part["Content-Description"] = _RETURNED[kind][1 if headers_only else 0]
    outer.attach(part)
    buf = io.BytesIO()
    _Generator(buf, mangle_from_=False, policy=_OUT_POLICY).flatten(outer)
    return buf.getvalue()


def _last_per_recipient(entries: Entries) -> Entries:
    """One entry per recipient (address and queue-file offset), the last one logged, in
    the order the recipients first appear. The log holds the addresses quoted (external
    form); they come back in the internal form, as build_notice quotes them itself."""
    last: dict[tuple[str, int], tuple[Recipient, statuslog.Dsn]] = {}
    for rcpt, dsn in entries:
        rcpt.address = statuslog.unquote_822_local(rcpt.address)
        rcpt.orig_rcpt = statuslog.unquote_822_local(rcpt.orig_rcpt)
        last[(rcpt.address, rcpt.offset)] = (rcpt, dsn)
    return list(last.values())


class BounceService:
    """Serves one of bounce/defer/trace (chosen by the service name)."""

    def __init__(self, ctx: ServerContext):
        cfg = ctx.config
        self.ctx = ctx
        self.cfg = cfg
        self.service = ctx.service
        self.logname = {"defer": "defer", "trace": "trace"}.get(ctx.service, "bounce")
        self.spool = Spool(ctx.queue_directory, tuple(cfg.hash_queue_names()),
                           cfg.get_int("hash_queue_depth"))
        self.cleanup = Cleanup(cfg, self.spool)
        self.myhostname = cfg.get("myhostname")
        self.myorigin = cfg.get("myorigin") or self.myhostname
        self.size_limit = cfg.get_int("bounce_size_limit")
        self.notify_classes = {c.lower() for c in cfg.get_list("notify_classes")}
        self.double_bounce = f"{cfg.get('double_bounce_sender')}@{self.myhostname}"
        self.lifetime = cfg.get_time("maximal_queue_lifetime")
        self.warn_after = cfg.get_time("delay_warning_time")

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
        except (OSError, CorruptQueueFile, CleanupError, UnicodeError) as exc:
            log.warning(f"{req.queue_id}: {self.service}: cannot send notice: {exc}")
            status = 1
        try:
            conn.sendall(encode([("status", status)]))
        except OSError as exc:
            log.warning(f"{req.queue_id}: {self.service}: reply: {exc}")

    def handle(self, req: StatusRequest) -> int:
        """Send the notices for ``req``; returns 0 on success (the log is then removed,
        except after a warning).

        Raises:
            OSError, CorruptQueueFile: the log or queue file cannot be read.
            CleanupError: cleanup refused a notice to the sender or a double bounce.
        """
        if not valid_id(req.queue_id) or req.queue_name not in (
                "active", "incoming", "deferred", "hold"):
            log.warning(f"{self.service}: bad queue id or name in request: {req.queue_id!r}")
            return 1
        kinds = {BOUNCE_CMD_FLUSH: "failed", BOUNCE_CMD_WARN: "delayed",
                 BOUNCE_CMD_TRACE: "delivered"}
        kind = kinds.get(req.nrequest)
        if kind is None:
            log.warning(f"{req.queue_id}: {self.service}: unsupported request {req.nrequest}")
            return 1
        logged = statuslog.read_existing(self.spool, self.logname, req.queue_id)
        if logged is None and kind == "failed":
            # Postfix's bounce_mail_init(): a missing log is no reason to send nothing
            # (the message expired, or bounced, all the same): the notice goes out with
            # "Delivery report unavailable" in place of the recipients. An empty log
            # (no recipient to report) sends none, nor does a missing one for a delay
            # warning or a success notice.
            self._notify(req, kind, [], unavailable=True)
        elif logged:
            self._notify(req, kind, _last_per_recipient(logged))
        if req.nrequest != BOUNCE_CMD_WARN:
            statuslog.remove(self.spool, self.logname, req.queue_id)
        return 0

    def _qualify(self, addr: str) -> str:
        return addr if "@" in addr else f"{addr}@{self.myorigin}"

    def _notify(self, req: StatusRequest, kind: str, entries: Entries, *,
                unavailable: bool = False) -> None:
        """Send the notices ``kind`` for ``entries`` (none and ``unavailable`` when the
        log is missing: every notice a log would have given, for any NOTIFY)."""
        qid, sender = req.queue_id, req.sender
        if sender.lower() == self.double_bounce.lower():
            if kind == "delivered":
                log.info(f"{qid}: not sending trace/success notification for "
                         f"double-bounce message")
            else:
                log.warning(f"{qid}: undeliverable postmaster notification discarded")
            return
        if not sender:
            if kind == "failed" and self.notify_classes & {"bounce", "2bounce"}:
                self._post(req, kind, entries, self.cfg.get("2bounce_notice_recipient"),
                           postmaster=True, ret_hdrs=False, unavailable=unavailable)
            elif kind == "delayed" and "delay" in self.notify_classes:
                self._post(req, kind, entries, self.cfg.get("delay_notice_recipient"),
                           postmaster=True, ret_hdrs=True)
            elif kind == "delivered" and "2bounce" in self.notify_classes:
                # Postfix's bounce_trace_service: the notice goes to the postmaster from
                # the double-bounce address, but is otherwise the sender's notice
                self._post(req, kind, entries, self.cfg.get("2bounce_notice_recipient"),
                           postmaster=False, ret_hdrs=True, env_sender=self.double_bounce)
            elif kind == "delivered":
                log.info(f"{qid}: not sending trace/success notification for "
                         f"single-bounce message")
            else:
                log.info(f"{qid}: null sender: {kind} notice not sent (notify_classes)")
            return
        want = {"failed": DSN_NOTIFY_FAILURE, "delayed": DSN_NOTIFY_DELAY,
                "delivered": DSN_NOTIFY_SUCCESS}[kind]
        if kind == "delivered":
            selected = entries
        else:
            selected = [(r, d) for r, d in entries if r.notify == 0 or r.notify & want]
        if selected or unavailable:
            self._post(req, kind, selected, sender, postmaster=False,
                       ret_hdrs=kind != "failed" or req.ret_flags == DSN_RET_HDRS,
                       unavailable=unavailable)
        copy_to = {"failed": ("bounce", "bounce_notice_recipient"),
                   "delayed": ("delay", "delay_notice_recipient")}.get(kind)
        if copy_to is not None and copy_to[0] in self.notify_classes:
            try:
                self._post(req, kind, entries, self.cfg.get(copy_to[1]), postmaster=True,
                           ret_hdrs=True, unavailable=unavailable)
            except (OSError, CorruptQueueFile, CleanupError) as exc:
                # the reason, then Postfix's line (bounce_notify_service, bounce_warn_service)
                log.warning(f"{qid}: cannot post the postmaster {kind} notice: {exc}")
                doing = "bouncing to" if kind == "failed" else "warning"
                log.warning(f"{qid}: postmaster notice failed while {doing} {sender}")

    def _original(self, req: StatusRequest, ret_hdrs: bool) -> tuple[bytes, float, bool]:
        """(content or headers, arrival, headers_only) of the original message."""
        qf = QueueFile.open(self.spool, req.queue_name, req.queue_id, lock=None)
        try:
            arrival = qf.arrival[0] + qf.arrival[1] / 1e6
            headers_only = ret_hdrs or qf.data_size > self.size_limit
            lines: list[bytes] = []
            for line in qf.iter_lines():
                if headers_only and not line:
                    break
                lines.append(line)
        finally:
            qf.close()
        original = b"\n".join(lines) + b"\n"
        if len(original) > self.size_limit and not headers_only:
            return self._original(req, True)
        return original, arrival, headers_only

    def _post(self, req: StatusRequest, kind: str, entries: Entries, to: str, *,
              postmaster: bool, ret_hdrs: bool, env_sender: str | None = None,
              unavailable: bool = False) -> None:
        """Build one notice and queue it through cleanup (raises as handle() does). Its
        envelope sender is ``env_sender``, by default the double-bounce address for a
        ``postmaster`` notice and the null sender otherwise; ``unavailable``: see
        build_notice."""
        to = self._qualify(to)
        original, arrival, headers_only = self._original(req, ret_hdrs)
        data = build_notice(
            kind=kind, myhostname=self.myhostname, qid=req.queue_id, sender=req.sender,
            to=to, arrival=arrival, entries=entries, original=original,
            headers_only=headers_only, envid=req.envelope_id, lifetime=self.lifetime,
            warn_after=self.warn_after, postmaster_copy=postmaster,
            boilerplate=not postmaster, smtputf8=bool(req.smtputf8 & SMTPUTF8_FLAG_REQUESTED),
            unavailable=unavailable,
        )
        if env_sender is None:
            env_sender = self.double_bounce if postmaster else ""
        # the original's SMTPUTF8 request goes with its notice (Postfix passes the
        # request's smtputf8 to post_mail_fopen): a message/global notice needs it
        env = Envelope(sender=env_sender, recipients=[Recipient(to)],
                       smtputf8=req.smtputf8 & SMTPUTF8_FLAG_REQUESTED)
        new_id = self.cleanup.submit(env, data, origin="bounce")
        what = {"failed": "non-delivery", "delayed": "delay",
                "delivered": "delivery status"}[kind]
        log.info(f"{req.queue_id}: {'postmaster' if postmaster else 'sender'} {what} "
                 f"notification: {new_id}")


def _warm_up(svc: BounceService) -> None:
    """Build notices in memory, so that every module the email package loads lazily
    (generator, charset, encoders...) is loaded before the jail (design.md §4 rule 5)."""
    rcpt = Recipient("warm-up@example.invalid", orig_rcpt="w@example.invalid")
    dsn = statuslog.Dsn(status="5.0.0", action="failed", reason="warm-up",
                        diag_type="smtp", diag_text="550 warm-up", mta_type="dns",
                        mta_mname="example.invalid")
    original = "Subject: warm-up\nMessage-ID: <w@x>\n\nbody \u00e9\n".encode()
    for kind in ("failed", "delayed", "delivered"):
        for headers_only in (False, True):
            build_notice(kind=kind, myhostname=svc.myhostname, qid="0", sender="a@b",
                         to="a\u00e9@b", arrival=time.time(), entries=[(rcpt, dsn)],
                         original=original, headers_only=headers_only, envid="e",
                         postmaster_copy=headers_only, boilerplate=not headers_only,
                         smtputf8=headers_only)


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
