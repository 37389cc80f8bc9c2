"""cleanup — the one way mail enters incoming/: envelope + content -> a Postfix queue file.

Summary
    ``Cleanup.submit()`` does the work of Postfix's cleanup(8) for qmgrd (postfix.md §1.4,
    §1.6, §2.3, §2.4):

    * Content is bytes with any mix of line endings: lines are split on LF and every CR
      right before an LF is dropped (Postfix's smtp_get: "We remove bare CR if received
      before CRLF, and leave it alone otherwise"; its sendmail does the same with the
      default sendmail_fix_line_endings = always); any other CR, NUL bytes and 8-bit
      bytes stay as data; a missing final newline is fine. Lines longer than
      ``line_length_limit`` become ``L`` records plus a final ``N``. The body is never
      re-serialised.
    * Only the header block is scanned (a small line scanner; ``email.utils`` parses
      addresses when recipients are extracted). A non-header line ends the headers and
      gets an empty line inserted before it, as Postfix's mime_state does; an explicit
      empty line is kept as the separator.
    * Header edits: ``Return-Path:`` removed; for local submissions (origin "local") a
      ``Received: by <myhostname> (<mail_name>, from userid N)`` / ``<TAB>id <qid>; <date>``
      header goes first, as pickup+cleanup write it; for origin "forward" (the local
      agent's alias forwarding, Postfix local/forward.c) ``Received: by <myhostname>
      (<mail_name>)`` / ``<TAB>id <qid>; <date>``; missing ``Message-ID:`` and ``Date:``
      are added at the end of the headers; a missing ``From:`` is added when the rewrite
      context is local (or ``always_add_missing_headers = yes``).
    * ``extract_recipients=True`` (sendmail -t): recipients are also taken from To/Cc/Bcc
      (Resent-To/Cc/Bcc when present) and Bcc/Resent-Bcc is removed; the addresses are
      stored in Postfix's internal form (``"a b"@x`` -> ``a b@x``, see
      envelope.extract_addresses). In the local context an address without ``@`` gets
      ``@$myorigin``. Exact duplicate recipients are dropped. No recipients ->
      CleanupError 5.1.0.
    * Hop count = number of Received: headers (our own included; Delivered-To: does not
      count, as in Postfix's cleanup_header, where only HDR_RECEIVED raises hop_count).
      At ``hopcount_limit`` or more:

      - origin "smtp" (smtpd): the message is refused as Postfix's cleanup does without
        CLEANUP_FLAG_BOUNCE (CLEANUP_STAT_HOPS): ``warning: <qid>: message rejected:
        hopcount exceeded``, the queue file removed, CleanupError ``5.4.0`` "too many
        hops" (smtpd replies ``554 5.4.0 Error: too many hops`` at the end of DATA);
      - origin "local" (sendmail/pickup, already accepted: Postfix bounces) and others:
        the file is still queued, but every recipient gets a bounce-log entry ``5.4.0``
        "too many hops" (Postfix's cleanup_bounce with the CLEANUP_STAT_HOPS detail) and
        is marked done, so the qmgr sends the non-delivery report.
    * ``bounce()`` does the same for a message that submit() refused with a 5.x.x status
      (Postfix cleanup_bounce, used by pickup so that local mail is never lost
      silently): every recipient, or ``unknown`` when there is none, is bounced with
      that status and text; a too-big message keeps only its headers (RET=HDRS).
    * The added ``From:`` quotes the sender's local part when RFC 5322 requires it
      (``From: "a b"@example.org``, Postfix quote_822_local).
    * Records: C T A(create_time) [F] A(rewrite_context) [A encoding=8bit] [A smtputf8=N]
      [A envelope_id=] [A ret_flags=] [A name=value...] S [W] then per recipient
      [A notify_flags=] [A dsn_orig_rcpt=] O R, then M, content, X, E. The C record gets
      the final numbers before the file is written.
    * Durability: the file is created 0600 in incoming/, written, flushed, fchmod 0700,
      fsync'ed and closed; only then is ``W`` sent to ``public/qmgr``. On any OSError the
      file is removed and CleanupError 4.3.0 raised (5.3.4 for EFBIG), so no ready half
      file is ever left.

Public API
    Cleanup(cfg, spool)
    Cleanup.submit(env, content, *, extract_recipients=False,
                   origin="local"|"smtp"|"forward"|other,
                   uid=None) -> str (the queue id)
    Cleanup.bounce(env, content, status, text, *, extract_recipients=False,
                   origin="local", uid=None) -> str (the queue id)
    CleanupError(status, text)          .status ("4.3.0", "5.3.4", "5.1.0"), .text
    mail_date(when: float) -> str       RFC 5322 date as Postfix writes it
    truncate_headers(data, limit) -> (bytes, headers cut)   header_size_limit (smtpd, pickup)

Logs ``<qid>: message-id=<...>`` (info) per message, a warning per hop-count bounce or
rejection, and
for every recipient bounced here ``<qid>: to=<rcpt>, relay=none, delay=.., delays=..,
dsn=5.x.x, status=bounced (reason)`` (Postfix bounce_append's log_adhoc line).
"""

from __future__ import annotations

import email.utils  # noqa: F401 - loaded before any jail (envelope.extract_addresses)
import errno
import functools
import os
import re
import time
from dataclasses import replace
from typing import IO, TYPE_CHECKING

from master import log
from master.config.params import PARAMS
from qmgrd.logfmt import delivery_line
from qmgrd.spool import records as R
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import (
    DSN_RET_HDRS,
    SMTPUTF8_FLAG_HEADER,
    SMTPUTF8_FLAG_REQUESTED,
    SMTPUTF8_FLAG_SENDER,
    Envelope,
    Recipient,
    extract_addresses,
)
from qmgrd.spool.queue import Spool
from qmgrd.spool.statuslog import quote_822_local
from qmgrd.trigger import TRIGGER_REQ_WAKEUP, send_trigger

if TYPE_CHECKING:
    from master.config import Config

__all__ = ["Cleanup", "CleanupError", "mail_date", "truncate_headers"]

_HEADER_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_ENVELOPE_BAD = re.compile("[\0\r\n]")  # never in envelope data (one queue-file record)
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_PHRASE_SPECIALS = frozenset('()<>@,;:\\".[]')
_RCPT_HEADERS = (b"to", b"cc", b"bcc")
_RESENT_RCPT_HEADERS = (b"resent-to", b"resent-cc", b"resent-bcc")


@functools.lru_cache(maxsize=4)
def _norm_headers(limit: int) -> tuple[bytes, ...]:
    """The header of a REC_NORM record (type byte, length) for each line length 0 ..
    ``limit`` (line_length_limit), made once per process and limit."""
    return tuple(R.REC_NORM + R.encode_len(k) for k in range(limit + 1))


# Made at import for main.cf's default, so in the master that forks the smtpd, pickup and
# bounce processes (master.daemon.forkspawn): they share it. Each Cleanup building its
# own (2,049 small bytes objects) cost each of them about 0.2 MiB of pages (issue 8, M).
_norm_headers(int(PARAMS["line_length_limit"].default))


def _split_lines(content: bytes) -> list[bytes]:
    """``content``'s lines without their line ends: split on LF, each run of CRs right
    before an LF dropped (module docstring), other CRs kept."""
    content = content.replace(b"\r\n", b"\n")  # the common case, at bytes.replace speed
    lines = content.split(b"\n")
    if b"\r\n" in content:  # a run of CRs: linear (no regex, no loop per CR: a DoS)
        last = lines.pop()  # not ended by an LF: its CRs stay
        lines = [line.rstrip(b"\r") for line in lines]
        lines.append(last)
    return lines


def truncate_headers(data: bytes, limit: int) -> tuple[bytes, int]:
    """Cut every header of ``data`` (a message, any line ends) longer than ``limit`` bytes
    (its physical lines counted without line ends) to ``limit``; returns the new data and
    how many headers were cut. The header block ends at an empty line or at the first line
    that is neither a header nor a continuation. Postfix's cleanup keeps at most
    ``header_size_limit`` bytes of a header and drops the excess; smtpd and pickup call
    this before Cleanup.submit."""
    if limit <= 0 or len(data) <= limit:
        return data, 0
    out = bytearray()
    pos, n, size, cut, cutting, started = 0, len(data), 0, 0, False, False
    while pos < n:
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        line = data[pos:end]
        text = line.rstrip(b"\r\n")
        if not text:
            break
        if line[:1] in (b" ", b"\t") and started:
            pass
        elif _HEADER_RE.match(line):
            started, size, cutting = True, 0, False
        else:
            break
        if not cutting:
            if size + len(text) > limit:
                out += text[: max(limit - size, 0)] + line[len(text):]
                cutting = True
                cut += 1
            else:
                out += line
        size += len(text)
        pos = end
    if not cut:
        return data, 0
    return bytes(out) + data[pos:], cut


class CleanupError(Exception):
    """The message was not queued.

    Attributes:
        status: enhanced status code: "4.3.0" (try again: write error), "5.3.4"
            (message too big), "5.1.0" (no recipients), "5.6.0" (bad envelope data).
        text: human-readable reason.
    """

    def __init__(self, status: str, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text


def mail_date(when: float) -> str:
    """``Mon, 23 Nov 2026 09:15:02 +0100 (CET)`` in local time (Postfix mail_date)."""
    tm = time.localtime(when)
    off = tm.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off) // 60
    zone = f" ({tm.tm_zone})" if tm.tm_zone else ""
    return (f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}"
            f"{zone}")


def _phrase(name: str) -> str:
    if any(c in _PHRASE_SPECIALS for c in name):
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return name


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class _Headers:
    """Result of scanning the header block."""

    __slots__ = (
        "body_start",
        "eight_bit",
        "hops",
        "lines",
        "message_id",
        "rcpt_values",
        "resent_rcpt_values",
        "seen",
        "separator",
    )

    def __init__(self) -> None:
        self.lines: list[bytes] = []          # header lines to write, physical lines
        self.body_start = 0
        self.separator = False                # an explicit empty line ended the headers
        self.seen: set[bytes] = set()
        self.hops = 0
        self.message_id = ""
        self.rcpt_values: list[str] = []
        self.resent_rcpt_values: list[str] = []
        self.eight_bit = False


def _scan_headers(lines: list[bytes], extract: bool) -> _Headers:
    h = _Headers()
    n = len(lines)
    i = 0
    block: list[bytes] = []
    name = b""

    def finish() -> None:
        if not block:
            return
        h.seen.add(name)
        if name == b"received":
            h.hops += 1
        if name in _RCPT_HEADERS or name in _RESENT_RCPT_HEADERS:
            value = _text(b" ".join(block)[block[0].index(b":") + 1 :])
            (h.resent_rcpt_values if name.startswith(b"resent-") else h.rcpt_values).append(
                value)
        if name == b"message-id":
            h.message_id = _text(b" ".join(x.strip() for x in block)).partition(":")[2].strip()
        if name == b"return-path" or (extract and name in (b"bcc", b"resent-bcc")):
            return
        h.lines.extend(block)

    while i < n:
        line = lines[i]
        if not line:
            h.separator = True
            i += 1
            break
        if block and line[:1] in (b" ", b"\t"):
            block.append(line)
            i += 1
            continue
        m = _HEADER_RE.match(line)
        if m is None:
            break
        finish()
        block = [line]
        name = line[: line.index(b":")].rstrip().lower()
        i += 1
    finish()
    h.body_start = i
    h.eight_bit = not all(x.isascii() for x in h.lines)
    return h


class Cleanup:
    """Queue-file writer bound to one configuration and queue directory.

    Reads its parameters once (myhostname, myorigin, mail_name, line_length_limit,
    message_size_limit, hopcount_limit, delay_warning_time, always_add_missing_headers).
    """

    def __init__(self, cfg: Config, spool: Spool) -> None:
        self.spool = spool
        self.myhostname = cfg.get("myhostname")
        self.myorigin = cfg.get("myorigin") or self.myhostname
        self.mail_name = cfg.get("mail_name") or "qmgrd"
        self.line_limit = max(cfg.get_int("line_length_limit"), 1)
        self.size_limit = cfg.get_int("message_size_limit")
        self.hop_limit = cfg.get_int("hopcount_limit")
        self.delay_warning = cfg.get_time("delay_warning_time")
        self.always_add = cfg.get("always_add_missing_headers").strip().lower() in (
            "yes", "true", "1")
        self.trigger_path = os.path.join(spool.queue_directory, "public", "qmgr")
        self._nhdr = _norm_headers(self.line_limit)  # shared: see _norm_headers

    # ------------------------------------------------------------------ helpers

    def _qualify(self, addr: str, local: bool) -> str:
        if local and addr and "@" not in addr:
            return f"{addr}@{self.myorigin}"
        return addr

    def _content(self, out: bytearray, lines: list[bytes]) -> None:
        nhdr = self._nhdr
        limit = self.line_limit
        for line in lines:
            n = len(line)
            if n <= limit:
                out += nhdr[n]
                out += line
                continue
            last = (n - 1) // limit * limit
            for k in range(0, last, limit):
                out += R.encode(R.REC_CONT, line[k : k + limit])
            out += nhdr[n - last]
            out += line[last:]

    def _extract(self, h: _Headers, local: bool) -> list[Recipient]:
        values = h.resent_rcpt_values or h.rcpt_values
        return [Recipient(self._qualify(addr, local)) for addr in extract_addresses(values)]

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        env: Envelope,
        content: bytes,
        *,
        extract_recipients: bool = False,
        origin: str = "local",
        uid: int | None = None,
    ) -> str:
        """Write one message into incoming/ and wake the qmgr.

        Args:
            env: the envelope (recipients may be empty with extract_recipients).
            content: the message, headers and body, any line endings.
            extract_recipients: add recipients from To/Cc/Bcc and drop Bcc (sendmail -t).
            origin: "local" (sendmail/pickup: adds Received:, local rewrite context),
                "smtp" (smtpd wrote its own Received:), "forward" (the local agent's
                alias forwarding: adds Received: without the userid; rewrite context
                from ``env.attrs``) or another name (no Received:; e.g. "bounce").
            uid: submitting user id for the local Received: header (default: ours).

        Returns:
            The new queue id.

        Raises:
            CleanupError: 5.3.4 too big, 5.1.0 no recipients, 5.6.0 bad envelope data
                (NUL or line break in an address or attribute), 5.4.0 too many hops
                (origin "smtp" only), 4.3.0 write error. The
                queue file does not exist afterwards.
        """
        if self.size_limit and len(content) > self.size_limit:
            raise CleanupError("5.3.4", "message file too big")
        return self._queue(env, content, extract_recipients, origin, uid, None)

    def bounce(
        self,
        env: Envelope,
        content: bytes,
        status: str,
        text: str,
        *,
        extract_recipients: bool = False,
        origin: str = "local",
        uid: int | None = None,
    ) -> str:
        """Queue a message that submit() refused, with every recipient bounced, so that the
        qmgr returns it to the sender (Postfix cleanup_bounce, for clients that cannot
        report the problem themselves, such as pickup).

        Each recipient (``unknown`` when there is none) gets a bounce-log entry
        ``status`` ``text`` and is marked done; ``<qid>: to=<rcpt>, relay=none, ...,
        status=bounced (text)`` is logged per recipient. For ``5.3.4`` (too big) only the
        header block is kept and RET is HDRS.

        Args:
            env, content, extract_recipients, origin, uid: as for submit().
            status: the enhanced status code of the refusal (5.x.x).
            text: its reason, as in CleanupError.text.

        Returns:
            The new queue id.

        Raises:
            CleanupError: 4.3.0 write error, 5.6.0 envelope data that no queue file can
                hold (NUL or line break). The queue file does not exist afterwards.
        """
        return self._queue(env, content, extract_recipients, origin, uid, (status, text))

    def _queue(self, env: Envelope, content: bytes, extract_recipients: bool, origin: str,
               uid: int | None, bounce: tuple[str, str] | None) -> str:
        context = "local" if origin == "local" else env.attrs.get("rewrite_context", "remote")
        local = context == "local"
        lines = _split_lines(content) if content else []
        if lines and not lines[-1]:
            lines.pop()  # the content ended with a newline
        h = _scan_headers(lines, extract_recipients)
        if bounce is not None and bounce[0] == "5.3.4":
            del lines[h.body_start :]
            env = replace(env, ret=DSN_RET_HDRS)

        sender = self._qualify(env.sender, local)
        rcpts = [
            Recipient(self._qualify(r.address, local), r.orig_rcpt, r.dsn_orcpt, r.notify)
            for r in env.recipients
        ]
        if extract_recipients:
            rcpts += self._extract(h, local)
        rcpts = self._dedup(rcpts)
        if not rcpts:
            if bounce is None:
                raise CleanupError("5.1.0", "no recipients specified")
            rcpts = [Recipient("unknown")]
        self._check_envelope(env, sender, rcpts)

        smtputf8 = env.smtputf8
        if origin == "local" and (h.eight_bit or not sender.isascii()
                                  or not all(r.address.isascii() for r in rcpts)):
            smtputf8 |= SMTPUTF8_FLAG_REQUESTED
        if smtputf8 & SMTPUTF8_FLAG_REQUESTED:
            if h.eight_bit:
                smtputf8 |= SMTPUTF8_FLAG_HEADER
            if not sender.isascii():
                smtputf8 |= SMTPUTF8_FLAG_SENDER

        sec, usec = env.arrival
        if sec <= 0:
            now = time.time_ns() // 1000
            sec, usec = now // 1_000_000, now % 1_000_000
        try:
            f, qid, path = self.spool.create("incoming")
        except OSError as exc:
            raise CleanupError("4.3.0", f"queue file create error: {exc.strerror}") from None
        self._created(qid)
        hops = h.hops + (1 if origin in ("local", "forward") else 0)
        reasons: list[str] = []
        if bounce is not None:
            reasons = [bounce[1]] * len(rcpts)
        elif origin == "smtp" and self.hop_limit > 0 and hops >= self.hop_limit:
            # Postfix cleanup without CLEANUP_FLAG_BOUNCE (smtpd): CLEANUP_STAT_HOPS, the
            # file is removed and the client told "554 5.4.0 Error: too many hops"
            self._discard(f, path, qid)
            log.warning(f"{qid}: message rejected: hopcount exceeded")
            raise CleanupError("5.4.0", "too many hops")
        elif self.hop_limit > 0 and hops >= self.hop_limit:
            log.warning(f"{qid}: hop count {hops} exceeds limit {self.hop_limit}: "
                        f"bouncing {len(rcpts)} recipient(s)")
            bounce = ("5.4.0", "too many hops")  # Postfix cleanup_stat_map's HOPS detail
            reasons = [bounce[1]] * len(rcpts)
        try:
            buf, offsets, msgid = self._build(env, sender, rcpts, lines, h, qid, sec, usec,
                                              local, origin, uid, smtputf8, content)
            if bounce is not None:
                for off in offsets:
                    buf[off : off + 1] = R.REC_DONE
            f.write(buf)
            f.flush()
            if bounce is not None:
                self._bounce_log(qid, rcpts, offsets, bounce[0], reasons)
            os.fchmod(f.fileno(), 0o700)
            os.fsync(f.fileno())
            f.close()
        except OSError as exc:
            self._discard(f, path, qid)
            if exc.errno == errno.EFBIG and bounce is None:
                raise CleanupError("5.3.4", "message file too big") from None
            raise CleanupError("4.3.0", f"queue file write error: {exc.strerror}") from None
        except BaseException:
            self._discard(f, path, qid)
            raise
        log.info(f"{qid}: message-id={msgid}")
        if bounce is not None:
            arrival, done = sec + usec / 1e6, time.time()
            for r, reason in zip(rcpts, reasons):
                log.info(delivery_line(qid, r.address, r.orig_rcpt, "none", arrival, done,
                                       done, done, done, bounce[0], "bounced", reason))
        send_trigger(self.trigger_path, TRIGGER_REQ_WAKEUP)
        return qid

    def _created(self, qid: str) -> None:
        """Called once the queue file ``qid`` exists in incoming/, before anything else
        is decided about the message (SmtpdCleanup logs ``<qid>: client=...`` here, as
        Postfix's smtpd does when its cleanup stream gets the queue id)."""

    @staticmethod
    def _dedup(rcpts: list[Recipient]) -> list[Recipient]:
        seen: set[tuple[str, str, str, int]] = set()
        out: list[Recipient] = []
        for r in rcpts:
            key = (r.address, r.orig_rcpt, r.dsn_orcpt, r.notify)
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out

    @staticmethod
    def _check_envelope(env: Envelope, sender: str, rcpts: list[Recipient]) -> None:
        values = [sender, env.fullname, env.envid]
        values += [v for r in rcpts for v in (r.address, r.orig_rcpt, r.dsn_orcpt)]
        values += [f"{k}={v}" for k, v in env.attrs.items()]
        if _ENVELOPE_BAD.search("".join(values)):
            raise CleanupError("5.6.0", "line break or NUL byte in envelope data")
        if any(not k or "=" in k for k in env.attrs):
            raise CleanupError("5.6.0", "bad attribute name in envelope")

    def _discard(self, f: IO[bytes], path: str, qid: str) -> None:
        try:
            f.close()
        except OSError:
            pass
        for p in (path, self.spool.path("bounce", qid)):
            try:
                os.unlink(p)
            except OSError:
                pass

    def _bounce_log(self, qid: str, rcpts: list[Recipient], offsets: list[int],
                    status: str, reasons: list[str]) -> None:
        """One bounce-log entry per recipient."""
        for r, off, reason in zip(rcpts, offsets, reasons):
            rr = Recipient(r.address, r.orig_rcpt or r.address, r.dsn_orcpt, r.notify, off)
            statuslog.append(self.spool, "bounce", qid, rr, statuslog.Dsn(
                status, "failed", reason))

    def _build(self, env: Envelope, sender: str, rcpts: list[Recipient], lines: list[bytes],
               h: _Headers, qid: str, sec: int, usec: int, local: bool, origin: str,
               uid: int | None, smtputf8: int,
               content: bytes) -> tuple[bytearray, list[int], str]:
        """The whole queue file in memory; returns (bytes, R offsets, message-id)."""
        enc = R.encode
        out = bytearray(R.SIZE_RECORD_LEN)
        out += enc(R.REC_TIME, b"%d %d" % (sec, usec))
        out += enc(R.REC_ATTR, b"create_time=%d" % sec)
        if env.fullname:
            out += enc(R.REC_FULL, env.fullname.encode("utf-8", "surrogateescape"))
        out += enc(R.REC_ATTR, b"rewrite_context=" + (b"local" if local else b"remote"))
        encoding = "8bit" if not content.isascii() else env.attrs.get("encoding", "")
        if encoding:
            out += enc(R.REC_ATTR, b"encoding=" + encoding.encode())
        if smtputf8:
            out += enc(R.REC_ATTR, b"smtputf8=%d" % smtputf8)
        if env.envid:
            out += enc(R.REC_ATTR, b"envelope_id=" + env.envid.encode("utf-8", "surrogateescape"))
        if env.ret:
            out += enc(R.REC_ATTR, b"ret_flags=%d" % env.ret)
        for k, v in env.attrs.items():
            if k not in ("rewrite_context", "encoding", "create_time", "smtputf8"):
                out += enc(R.REC_ATTR, f"{k}={v}".encode("utf-8", "surrogateescape"))
        out += enc(R.REC_FROM, sender.encode("utf-8", "surrogateescape"))
        if self.delay_warning > 0 and sender:
            out += enc(R.REC_WARN, b"%15d" % (sec + self.delay_warning))
        offsets: list[int] = []
        notify_union = 0
        for r in rcpts:
            if r.notify:
                out += enc(R.REC_ATTR, b"notify_flags=%d" % r.notify)
                notify_union |= r.notify
            if r.dsn_orcpt:
                out += enc(R.REC_ATTR, b"dsn_orig_rcpt=" + r.dsn_orcpt.encode(
                    "utf-8", "surrogateescape"))
            addr = r.address.encode("utf-8", "surrogateescape")
            out += enc(R.REC_ORCP, r.orig_rcpt.encode("utf-8", "surrogateescape") or addr)
            offsets.append(len(out))
            out += enc(R.REC_RCPT, addr)
        out += enc(R.REC_MESG, b"")
        data_offset = len(out)

        head: list[bytes] = []
        if origin == "local":
            head.append(f"Received: by {self.myhostname} ({self.mail_name}, from userid "
                        f"{os.getuid() if uid is None else uid})".encode())
        elif origin == "forward":  # Postfix local/forward.c forward_send()
            head.append(f"Received: by {self.myhostname} ({self.mail_name})".encode())
        if head:
            head.append(f"\tid {qid}; {mail_date(sec + usec / 1e6)}".encode())
        msgid = h.message_id
        added: list[bytes] = []
        if b"message-id" not in h.seen:
            msgid = f"<{qid}@{self.myhostname}>"
            added.append(f"Message-ID: {msgid}".encode())
        if b"date" not in h.seen:
            added.append(f"Date: {mail_date(sec + usec / 1e6)}".encode())
        if b"from" not in h.seen and (local or self.always_add):
            who = quote_822_local(sender) if sender else "MAILER-DAEMON"
            name = f"{_phrase(env.fullname)} <{who}>" if env.fullname and sender else who
            added.append(b"From: " + name.encode("utf-8", "surrogateescape"))
        self._content(out, head)
        self._content(out, h.lines)
        self._content(out, added)
        body = lines[h.body_start :]
        if h.separator or body:
            out += self._nhdr[0]
        self._content(out, body)
        data_size = len(out) - data_offset
        out += enc(R.REC_XTRA, b"")
        out += enc(R.REC_END, b"")
        flags = (notify_union << 1) & 0x1E
        out[0 : R.SIZE_RECORD_LEN] = enc(R.REC_SIZE, R.size_payload(
            data_size, data_offset, len(rcpts), flags, data_size, smtputf8))
        return out, offsets, msgid
