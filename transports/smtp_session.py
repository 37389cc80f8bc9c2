"""smtp_session — one SMTP client connection for the smtp agent, on asyncio.

Summary
    ``await SmtpSession(addr, params).open()`` connects (``smtp_connect_timeout``), reads
    the greeting and says EHLO (HELO after a 4xx/5xx EHLO reply other than 421, as
    Postfix's smtp_helo(); a 421 is a refusal) with ``smtp_helo_timeout``;
    ``await call()`` sends one command (or the message data) and reads the reply with the
    timeout of that phase. The session drives a non-blocking socket with the running
    loop's ``sock_*`` calls, so one agent process carries many sessions at once
    (transports.smtp). Replies are read as smtplib reads them (``250-`` continuation
    lines, the text after the code and one separator; a line over 2048 bytes cut there
    with a warning and used, as Postfix's smtp_chat_resp()), but
    as strictly as Postfix's smtp_chat_resp() parses them: a line is three digits and
    then ``-``, a space or its end (``250_ok`` or ``5500 no`` is no reply), a last line
    cut short by the end of the connection is no reply (smtp_get(): lost connection),
    and control characters and bytes that are not UTF-8 in the text become ``?``
    (printable()); the EHLO keywords are kept in ``features``. Failures of the session itself are raised as
    SmtpFailure with ``site=True`` and Postfix's wording:

    * ``connect to H[ip]:port: Connection refused`` (4.4.1)
    * ``host H[ip] refused to talk to me: 554 ...`` (greeting or HELO rejected; a 5xx
      greeting counts as 4xx with ``smtp_skip_5xx_greeting = yes``)
    * ``lost connection with H[ip] while <phase>`` / ``conversation with H[ip] timed out
      while <phase>`` (4.4.2)
    * ``host H[ip] sent a malformed reply ... (in reply to X command)`` (4.5.0): a reply
      that is not a 3-digit code 200..599 is never taken as a rejection.

    Loop detection (Postfix smtp_helo() in smtp_proto.c), only when the server's port is
    the SMTP port 25 (Postfix's SMTP_MISC_FLAG_LOOP_DETECT: ``ntohs(port) ==
    IPPORT_SMTP``; a relayhost on another port, e.g. ``[127.0.0.1]:2525``, is never
    checked, in Postfix neither, and a loop there ends at hopcount_limit):

    * a greeting whose first word after the code is ``myhostname`` (any case) logs
      ``warning: host H[ip]:port greeted me with my own hostname N``; nothing else;
    * an EHLO reply whose first word is ``myhostname`` logs ``warning: host H[ip]:port
      replied to HELO/EHLO with my own hostname N`` and fails the session with ``mail for
      <nexthop> loops back to myself``: 5.4.6 when the server is one of the nexthop's best
      (``best_mx``: a ``[host]`` nexthop's addresses all are), else 4.4.6 (a backup MX:
      try the next one). The HELO reply is not checked (Postfix parses only EHLO's).

    TLS (RFC 3207 STARTTLS; Postfix's smtp_helo() and smtp_start_tls(); the policy and
    the context are transports.smtp_tls): with a TLS engine (``params.tls_context``) and
    a level other than ``none``, a server whose EHLO reply lists STARTTLS gets STARTTLS;
    on 220 the handshake runs over the session's own socket (ssl.MemoryBIO, within
    ``smtp_starttls_timeout``), whatever the server sent after the 220 in the clear is
    dropped, and EHLO is said again (the features are the new reply's). From then on
    every command and reply goes through TLS (``tls`` is the TlsChannel; at level
    ``none`` the clear path is the one used before TLS existed, with one None check per
    write and per read). The outcomes:

    * STARTTLS not offered (or HELO was used): on in the clear; at a level that
      requires TLS (TLS_REQUIRED) a soft failure ``TLS is required, but was not offered
      by host H[ip]`` (4.7.4);
    * STARTTLS answered with an error: on in the clear on the same connection at
      ``may`` (421: the server closes, ``host H[ip] refused to talk to me: 421 ...``);
      when TLS is required, ``TLS is required, but host H[ip] refused to start
      TLS: <reply>`` with the reply's status;
    * the handshake fails: the connection is closed, ``SSL_connect error to
      H[ip]:port: <why>`` logged, and TlsHandshakeFailure raised (4.7.5 ``Cannot start
      TLS: handshake failure``; the agent decides whether to try the server again in
      the clear); at verify/secure an untrusted or mismatched certificate is 4.7.5
      ``Server certificate not verified`` (``certificate verification failed for ...``
      logged);
    * no TLS engine (``dane-only``, ``fingerprint``, or a context that could not be
      made) and STARTTLS offered: ``may`` goes on in the clear, a level that requires
      TLS fails with ``TLS is required, but our TLS engine is unavailable`` (4.7.5).

    All these failures are soft site failures (the next server is tried, the mail
    deferred after the last), never mail sent in the clear at a level that requires
    TLS. With ``smtp_tls_loglevel`` >= 1 a successful handshake logs Postfix's
    ``Untrusted|Anonymous|Verified TLS connection established to H[ip]:port: TLSv1.3
    with cipher C (n/n bits)``. ``tls_level`` is the level the session was made at
    (the agent's, or ``none`` for the retry in the clear after a failed handshake).

    Connection reuse (transports.smtp_cache): a session records when it was opened
    (``created``, monotonic seconds), how often it was reused (``reuse_count``), whether
    the message content was sent in the current transaction (``committed``) and whether
    it must not be used again (``dead``: closed, failed, or the server said 421).
    ``usable()`` checks a session taken from the cache without blocking (the peer has
    not closed it or sent something unasked; on TLS, records without data, such as a
    TLS 1.3 session ticket, are read and do not count) and with RSET
    (``smtp_rset_timeout``).

Public API
    SmtpParams(...)                 the smtp_* parameters (seconds, bytes)
    SmtpSession(addr, params)       coroutines: .open(), .call(command, timeout, phase,
                                    reply_to, *, reply_timeout=None, reply_phase=""),
                                    .send(...), .reply(...), .quit(timeout=None),
                                    .early_reply(timeout, phase, reply_to),
                                    .usable() -> bool, .pending_rset_reply();
                                    .has(feature), .size_limit(), .esmtp, .features,
                                    .close(), .sock, .created, .reuse_count,
                                    .committed, .dead, .relay (relay= text, conn_use=N);
                                    .nexthop, .best_mx (loop detection, set before open)
                                    .tls (TlsChannel | None: encrypted), .tls_level
    SMTP_PORT                       25: the port on which loops are looked for
    TLS_REQUIRED                    smtp_tls_security_level values that require TLS
    Reply(code, lines)              .text (Postfix's one-line form), .dsn (x.y.z)
    SmtpFailure(status, reason, *, site, reply=None, mta="")   .dsn() -> Dsn
    TlsHandshakeFailure(SmtpFailure) the TLS handshake failed (4.7.5)
Logs the two loop warnings above and the TLS lines.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import socket
import ssl
import time
from dataclasses import dataclass, field

from master import log
from qmgrd.spool.statuslog import Dsn
from transports.agent import make_dsn
from transports.smtp_dns import Address
from transports.smtp_tls import TLS_REQUIRED, TLS_VERIFY, TlsChannel

__all__ = ["SMTP_PORT", "TLS_REQUIRED", "Reply", "SmtpFailure", "SmtpParams", "SmtpSession",
           "TlsHandshakeFailure"]

SMTP_PORT = 25  # Postfix IPPORT_SMTP: loop detection happens on this port only

_LINE_LIMIT = 2048  # bytes of one reply line kept; the rest is read and dropped (Postfix:
# smtp_get() with line_length_limit and SMTP_GET_FLAG_SKIP)
_TEXT_LIMIT = 2048  # bytes of a reply's text kept (Postfix: line_length_limit), lines beyond
_XFER_CHUNK = 65536  # bytes sent under one timeout: the timeouts are for no progress
_YIELD_LINES = 32  # reply lines read between turns given to the other deliveries
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|\Z)")
# a reply line: three digits, then "-" (more lines follow), " " or the line's end
# (Postfix smtp_chat_resp(); "250_ok" and "5500 no" are garbage, not a 250 or a 550)
_CODE = re.compile(rb"(\d{3})(?:[- ]|\r?\n|\Z)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ufffd]")


@dataclass
class Reply:
    """One SMTP reply: the code (its last line's) and the text of each line (code
    stripped); ``codes``: each line's own code, when the server's lines disagree."""

    code: int
    lines: list[str]
    codes: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The reply as Postfix logs it: ``550-first line 550 last line`` on one line,
        each line with the code the server gave it (Postfix quotes the lines as read)."""
        n = len(self.lines)
        codes = self.codes if len(self.codes) == n else [self.code] * n
        return " ".join(f"{codes[i]}{'-' if i < n - 1 else ' '}{ln}".rstrip()
                        for i, ln in enumerate(self.lines))

    @property
    def dsn(self) -> str:
        """The enhanced status code of the reply, or ``<class>.0.0``."""
        cls = str(self.code)[0]
        m = _ENHANCED.match(self.lines[0] if self.lines else "")
        if m is not None and m.group(1) == cls:
            return m.group(0)
        return f"{cls}.0.0"


class SmtpFailure(Exception):
    """The session with one server failed; ``site`` = the server itself is the problem."""

    def __init__(self, status: str, reason: str, *, site: bool, reply: Reply | None = None,
                 mta: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.site = site
        self.reply = reply
        self.mta = mta
        self.relay = "none"  # relay= of the log line: the server once connected to it

    def dsn(self) -> Dsn:
        """The Dsn this failure gives each recipient it applies to."""
        if self.reply is not None:
            return make_dsn(self.status, self.reason, diag_type="smtp",
                            diag_text=self.reply.text, mta_type="dns", mta_mname=self.mta)
        return make_dsn(self.status, self.reason)


class TlsHandshakeFailure(SmtpFailure):
    """The TLS handshake after STARTTLS failed (the connection is closed): Postfix's
    ``4.7.5 Cannot start TLS: handshake failure``; at ``may`` the caller may try the same
    server again in the clear (transports.smtp)."""


@dataclass
class SmtpParams:
    """The smtp_* parameters (seconds for timeouts)."""

    helo_name: str = "localhost"
    myhostname: str = ""  # for loop detection ("" = none)
    connect_timeout: float = 30.0
    helo_timeout: float = 300.0
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_init_timeout: float = 120.0
    data_xfer_timeout: float = 180.0
    data_done_timeout: float = 600.0
    quit_timeout: float = 300.0
    line_length_limit: int = 998
    mx_address_limit: int = 5
    mx_session_limit: int = 2
    skip_5xx_greeting: bool = True
    smtputf8_enable: bool = True
    rset_timeout: float = 20.0
    cache_on_demand: bool = True
    cache_time_limit: float = 2.0
    reuse_time_limit: float = 300.0
    reuse_count_limit: int = 0
    cache_destinations: list[str] = field(default_factory=list)
    tls_security_level: str = ""
    tls_level: str = "none"  # smtp_tls_security_level, lower case ("" -> "none")
    tls_context: ssl.SSLContext | None = None  # None: no TLS engine (none, or it failed)
    tls_loglevel: int = 0
    starttls_timeout: float = 300.0
    tls_connection_reuse: bool = False
    disable_mime_output_conversion: bool = False  # send 8-bit as is to a non-8BITMIME server
    mime_nesting_limit: int = 100  # multipart/message levels the conversion goes into


def _nexthop_host(nexthop: str) -> str:
    """The host of a nexthop: ``[host]:port`` -> ``host``, ``domain:port`` -> ``domain``
    (the name ``secure`` matches the certificate against)."""
    host = nexthop.strip().split(",")[0].strip()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _first_word(reply: Reply) -> str:
    """The first word of a reply's first line after the code, lower case (the server's
    name in a greeting or an EHLO reply)."""
    words = reply.lines[0].split() if reply.lines else []
    return words[0].lower() if words else ""


def _timed_out(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError) or "timed out" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _printable(raw: bytes) -> str:
    """Reply text as Postfix's printable() leaves it: control characters (NUL, CR, ESC
    ...) and bytes that are not UTF-8 become "?", so that no server writes them into
    the log or a bounce."""
    return _CONTROL.sub("?", raw.decode("utf-8", "replace"))




class SmtpSession:
    """One SMTP connection to one address, over a non-blocking socket driven by the
    running asyncio loop (``loop.sock_*``: no stream objects, one recv per reply)."""

    def __init__(self, addr: Address, params: SmtpParams) -> None:
        self.addr = addr
        self.params = params
        self.sock: socket.socket | None = None
        self.esmtp = False
        self.features: dict[str, str] = {}
        self.created = time.monotonic()
        self.reuse_count = 0
        self.committed = False
        self.dead = False
        self.rset_pending = False  # usable() left RSET to go first in the next pipeline
        self.connected = False  # the TCP connection was made (relay= is this server)
        self._buf = bytearray()
        self._last = b""  # the last reply line read, as it came
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of open()
        self.nexthop = addr.hostname  # the request's nexthop, for "mail for X loops back"
        self.best_mx = True  # one of the nexthop's most preferred servers
        self.tls: TlsChannel | None = None  # set once STARTTLS succeeded
        # the level this session was made at: the request's, or "none" for a retry in
        # the clear after a failed handshake (set before open())
        self.tls_level = params.tls_level

    @property
    def relay(self) -> str:
        """The relay= text: ``host[ip]:port``, plus ``, conn_use=N`` (the N-th
        transaction on this connection) when it is a reused one, as Postfix logs it."""
        if self.reuse_count:
            return f"{self.addr.relay}, conn_use={self.reuse_count + 1}"
        return self.addr.relay

    async def open(self) -> None:
        """Connect, read the greeting, EHLO (HELO after a non-421 EHLO refusal).

        Raises:
            SmtpFailure: site-level failure.
        """
        addr, p = self.addr, self.params
        self.created = time.monotonic()
        family = socket.AF_INET6 if ":" in addr.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        self._loop = loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(p.connect_timeout or None):
                await loop.sock_connect(sock, (addr.ip, addr.port))
        except (OSError, TimeoutError) as exc:
            sock.close()
            # asyncio words a refusal "Connect call failed (...)": use the errno's text
            why = "Connection timed out" if _timed_out(exc) else (
                (os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else "")
                or exc.strerror or str(exc) or type(exc).__name__)
            raise SmtpFailure("4.4.1", f"connect to {addr.relay}: {why}", site=True) from None
        self.sock = sock
        self.connected = True
        greeting = await self.call(None, p.helo_timeout,
                                   "receiving the initial server greeting", "initial greeting")
        if greeting.code // 100 != 2:
            status = greeting.dsn
            if status[0] == "5" and p.skip_5xx_greeting:
                status = "4" + status[1:]
            raise self._refused(greeting, status)
        loop_detect = bool(p.myhostname) and addr.port == SMTP_PORT
        if loop_detect and _first_word(greeting) == p.myhostname.lower():
            log.warning(f"host {addr.relay} greeted me with my own hostname {p.myhostname}")
        reply = await self.call(f"EHLO {p.helo_name}", p.helo_timeout,
                                "performing the EHLO handshake", "EHLO")
        if reply.code // 100 == 2:
            self.esmtp = True
            self._parse_features(reply)
            if loop_detect and _first_word(reply) == p.myhostname.lower():
                log.warning(f"host {addr.relay} replied to HELO/EHLO with my own hostname "
                            f"{p.myhostname}")
                raise SmtpFailure("5.4.6" if self.best_mx else "4.4.6",
                                  f"mail for {self.nexthop} loops back to myself", site=True)
            if p.tls_context is not None and self.tls_level != "none":
                await self._starttls(p.tls_context)
            self._tls_check()
            return
        if reply.code != 421:  # Postfix smtp_helo(): any other refusal -> try HELO
            reply = await self.call(f"HELO {p.helo_name}", p.helo_timeout,
                                    "performing the HELO handshake", "HELO")
            if reply.code // 100 == 2:
                self._tls_check()
                return
        raise self._refused(reply, reply.dsn)

    async def _ehlo(self) -> Reply:
        """EHLO (again, after STARTTLS), HELO after a non-421 refusal; the features of a
        2xx EHLO reply. Raises SmtpFailure."""
        p = self.params
        reply = await self.call(f"EHLO {p.helo_name}", p.helo_timeout,
                                "performing the EHLO handshake", "EHLO")
        if reply.code // 100 == 2:
            self.esmtp = True
            self._parse_features(reply)
            return reply
        self.esmtp, self.features = False, {}
        if reply.code != 421:
            reply = await self.call(f"HELO {p.helo_name}", p.helo_timeout,
                                    "performing the HELO handshake", "HELO")
            if reply.code // 100 == 2:
                return reply
        raise self._refused(reply, reply.dsn)

    async def _starttls(self, context: ssl.SSLContext) -> None:
        """STARTTLS when the server's EHLO offers it, as Postfix's smtp_helo() and
        smtp_start_tls(): a 2xx reply -> the handshake (``smtp_starttls_timeout``), then
        EHLO again; another reply -> on in the clear, or, when TLS is required, the
        soft or hard failure ``TLS is required, but host H[ip] refused to start TLS:
        <reply>``. A failed handshake closes the connection (nothing more can be said on
        it) and raises TlsHandshakeFailure (4.7.5 ``Cannot start TLS: handshake
        failure``), or, at verify/secure, SmtpFailure 4.7.5 ``Server certificate not
        verified`` when the certificate is not trusted or does not match the name.
        Logs Postfix's ``SSL_connect error to H[ip]:port: ...`` (or ``certificate
        verification failed for H[ip]:port: ...``) and, with ``smtp_tls_loglevel`` >= 1,
        ``... TLS connection established to ...``."""
        p = self.params
        if not self.has("starttls"):
            return
        reply = await self.call("STARTTLS", p.helo_timeout, "receiving the STARTTLS response",
                                "STARTTLS")
        if reply.code == 421:  # the server is closing: nothing more goes on this one
            raise self._refused(reply, reply.dsn)
        if reply.code // 100 != 2:
            self.features.pop("starttls", None)
            if self.tls_level in TLS_REQUIRED:
                raise SmtpFailure(reply.dsn, f"TLS is required, but host {self.addr.namaddr} "
                                  f"refused to start TLS: {reply.text}", site=True,
                                  reply=reply, mta=self.addr.hostname)
            return
        # whatever came after the 220 in the clear is dropped, never taken as a reply
        # inside TLS (the STARTTLS command injection of CVE-2011-0411)
        self._buf.clear()
        verify = self.tls_level in TLS_VERIFY
        name = None
        if verify:
            name = self.addr.hostname if self.tls_level == "verify" else _nexthop_host(
                self.nexthop)
        where = f"{self.addr.namaddr}:{self.addr.port}"
        try:
            channel = TlsChannel(context, name)
            assert self.sock is not None and self._loop is not None
            async with asyncio.timeout(p.starttls_timeout or None):
                await channel.handshake(self._loop, self.sock)
        except (OSError, TimeoutError, ValueError) as exc:
            self.close()
            why = "Connection timed out" if _timed_out(exc) else (
                getattr(exc, "verify_message", "") or getattr(exc, "reason", "")
                or str(exc) or type(exc).__name__)
            if isinstance(exc, ssl.SSLCertVerificationError):
                log.info(f"certificate verification failed for {where}: {why}")
                raise SmtpFailure("4.7.5", "Server certificate not verified",
                                  site=True) from None
            log.info(f"SSL_connect error to {where}: {why}")
            raise TlsHandshakeFailure("4.7.5", "Cannot start TLS: handshake failure",
                                      site=True) from None
        self.tls = channel
        if p.tls_loglevel >= 1:
            log.info(channel.established(where, verify))
        await self._ehlo()

    def _tls_check(self) -> None:
        """No TLS on this session: at a security level that requires it, fail the
        session as Postfix's smtp_helo() does when TLS cannot be had ("200412 ... When
        TLS is required we must never, ever, end up in plain-text mode"), so that no
        mail goes out in the clear: 4.7.4 when the server did not offer STARTTLS, else
        4.7.5 (Postfix's words when its TLS engine is unavailable: dane-only,
        fingerprint, or a context that could not be made). Soft: the next server is
        tried, the mail deferred after the last."""
        if self.tls is not None or self.tls_level not in TLS_REQUIRED:
            return
        if not self.has("starttls"):
            raise SmtpFailure("4.7.4", "TLS is required, but was not offered by host "
                                       f"{self.addr.namaddr}", site=True)
        raise SmtpFailure("4.7.5", "TLS is required, but our TLS engine is unavailable",
                          site=True)

    def _refused(self, reply: Reply, status: str) -> SmtpFailure:
        return SmtpFailure(status, f"host {self.addr.namaddr} refused to talk to me: "
                           f"{reply.text}", site=True, reply=reply, mta=self.addr.hostname)

    def _parse_features(self, reply: Reply) -> None:
        self.features = {}
        for line in reply.lines[1:]:
            m = re.match(r"([A-Za-z0-9][A-Za-z0-9-]*) ?(.*)", line)
            if m:
                self.features[m.group(1).lower()] = m.group(2).strip()

    def has(self, feature: str) -> bool:
        """True when EHLO announced ``feature`` (case-insensitive)."""
        return self.esmtp and feature.lower() in self.features

    def size_limit(self) -> int:
        """The server's SIZE limit in bytes (0 = none announced or unlimited)."""
        value = self.features.get("size", "") if self.esmtp else ""
        return int(value) if value.isdigit() else 0

    async def call(self, command: str | bytes | None, timeout: float, phase: str,
                   reply_to: str, *, reply_timeout: float | None = None,
                   reply_phase: str = "") -> Reply:
        """Send ``command`` (str: a command line without CRLF; bytes: raw data) and read
        the reply, with ``timeout`` seconds for the exchange (``reply_timeout`` and
        ``reply_phase``, when given, apply to waiting for the reply).

        Raises:
            SmtpFailure: lost connection, timeout, or a malformed reply (site-level).
        """
        await self.send(command, timeout, phase)
        if reply_timeout is not None:
            return await self.reply(reply_timeout, reply_phase or phase, reply_to)
        return await self.reply(timeout, phase, reply_to)

    async def send(self, command: str | bytes | None, timeout: float, phase: str, *,
                   keep_lost: bool = False) -> None:
        """Send a command line (str, CRLF added), raw bytes, or several pipelined command
        lines joined (bytes, RFC 2920), without reading a reply. ``timeout`` seconds is
        the limit without progress, not for the whole: each piece of _XFER_CHUNK bytes
        has it anew (Postfix: a time limit per write system call, smtp_per_record_deadline
        = no), so a large message to a slow but steady server is not cut off after
        ``smtp_data_xfer_timeout`` seconds, only a transfer that stalls that long.
        ``keep_lost``: a lost connection (not a timeout) leaves the socket open, so that
        a reply the server sent before it closed can still be read (:meth:`early_reply`).

        Raises:
            SmtpFailure: lost connection or timeout (site-level).
        """
        if command is None:
            return
        data = ((command + "\r\n").encode("utf-8", "surrogateescape")
                if isinstance(command, str) else command)
        if self.tls is not None:
            await self._send_tls(data, timeout, phase, keep_lost)
            return
        try:
            sock, loop = self.sock, self._loop
            if sock is None or loop is None:
                raise ConnectionError("not connected")
            try:  # most commands fit the socket buffer: no loop round trip
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            rest = memoryview(data)[sent:]
            for start in range(0, len(rest), _XFER_CHUNK):
                async with asyncio.timeout(timeout or None):
                    await loop.sock_sendall(sock, rest[start:start + _XFER_CHUNK])
        except (OSError, TimeoutError) as exc:
            raise self._lost(exc, phase, close=not keep_lost or _timed_out(exc)) from None

    async def _send_tls(self, data: bytes, timeout: float, phase: str, keep_lost: bool) -> None:
        """:meth:`send` on a TLS session: each _XFER_CHUNK bytes encrypted and sent under
        ``timeout`` anew."""
        tls, sock, loop = self.tls, self.sock, self._loop
        try:
            if tls is None or sock is None or loop is None:
                raise ConnectionError("not connected")
            view = memoryview(data)
            for start in range(0, len(view), _XFER_CHUNK):
                records = tls.encrypt(view[start:start + _XFER_CHUNK])
                async with asyncio.timeout(timeout or None):
                    await loop.sock_sendall(sock, records)
        except (OSError, TimeoutError) as exc:
            raise self._lost(exc, phase, close=not keep_lost or _timed_out(exc)) from None

    async def early_reply(self, timeout: float, phase: str, reply_to: str) -> Reply | None:
        """After the connection was lost while sending the message (``send(...,
        keep_lost=True)``): the 4xx/5xx reply the server sent before it closed (e.g.
        ``552 5.3.4 message too big`` part way through), read within ``timeout``
        seconds, or None (nothing readable, or a reply that is not a refusal: a message
        not sent whole is never taken as accepted). Postfix's smtp_loop() reads such a
        reply too (LOST_CONNECTION_INSIDE_DATA) instead of deferring with "lost
        connection ... while sending message body". The session is closed afterwards."""
        if self.sock is None:
            return None
        try:
            reply = await self.reply(timeout, phase, reply_to)
        except SmtpFailure:
            return None
        finally:
            self.close()
        return reply if reply.code // 100 in (4, 5) else None

    def _buffered_line(self) -> bytes | None:
        """A whole reply line (line end included) already received and within
        _LINE_LIMIT, taken out of the buffer; None when there is none (or it is
        overlong: _readline's)."""
        buf = self._buf
        end = buf.find(b"\n")
        if not 0 <= end < _LINE_LIMIT:
            return None
        line = bytes(buf[:end + 1])
        del buf[:end + 1]
        return line

    async def _readline(self) -> bytes:
        """One reply line with its line end; b"" at EOF, also when the peer closed the
        connection within a line (Postfix smtp_get(): "Don't allow data that was
        truncated because of EOF"). A line longer than _LINE_LIMIT bytes is cut there,
        the rest of it read and dropped, with ``warning: <host>[<addr>]:<port>: response
        longer than 2048: <its first 30 characters>...``, and used, as Postfix's
        smtp_chat_resp() does (an overlong 250 after the message is still a 250)."""
        line = self._buffered_line()
        if line is not None:
            return line
        buf = self._buf
        head: bytes | None = None  # the first _LINE_LIMIT bytes of an overlong line
        while True:
            end = buf.find(b"\n")
            if end >= 0:
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                if head is None and len(line.rstrip(b"\r\n")) > _LINE_LIMIT:
                    head = line[:_LINE_LIMIT]
                if head is not None:
                    log.warning(f"{self.addr.namaddr}:{self.addr.port}: response longer than "
                                f"{_LINE_LIMIT}: {_printable(head[:30])}...")
                    return head + b"\n"
                return line
            if head is None and len(buf) > _LINE_LIMIT:
                head = bytes(buf[:_LINE_LIMIT])
            if head is not None:
                buf.clear()  # the rest of the overlong line: read and dropped
            assert self.sock is not None and self._loop is not None
            if self.tls is None:
                chunk = await self._loop.sock_recv(self.sock, 65536)
            else:
                chunk = await self.tls.recv(self._loop, self.sock)
            if not chunk:  # EOF, also within a line: no reply (Postfix smtp_get())
                buf.clear()
                return b""
            buf += chunk

    async def reply(self, timeout: float, phase: str, reply_to: str) -> Reply:
        """Read one reply within ``timeout`` seconds (multi-line: ``250-`` ... ``250 ``).
        Of a long multi-line reply only the lines within the first 2048 bytes of text
        are kept, as Postfix keeps them; the rest is read and dropped. Every 32 lines
        the other deliveries of the process get a turn (data already waiting in the
        socket is read without one), so a peer that floods continuation lines holds up
        neither them nor this reply's timeout.

        Raises:
            SmtpFailure: lost connection, timeout, or a malformed reply (site-level).
        """
        lines: list[str] = []
        codes: list[int] = []
        kept = 0
        count = 0
        code = -1

        def take(raw: bytes) -> bool:
            """One reply line; True when it ends the reply."""
            nonlocal code, kept, count
            self._last = raw
            count += 1
            m = _CODE.match(raw)
            code = int(m.group(1)) if m else -1
            if kept < _TEXT_LIMIT or raw[3:4] != b"-":  # the last line always
                text = _printable(raw[4:].strip(b" \t\r\n"))
                lines.append(text)
                codes.append(code)
                kept += len(text) + 1
            return code < 0 or raw[3:4] != b"-"

        try:
            if self.sock is None:
                raise ConnectionError("not connected")
            # The lines already here (the replies to a pipelined batch come together):
            # taken without a timeout, which only a read from the peer needs
            done = False
            while not done and count < _YIELD_LINES:
                raw = self._buffered_line()
                if raw is None:
                    break
                done = take(raw)
            if not done:
                async with asyncio.timeout(timeout or None):
                    while True:
                        raw = await self._readline()
                        if not raw:
                            raise ConnectionError("Connection unexpectedly closed")
                        if take(raw):
                            break
                        if count % _YIELD_LINES == 0:
                            await asyncio.sleep(0)
        except (OSError, TimeoutError) as exc:
            raise self._lost(exc, phase) from None
        if not 200 <= code <= 599:  # quote the line whole: its first 4 bytes are text
            raise self._malformed(reply_to, self._last.decode("utf-8", "replace").strip()
                                  or " ".join(lines))
        if code == 421:  # the server is closing the connection (RFC 5321 3.8)
            self.dead = True
        return Reply(code, lines, codes if any(c != code for c in codes) else [])

    def _lost(self, exc: BaseException, phase: str, close: bool = True) -> SmtpFailure:
        if close:
            self.close()
        if _timed_out(exc):
            return SmtpFailure("4.4.2", f"conversation with {self.addr.namaddr} timed out "
                                        f"while {phase}", site=True)
        return SmtpFailure("4.4.2", f"lost connection with {self.addr.namaddr} while {phase}",
                           site=True)

    async def usable(self) -> bool:
        """Check a cached session before reuse: the peer has neither closed it nor sent
        anything unasked (a 421 on an idle connection), and RSET gets a 250 within
        ``smtp_rset_timeout`` - with PIPELINING the RSET is sent first in the next batch
        instead of on its own (``rset_pending``, :meth:`pending_rset_reply`), one round
        trip less. False closes the session; nothing is logged or raised."""
        sock = self.sock
        if self.dead or sock is None:
            self.close()
            return False
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        # EOF, an error, or unasked data (421); on TLS maybe only a session ticket
        if (self._buf or poller.poll(0)) and (self.tls is None or not await self._tls_idle()):
            self.close()
            return False
        self.committed = False
        if self.has("pipelining"):  # RSET goes first in the next pipelined batch
            self.rset_pending = True
            return True
        try:
            reply = await self.call("RSET", self.params.rset_timeout, "sending RSET", "RSET")
        except SmtpFailure:
            return False
        if reply.code != 250:
            self.close()
            return False
        return True

    async def _tls_idle(self) -> bool:
        """A TLS session whose socket is readable while idle: True when what came were
        only TLS records without data (a TLS 1.3 session ticket), False when data, the
        end of the connection or an error came."""
        tls, sock = self.tls, self.sock
        if tls is None or sock is None or self._buf:
            return False
        try:
            raw = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not raw:
            return False
        tls.incoming.write(raw)
        try:
            tls.obj.read(65536)
        except ssl.SSLWantReadError:
            return not tls.obj.pending()
        except (ssl.SSLError, OSError):
            return False
        return False

    async def pending_rset_reply(self) -> None:
        """Read the reply to the RSET sent first in a pipelined batch (``rset_pending``).

        Raises:
            SmtpFailure: lost connection, timeout, or not 250: the cached session is dead
            (the caller, which has committed nothing, makes a new connection).
        """
        self.rset_pending = False
        reply = await self.reply(self.params.rset_timeout, "sending RSET", "RSET")
        if reply.code != 250:
            self.close()
            raise SmtpFailure("4.4.2", f"host {self.addr.namaddr} refused RSET", site=True)

    def _malformed(self, reply_to: str, text: str) -> SmtpFailure:
        self.close()
        return SmtpFailure("4.5.0", f"host {self.addr.namaddr} sent a malformed reply "
                           f"{text[:200]!r} (in reply to {reply_to} command)", site=True)

    async def quit(self, timeout: float | None = None) -> None:
        """Send QUIT (errors ignored) and close; ``timeout`` seconds (default
        ``smtp_quit_timeout``) for the exchange; closed also when cancelled."""
        try:
            if self.sock is not None and not self.dead:
                await self.call("QUIT", self.params.quit_timeout if timeout is None
                                else timeout, "sending QUIT", "QUIT")
        except SmtpFailure:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection (idempotent); the session is dead from then on."""
        self.dead = True
        if self.sock is not None:
            self.sock.close()
            self.sock = None
