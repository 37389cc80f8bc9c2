"""smtp_tx — one mail transaction of the smtp agent: MAIL FROM, RCPT TO, DATA and the
message content as sent (helpers of transports.smtp, on a transports.smtp_session).

Summary
    ``transaction()`` runs Postfix's smtp(8) transaction (smtp_proto.c smtp_loop()) on a
    session that is open (greeting and EHLO done), for the recipients not yet settled,
    and records each recipient's outcome in the request's Attempt
    (transports.smtp_attempt):

    * Before anything is sent: a sender with CR, LF or NUL bounces every recipient
      ``5.1.7 bad sender address syntax``, such a recipient ``5.1.3 bad recipient
      address syntax``.
    * ``MAIL FROM`` with ``SIZE=`` (and a 5.3.4 bounce ``message size N exceeds size
      limit L of server H[ip]`` when the server's SIZE limit is smaller),
      ``BODY=8BITMIME`` for 8-bit content, ``SMTPUTF8`` when requested and offered,
      DSN ``RET``/``ENVID`` when DSN is offered; one ``RCPT TO`` per recipient (DSN
      ``NOTIFY``/``ORCPT`` when offered, ORCPT as RFC 3461 xtext); ``DATA``. When the
      server offers PIPELINING (RFC 2920) MAIL, every RCPT and DATA go in one write
      (with a cached session's pending RSET first), then the replies are read in order;
      a 421 answers the rest too. Each phase has Postfix's timeout parameter
      (``smtp_mail_timeout``, ``smtp_rcpt_timeout``, ``smtp_data_init_timeout``,
      ``smtp_data_xfer_timeout``, ``smtp_data_done_timeout``).
    * Results: 2xx -> ``relayed`` with the enhanced status code of the reply (else
      2.0.0), the reason being the reply (``250 2.0.0 Ok: queued as X``); 4xx -> deferred
      and 5xx -> bounced, reason ``host H[ip] said: <reply> (in reply to <cmd> command)``.
      A 4xx from a server that is not the last one keeps the recipient for the next.
      Any 3xx to DATA is "go ahead"; a DATA that went ahead without an accepted
      recipient (pipelining) is ended empty. A connection lost while the message is
      being sent is followed by a read of what the server said before it closed: its
      4xx/5xx (``552 5.3.4 message too big``) decides, as in Postfix; without one,
      ``lost connection ... while sending message body`` defers. Once the content is
      being sent ``sess.committed`` is set (a reused session that fails before that is
      retried on a new connection by the caller). A recipient relayed to a server that
      offered DSN loses NOTIFY=SUCCESS: the next hop notifies (smtp_rcpt_done()).
    * Content (``Content``, ``build_content``): the queue file's lines joined with
      CRLF, a line longer than ``smtp_line_length_limit`` broken with CRLF SPACE,
      leading dots doubled.
    * 8-bit content and a server that does not offer 8BITMIME (its EHLO reply lacks it,
      or it was greeted with HELO): RFC 6152 forbids sending it 8-bit. With
      ``disable_mime_output_conversion = no`` (the default) and a request whose
      encoding is not ``7bit`` (the queue file's ``A encoding=``; Postfix's condition),
      the body parts with 8-bit data go quoted-printable and their
      Content-Transfer-Encoding says so, 8bit multipart/message containers say 7bit,
      headers are left as they are (transports.smtp_mime, with the standard ``email``
      package; where it differs from Postfix's MIME engine is said there). It is
      done once per request, when the first such server is met, in the loop's default
      executor (about 0.1 s a MB, which the other deliveries of the process would
      otherwise wait for); SIZE= and the server's size limit apply to the converted
      content. 7-bit content (scanned once per request, as for ``BODY=8BITMIME``) is
      never parsed, and content goes to an 8BITMIME server unchanged. Nothing is
      logged, as in Postfix. A message nested deeper than ``mime_nesting_limit`` (100)
      bounces with ``5.6.0 MIME nesting exceeds safety limit`` (Postfix's
      smtp_mime_fail()). With
      ``disable_mime_output_conversion = yes`` the 8-bit content is sent as it is,
      without ``BODY=``, as Postfix does.
    * A message that requests SMTPUTF8 (queue file ``A smtputf8=`` with the requested
      bit: the client sent ``MAIL FROM ... SMTPUTF8``, or cleanup's autodetection) whose
      envelope needs it (a non-ASCII local part of the sender or a recipient) sent to a
      server that does not offer it: every recipient of the transaction bounces ``5.6.7
      SMTPUTF8 is required, but was not offered by host H[ip]`` (Postfix smtp_proto.c
      insists only when the message requests SMTPUTF8). A message that does not request
      it (an alias's forwarded copy of mail received without SMTPUTF8, whose target is
      UTF-8) goes with the addresses as they are, as Postfix's smtp(8) sends what it
      has: the server answers for each recipient, and the ASCII ones are not held back
      by a UTF-8 one. A UTF-8 domain alone does not need SMTPUTF8: such a server gets
      the domain's A-label (``user@xn--bcher-kva.example``).

Public API
    async transaction(sess, req, body, pending, att, params) -> None     SmtpFailure
    Content(lines, line_limit, nesting_limit)   .data, .eight_bit, .seven_bit() -> bytes
                                                (MimeError)
    build_content(lines, line_limit=998) -> bytes                CRLF, folded, dot-stuffed
    xtext(text) -> str                                           RFC 3461 xtext
    a_label(address) -> str        a UTF-8 domain as its IDNA A-label (no SMTPUTF8)
    rcpt_dsn_options(rcpt) -> list[str]                          NOTIFY=, ORCPT=
Logs nothing (the agent logs the outcome); raises SmtpFailure for a site-level failure
of the session (transports.smtp_session).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable

from qmgrd.delivery import DeliverRequest, RecipientInfo
from qmgrd.spool.envelope import (
    DSN_NOTIFY_DELAY,
    DSN_NOTIFY_FAILURE,
    DSN_NOTIFY_NEVER,
    DSN_NOTIFY_SUCCESS,
    DSN_RET_FULL,
    DSN_RET_HDRS,
    SMTPUTF8_FLAG_REQUESTED,
)
from qmgrd.spool.statuslog import quote_822_local
from transports.agent import make_dsn
from transports.smtp_attempt import Attempt
from transports.smtp_mime import MimeError, downgrade
from transports.smtp_session import Reply, SmtpFailure, SmtpParams, SmtpSession

__all__ = ["Content", "a_label", "build_content", "rcpt_dsn_options", "transaction",
           "xtext"]

_BAD_ADDR = re.compile(r"[\r\n\0]")


def build_content(lines: Iterable[bytes], line_limit: int = 998) -> bytes:
    """The DATA payload: lines joined with CRLF (the last one too), a line longer than
    ``line_limit`` bytes (0 = no limit) broken with CRLF SPACE (Postfix
    smtp_line_length_limit), and every line that starts with "." dot-stuffed."""
    out: list[bytes] = []
    for line in lines:
        if line_limit > 0 and len(line) > line_limit:
            pieces = [line[:line_limit]]
            rest = line[line_limit:]
            step = max(line_limit - 1, 1)
            while rest:
                pieces.append(b" " + rest[:step])
                rest = rest[step:]
            line = b"\r\n".join(pieces)
        if line[:1] == b".":
            line = b"." + line
        out.append(line)
    out.append(b"")
    return b"\r\n".join(out)


class Content:
    """A request's message content as sent: ``data`` (build_content() of its lines) and,
    made when a server first needs it and kept for the next, :meth:`seven_bit`."""

    def __init__(self, lines: list[bytes], line_limit: int, nesting_limit: int) -> None:
        self.lines = lines
        self.line_limit = line_limit
        self.nesting_limit = nesting_limit
        self.data = build_content(lines, line_limit)
        self.eight_bit = not self.data.isascii()
        self._seven: bytes | MimeError | None = None

    def seven_bit(self) -> bytes:
        """The content with its 8-bit body parts quoted-printable (transports.smtp_mime),
        for a server without 8BITMIME; ``data`` itself when no body part is 8-bit.

        Raises:
            MimeError: 5.6.0, the content cannot be converted (too deeply nested).
        """
        if self._seven is None:
            try:
                lines = downgrade(self.lines, self.nesting_limit)
            except MimeError as exc:
                self._seven = exc
            else:
                self._seven = (self.data if lines is self.lines
                               else build_content(lines, self.line_limit))
        if isinstance(self._seven, MimeError):
            raise self._seven
        return self._seven


_XTEXT_AS_IS = re.compile(r"[!-*,-<>-~]*")  # ! to ~ but + and =: xtext of itself


def xtext(text: str) -> str:
    """RFC 3461 xtext: bytes outside ``!``..``~``, and ``+`` and ``=``, as ``+XX``."""
    if _XTEXT_AS_IS.fullmatch(text):
        return text
    out = []
    for b in text.encode("utf-8", "surrogateescape"):
        out.append(chr(b) if 33 <= b <= 126 and b not in (43, 61) else f"+{b:02X}")
    return "".join(out)


def _notify(mask: int) -> str:
    if mask & DSN_NOTIFY_NEVER:
        return "NEVER"
    words = [w for w, bit in (("SUCCESS", DSN_NOTIFY_SUCCESS), ("FAILURE", DSN_NOTIFY_FAILURE),
                              ("DELAY", DSN_NOTIFY_DELAY)) if mask & bit]
    return ",".join(words)


def a_label(address: str) -> str:
    """``address`` with a UTF-8 domain as its IDNA A-label (``user@b\u00fccher.example``
    -> ``user@xn--bcher-kva.example``), as Postfix's smtp client sends it to a server
    without SMTPUTF8 (SMTPUTF8_README); unchanged when the domain is ASCII or has no
    A-label. The local part is never changed."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address


def _angle(address: str) -> str:
    return f"<{quote_822_local(address)}>" if address else "<>"


async def transaction(sess: SmtpSession, req: DeliverRequest, body: Content,
                      pending: list[int], att: Attempt, p: SmtpParams) -> None:
    """MAIL, RCPT..., DATA on an open session for recipients ``pending`` (indexes into
    ``req.recipients``), the outcome recorded in ``att``; ``sess.committed`` is set once
    the content is being sent. Raises SmtpFailure (site-level)."""
    rcpts = req.recipients
    addr = sess.addr
    if _BAD_ADDR.search(req.sender):
        dsn = make_dsn("5.1.7", "bad sender address syntax")
        for i in pending:
            att.final[i] = dsn
        return
    for i in pending:
        if _BAD_ADDR.search(rcpts[i].address):
            att.final[i] = make_dsn("5.1.3", "bad recipient address syntax")
    pending = [i for i in pending if i not in att.final]
    if not pending:
        return
    utf8_addrs = not req.sender.isascii() or any(
        not rcpts[i].address.isascii() for i in pending)
    use_utf8 = (p.smtputf8_enable and sess.has("smtputf8")
                and (utf8_addrs or bool(req.smtputf8 & SMTPUTF8_FLAG_REQUESTED)))
    # without SMTPUTF8 an IDN domain goes as its A-label (user@xn--bcher-kva.example);
    # only a UTF-8 local part (or a domain that has no A-label) needs SMTPUTF8
    convert = utf8_addrs and not use_utf8
    sender = a_label(req.sender) if convert else req.sender
    addrs = {i: a_label(rcpts[i].address) if convert else rcpts[i].address
             for i in pending}
    need_utf8 = convert and (not sender.isascii()
                             or any(not a.isascii() for a in addrs.values()))
    if need_utf8 and req.smtputf8 & SMTPUTF8_FLAG_REQUESTED:
        # Postfix smtp_proto.c: 5.6.7 only for a message that requests SMTPUTF8; an
        # unflagged one is sent as it is (convert implies that use_utf8 is false)
        dsn = make_dsn("5.6.7", f"SMTPUTF8 is required, but was not offered by host "
                                f"{addr.namaddr}")
        att.settle(pending, dsn, sess.relay)
        return
    content = body.data
    if (body.eight_bit and not sess.has("8bitmime") and req.encoding != "7bit"
            and not p.disable_mime_output_conversion):
        # RFC 6152: no 8-bit data to a server without 8BITMIME; Postfix's smtp_loop()
        # downgrades (encoding not 7bit, disable_mime_output_conversion = no)
        try:  # parsing takes about 0.1 s a MB: not in the loop the other deliveries share
            content = await asyncio.get_running_loop().run_in_executor(None,
                                                                       body.seven_bit)
        except MimeError as exc:
            dsn = make_dsn(exc.status, exc.text)
            att.settle(pending, dsn, sess.relay)
            return
    limit = sess.size_limit()
    if limit and len(content) > limit:
        dsn = make_dsn("5.3.4", f"message size {len(content)} exceeds size limit {limit} "
                                f"of server {addr.namaddr}")
        att.settle(pending, dsn, sess.relay)
        return
    opts = []
    if sess.has("size"):
        opts.append(f"SIZE={len(content)}")
    if sess.has("8bitmime") and (req.encoding == "8bit" or body.eight_bit):
        opts.append("BODY=8BITMIME")
    dsn_ok = sess.has("dsn")
    if dsn_ok and req.envelope_id:
        opts.append(f"ENVID={xtext(req.envelope_id)}")
    if dsn_ok and req.ret_flags & (DSN_RET_FULL | DSN_RET_HDRS):
        opts.append("RET=" + ("FULL" if req.ret_flags & DSN_RET_FULL else "HDRS"))
    if use_utf8:
        opts.append("SMTPUTF8")
    mail = " ".join([f"MAIL FROM:{_angle(sender)}"] + opts)
    rcpt_lines = [" ".join([f"RCPT TO:{_angle(addrs[i])}"]
                           + (rcpt_dsn_options(rcpts[i]) if dsn_ok else []))
                  for i in pending]
    if sess.has("pipelining"):
        # RFC 2920: MAIL, every RCPT and DATA in one write, then the replies in order
        # (Postfix's smtp(8) does the same when the server offers PIPELINING)
        rset = ["RSET"] if sess.rset_pending else []  # a cached session's check
        batch = "".join(line + "\r\n" for line in [*rset, mail, *rcpt_lines, "DATA"])
        await sess.send(batch.encode("utf-8", "surrogateescape"), p.mail_timeout,
                        "sending MAIL FROM")
        if rset:
            await sess.pending_rset_reply()
        expect = ([(p.mail_timeout, "sending MAIL FROM", "MAIL FROM")]
                  + [(p.rcpt_timeout, "sending RCPT TO", "RCPT TO")] * len(pending)
                  + [(p.data_init_timeout, "sending DATA command", "DATA")])
        replies: list[Reply] = []
        for timeout, phase, reply_to in expect:
            replies.append(await sess.reply(timeout, phase, reply_to))
            if replies[-1].code == 421:  # closing: it answers the rest too
                replies += [replies[-1]] * (len(expect) - len(replies))
                break
        mail_reply, rcpt_replies, reply = replies[0], replies[1:-1], replies[-1]
        if mail_reply.code // 100 != 2:
            for i in pending:
                att.refused(i, mail_reply, sess, "MAIL FROM")
            accepted: list[int] = []
        else:
            accepted = []
            for i, rcpt_reply in zip(pending, rcpt_replies, strict=True):
                if rcpt_reply.code // 100 == 2:
                    accepted.append(i)
                else:
                    att.refused(i, rcpt_reply, sess, "RCPT TO")
        if not accepted:
            if reply.code // 100 == 3:  # DATA went ahead without a recipient: end it empty
                await sess.call(b".\r\n", p.data_done_timeout, "sending end of data",
                                "end of DATA")
            return
    else:
        reply = await sess.call(mail, p.mail_timeout, "sending MAIL FROM", "MAIL FROM")
        if reply.code // 100 != 2:
            for i in pending:
                att.refused(i, reply, sess, "MAIL FROM")
            return
        accepted = []
        for i, line in zip(pending, rcpt_lines, strict=True):
            reply = await sess.call(line, p.rcpt_timeout, "sending RCPT TO", "RCPT TO")
            if reply.code // 100 == 2:
                accepted.append(i)
            else:
                att.refused(i, reply, sess, "RCPT TO")
        if not accepted:
            return
        reply = await sess.call("DATA", p.data_init_timeout, "sending DATA command",
                                "DATA")
    if reply.code // 100 != 3:  # any 3xx is "go ahead", as Postfix's smtp_loop() reads it
        for i in accepted:
            att.refused(i, reply, sess, "DATA")
        return
    sess.committed = True  # from here on the server may have the message
    try:
        await sess.send(content + b".\r\n", p.data_xfer_timeout, "sending message body",
                        keep_lost=True)
    except SmtpFailure:
        # the server may have said why before it closed (552 message too big): that
        # reply decides, as in Postfix; else the lost connection is the failure
        early = await sess.early_reply(p.data_done_timeout, "sending message body",
                                       "end of DATA")
        if early is None:
            raise
        reply = early
    else:
        reply = await sess.reply(p.data_done_timeout, "sending end of data -- message "
                                 "may be sent more than once", "end of DATA")
    if reply.code // 100 != 2:
        for i in accepted:
            att.refused(i, reply, sess, "end of DATA")
        return
    dsn = make_dsn(reply.dsn, reply.text, action="relayed", diag_type="smtp",
                   diag_text=reply.text, mta_type="dns", mta_mname=addr.hostname)
    for i in accepted:
        att.final[i], att.relay[i] = dsn, sess.relay
        if dsn_ok:
            # The next hop took NOTIFY=SUCCESS with the recipient and will notify the
            # sender itself: no success notice of ours (Postfix's smtp_rcpt_done()).
            rcpts[i].notify &= ~DSN_NOTIFY_SUCCESS


def rcpt_dsn_options(rcpt: RecipientInfo) -> list[str]:
    """NOTIFY= and ORCPT= for one recipient (the server offered DSN)."""
    opts = []
    if rcpt.notify:
        opts.append(f"NOTIFY={_notify(rcpt.notify)}")
    if rcpt.dsn_orcpt:
        kind, sep, value = rcpt.dsn_orcpt.partition(";")
        opts.append(f"ORCPT={kind.strip()};{xtext(value.strip())}" if sep else
                    f"ORCPT=rfc822;{xtext(kind.strip())}")
    elif rcpt.orig_rcpt:
        opts.append(f"ORCPT=rfc822;{xtext(quote_822_local(rcpt.orig_rcpt))}")
    return opts
