"""smtp_session — one SMTP client connection for the smtp agent, on top of smtplib.

Summary
    ``SmtpSession(addr, params).open()`` connects (``smtp_connect_timeout``), reads the
    greeting and says EHLO (HELO after a 5xx EHLO reply) with ``smtp_helo_timeout``;
    ``call()`` sends one command (or the message data) and reads the reply with the
    timeout of that phase. smtplib.SMTP does the reply parsing and keeps the EHLO
    features. Failures of the session itself are raised as SmtpFailure with ``site=True``
    and Postfix's wording:

    * ``connect to H[ip]:port: Connection refused`` (4.4.1)
    * ``host H[ip] refused to talk to me: 554 ...`` (greeting or HELO rejected; a 5xx
      greeting counts as 4xx with ``smtp_skip_5xx_greeting = yes``)
    * ``lost connection with H[ip] while <phase>`` / ``conversation with H[ip] timed out
      while <phase>`` (4.4.2)
    * ``host H[ip] sent a malformed reply ... (in reply to X command)`` (4.5.0): a reply
      that is not a 3-digit code 200..599 is never taken as a rejection.

    Connection reuse (transports.smtp_cache): a session records when it was opened
    (``created``, monotonic seconds), how often it was reused (``reuse_count``), whether
    the message content was sent in the current transaction (``committed``) and whether
    it must not be used again (``dead``: closed, failed, or the server said 421).
    ``usable()`` checks a session taken from the cache without blocking (the peer has
    not closed it or sent something unasked) and with RSET (``smtp_rset_timeout``).

Public API
    SmtpParams(...)                 the smtp_* parameters (seconds, bytes)
    SmtpSession(addr, params)       .open(), .call(command, timeout, phase, reply_to, *,
                                    reply_timeout=None, reply_phase=""), .has(feature),
                                    .size_limit(), .esmtp, .quit(timeout=None), .close(),
                                    .usable() -> bool, .created, .reuse_count,
                                    .committed, .dead, .relay (relay= text, conn_use=N)
    Reply(code, lines)              .text (Postfix's one-line form), .dsn (x.y.z)
    SmtpFailure(status, reason, *, site, reply=None, mta="")   .dsn() -> Dsn
Logs nothing.
"""

from __future__ import annotations

import re
import select
import smtplib
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from qmgrd.spool.statuslog import Dsn
from transports.agent import make_dsn
from transports.smtp_dns import Address

__all__ = ["Reply", "SmtpFailure", "SmtpParams", "SmtpSession"]

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|\Z)")


@dataclass
class Reply:
    """One SMTP reply: the code and the text of each line (code stripped)."""

    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        """The reply as Postfix logs it: ``550-first line 550 last line`` on one line."""
        n = len(self.lines)
        return " ".join(f"{self.code}{'-' if i < n - 1 else ' '}{ln}".rstrip()
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


@dataclass
class SmtpParams:
    """The smtp_* parameters (seconds for timeouts)."""

    helo_name: str = "localhost"
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


def _timed_out(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError) or "timed out" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class SmtpSession:
    """One SMTP connection to one address, driven through smtplib.SMTP."""

    def __init__(self, addr: Address, params: SmtpParams) -> None:
        self.addr = addr
        self.params = params
        self.client = smtplib.SMTP(local_hostname=params.helo_name)
        self.esmtp = False
        self.created = time.monotonic()
        self.reuse_count = 0
        self.committed = False
        self.dead = False
        self.rset_pending = False  # usable() left RSET to go first in the next pipeline
        self.connected = False  # the TCP connection was made (relay= is this server)
        self._lines: _LineRecorder | None = None

    @property
    def relay(self) -> str:
        """The relay= text: ``host[ip]:port``, plus ``, conn_use=N`` (the N-th
        transaction on this connection) when it is a reused one, as Postfix logs it."""
        if self.reuse_count:
            return f"{self.addr.relay}, conn_use={self.reuse_count + 1}"
        return self.addr.relay

    def open(self) -> None:
        """Connect, read the greeting, EHLO (HELO after a 5xx EHLO).

        Raises:
            SmtpFailure: site-level failure.
        """
        addr, p = self.addr, self.params
        self.created = time.monotonic()
        family = socket.AF_INET6 if ":" in addr.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(p.connect_timeout or None)
        try:
            sock.connect((addr.ip, addr.port))
        except OSError as exc:
            sock.close()
            why = "Connection timed out" if _timed_out(exc) else (
                exc.strerror or str(exc) or type(exc).__name__)
            raise SmtpFailure("4.4.1", f"connect to {addr.relay}: {why}", site=True) from None
        self.client.sock = sock
        self.connected = True
        self._lines = _LineRecorder(sock.makefile("rb"))
        self.client.file = self._lines
        greeting = self.call(None, p.helo_timeout, "receiving the initial server greeting",
                             "initial greeting")
        if greeting.code // 100 != 2:
            status = greeting.dsn
            if status[0] == "5" and p.skip_5xx_greeting:
                status = "4" + status[1:]
            raise self._refused(greeting, status)
        reply = self.call(f"EHLO {p.helo_name}", p.helo_timeout,
                          "performing the EHLO handshake", "EHLO")
        if reply.code // 100 == 2:
            self.esmtp = True
            self._parse_features(reply)
            return
        if reply.code // 100 == 5:
            reply = self.call(f"HELO {p.helo_name}", p.helo_timeout,
                              "performing the HELO handshake", "HELO")
            if reply.code // 100 == 2:
                return
        raise self._refused(reply, reply.dsn)

    def _refused(self, reply: Reply, status: str) -> SmtpFailure:
        return SmtpFailure(status, f"host {self.addr.namaddr} refused to talk to me: "
                           f"{reply.text}", site=True, reply=reply, mta=self.addr.hostname)

    def _parse_features(self, reply: Reply) -> None:
        self.client.esmtp_features = {}
        self.client.does_esmtp = True
        for line in reply.lines[1:]:
            m = re.match(r"([A-Za-z0-9][A-Za-z0-9-]*) ?(.*)", line)
            if m:
                self.client.esmtp_features[m.group(1).lower()] = m.group(2).strip()

    def has(self, feature: str) -> bool:
        """True when EHLO announced ``feature`` (case-insensitive)."""
        return self.esmtp and self.client.has_extn(feature)

    def size_limit(self) -> int:
        """The server's SIZE limit in bytes (0 = none announced or unlimited)."""
        value = self.client.esmtp_features.get("size", "") if self.esmtp else ""
        return int(value) if value.isdigit() else 0

    def call(self, command: str | bytes | None, timeout: float, phase: str,
             reply_to: str, *, reply_timeout: float | None = None,
             reply_phase: str = "") -> Reply:
        """Send ``command`` (str: a command line without CRLF; bytes: raw data) and read
        the reply, with ``timeout`` seconds for the exchange (``reply_timeout`` and
        ``reply_phase``, when given, apply to waiting for the reply).

        Raises:
            SmtpFailure: lost connection, timeout, or a malformed reply (site-level).
        """
        self.send(command, timeout, phase)
        if reply_timeout is not None:
            return self.reply(reply_timeout, reply_phase or phase, reply_to)
        return self.reply(timeout, phase, reply_to)

    def send(self, command: str | bytes | None, timeout: float, phase: str) -> None:
        """Send a command line (str, CRLF added), raw bytes, or several pipelined command
        lines joined (bytes, RFC 2920), without reading a reply.

        Raises:
            SmtpFailure: lost connection or timeout (site-level).
        """
        client = self.client
        try:
            if client.sock is None:
                raise smtplib.SMTPServerDisconnected("not connected")
            client.sock.settimeout(timeout or None)
            if isinstance(command, str):
                client.send((command + "\r\n").encode("utf-8", "surrogateescape"))
            elif command is not None:
                client.send(command)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            raise self._lost(exc, phase) from None

    def reply(self, timeout: float, phase: str, reply_to: str) -> Reply:
        """Read one reply within ``timeout`` seconds.

        Raises:
            SmtpFailure: lost connection, timeout, or a malformed reply (site-level).
        """
        client = self.client
        try:
            if client.sock is None:
                raise smtplib.SMTPServerDisconnected("not connected")
            client.sock.settimeout(timeout or None)
            code, msg = client.getreply()
        except smtplib.SMTPResponseException as exc:  # reply line too long
            raise self._malformed(reply_to, str(exc.smtp_error)) from None
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            raise self._lost(exc, phase) from None
        lines = msg.decode("utf-8", "replace").split("\n")
        if not 200 <= code <= 599:  # smtplib cut 4 bytes off each line: quote them whole
            raw = self._lines.last if self._lines is not None else b""
            raise self._malformed(reply_to, raw.decode("utf-8", "replace").strip()
                                  or " ".join(lines))
        if code == 421:  # the server is closing the connection (RFC 5321 3.8)
            self.dead = True
        return Reply(code, lines)

    def _lost(self, exc: BaseException, phase: str) -> SmtpFailure:
        self.close()
        if _timed_out(exc):
            return SmtpFailure("4.4.2", f"conversation with {self.addr.namaddr} timed out "
                                        f"while {phase}", site=True)
        return SmtpFailure("4.4.2", f"lost connection with {self.addr.namaddr} while {phase}",
                           site=True)

    def usable(self) -> bool:
        """Check a cached session before reuse: the peer has neither closed it nor sent
        anything unasked (a 421 on an idle connection), and RSET gets a 250 within
        ``smtp_rset_timeout`` - with PIPELINING the RSET is sent first in the next batch
        instead of on its own (``rset_pending``, :meth:`pending_rset_reply`), one round
        trip less. False closes the session; nothing is logged or raised."""
        sock = self.client.sock
        if self.dead or sock is None:
            self.close()
            return False
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if poller.poll(0):  # EOF, an error, or unasked data (421): not usable
            self.close()
            return False
        self.committed = False
        if self.has("pipelining"):  # RSET goes first in the next pipelined batch
            self.rset_pending = True
            return True
        try:
            reply = self.call("RSET", self.params.rset_timeout, "sending RSET", "RSET")
        except SmtpFailure:
            return False
        if reply.code != 250:
            self.close()
            return False
        return True

    def pending_rset_reply(self) -> None:
        """Read the reply to the RSET sent first in a pipelined batch (``rset_pending``).

        Raises:
            SmtpFailure: lost connection, timeout, or not 250: the cached session is dead
            (the caller, which has committed nothing, makes a new connection).
        """
        self.rset_pending = False
        reply = self.reply(self.params.rset_timeout, "sending RSET", "RSET")
        if reply.code != 250:
            self.close()
            raise SmtpFailure("4.4.2", f"host {self.addr.namaddr} refused RSET", site=True)

    def _malformed(self, reply_to: str, text: str) -> SmtpFailure:
        self.close()
        return SmtpFailure("4.5.0", f"host {self.addr.namaddr} sent a malformed reply "
                           f"{text[:200]!r} (in reply to {reply_to} command)", site=True)

    def quit(self, timeout: float | None = None) -> None:
        """Send QUIT (errors ignored) and close; ``timeout`` seconds (default
        ``smtp_quit_timeout``) for the exchange."""
        if self.client.sock is not None and not self.dead:
            try:
                self.call("QUIT", self.params.quit_timeout if timeout is None else timeout,
                          "sending QUIT", "QUIT")
            except SmtpFailure:
                pass
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent); the session is dead from then on."""
        self.dead = True
        self.client.close()


class _LineRecorder:
    """The reply stream smtplib reads (``SMTP.file``), remembering the last line read
    as it came: smtplib's getreply() drops the first 4 bytes of every line, which for a
    malformed reply are text, not a code."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.last = b""

    def readline(self, size: int = -1) -> bytes:
        line: bytes = self._raw.readline(size)
        self.last = line
        return line

    def close(self) -> None:
        self._raw.close()
