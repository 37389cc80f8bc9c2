"""smtpd_session — one SMTP session of smtpd(8): aiosmtpd's protocol engine with Postfix's
commands, replies, limits and log lines.

Summary
    ``SmtpdSession`` subclasses ``aiosmtpd.smtp.SMTP``: aiosmtpd reads command lines,
    handles timeouts and STARTTLS; the commands that carry policy (HELO, EHLO, MAIL, RCPT,
    DATA, RSET, NOOP, VRFY, QUIT, AUTH, STARTTLS) are ours, with Postfix's wording
    (smtpd.c). Every reply other than the greeting, HELO/EHLO and 354 carries an RFC 3463
    enhanced status code (aiosmtpd's own few replies are rewritten to Postfix's).

    * EHLO announces PIPELINING, ``SIZE <message_size_limit>``, VRFY, STARTTLS (when a
      certificate is configured and TLS is not yet on), ENHANCEDSTATUSCODES, 8BITMIME,
      DSN and SMTPUTF8 (``smtputf8_enable``), minus ``smtpd_discard_ehlo_keywords``.
    * MAIL FROM / RCPT TO parameters, DATA framing, the Received: header and the queue
      file's attributes: transports.smtpd_tx. A SIZE over message_size_limit gets
      ``552 5.3.4``, a queue file system short of room ``452 4.3.1 Insufficient system
      storage`` (smtpd_policy.queue_space); recipients are checked by
      smtpd_policy.Policy (relay control); ``smtpd_recipient_limit`` -> ``452 4.5.3``
      (an error only beyond smtpd_recipient_overshoot_limit). The message goes into the
      queue through the host's ``enqueue`` (qmgrd.spool.cleanup: complete and fsynced
      before ``250 2.0.0 Ok: queued as <id>``); a write error -> ``451 4.3.0 Error: queue
      file write error``, never a 5xx; ``hopcount_limit`` or more Received: headers
      (ours included) -> ``554 5.4.0 Error: too many hops``, nothing queued (Postfix
      cleanup's CLEANUP_STAT_HOPS); nothing is queued before the final dot, so a
      client that disconnects mid-DATA leaves nothing behind.
    * SMTP smuggling defence (Postfix >= 3.9): ``smtpd_forbid_bare_newline`` (any case)
      = ``normalize`` (the default; ``yes`` is its compatibility alias): a line ending
      in a bare <LF> is taken as if it ended in <CR><LF>, and only <CR><LF>.<CR><LF>
      ends the data (read_data). ``reject``: the same framing, and a bare <LF> is
      refused with ``<smtpd_forbid_bare_newline_reject_code> 5.5.2 <myhostname> Error:
      bare <LF> received`` (default 550) - DATA content after it was read to its end,
      nothing queued, the session goes on (a 521 code hangs up); a command line is
      refused instead of executed, and the session ends there (Postfix's smtpd reads
      no more commands). Clients in ``smtpd_forbid_bare_newline_exclusions`` (default
      ``$mynetworks``) get ``no``, as Postfix's smtpd gives them (local programs that
      end DATA with <LF>.<LF> keep working; the defence is for the clients outside).
      ``no`` (Postfix < 3.9): a lone dot line ends the data whatever its line ends -
      vulnerable to SMTP smuggling, as Postfix warns.
    * An address with bytes that are not valid UTF-8 (Postfix refuses malformed UTF-8):
      MAIL -> ``553 5.1.7 <a\\xff@b>: malformed UTF-8 in sender address``, RCPT and VRFY
      -> ``553 5.1.3 <...>: malformed UTF-8 in recipient address`` (bad bytes shown as
      ``\\xff``); MAIL and RCPT are logged as ``NOQUEUE: reject:`` lines.
    * Limits (Postfix): every 4xx/5xx reply to a command is an error; at
      ``smtpd_soft_error_limit`` errors every reply waits ``smtpd_error_sleep_time``; at
      ``smtpd_hard_error_limit`` -> ``421 4.7.0 <host> Error: too many errors`` and
      hang-up. NOOP, VRFY, RSET, HELO, EHLO beyond ``smtpd_junk_command_limit`` count as
      errors. A delivered message forgives both. ``smtpd_timeout`` per read ->
      ``421 4.4.2 <host> Error: timeout exceeded``. A header line sent as a command ->
      ``221 2.7.0 Error: I can break rules, too. Goodbye.`` After QUIT or any hang-up,
      commands the client pipelined are not executed (Postfix reads no more): no
      message is queued that the client got no reply for.

Logs (Postfix smtpd's lines, so pflogsumm counts them)
    ``connect from <name>[<addr>]``; ``<qid>: client=<name>[<addr>]`` (when the queue id
    is assigned); ``NOQUEUE: reject: RCPT from <name>[<addr>]: <reply>; from=<s> to=<r>
    proto=ESMTP helo=<h>`` (``NOQUEUE: reject: MAIL from ...; from=<s> proto=...`` for a
    malformed UTF-8 sender); ``warning: Connection concurrency limit exceeded: ...``;
    ``NOQUEUE: reject: <where> from <name>[<addr>]: bare <LF> received; from=<s> to=<r>
    proto=ESMTP helo=<h>`` (smtpd_forbid_bare_newline = reject: <where> END-OF-MESSAGE
    for DATA content, else the previous command or CONNECT, as Postfix's log_whatsup);
    ``warning: TLS library problem: <SSL error>`` and ``SSL_accept error from <name>[<addr>]:
    -1`` (or ``: lost connection``) for a failed STARTTLS handshake;
    ``timeout|lost connection|too many errors after <CMD> from ...`` (``after DATA (<n>
    bytes)``); ``disconnect from <name>[<addr>] ehlo=1 mail=1 rcpt=1 data=1 quit=1
    commands=5`` (``name=ok/total`` when some failed). An exception before the
    greeting: ``warning: <name>[<addr>]: <exception type>: <text>`` and ``NOQUEUE:
    reject: CONNECT from <name>[<addr>]: 421 4.3.0 <myhostname> Server local error``,
    that reply, and the hang-up (the process serves its next client).

Public API
    SmtpdParams.from_config(cfg, service, queue_directory) -> SmtpdParams
    SessionHost (Protocol): params, policy, tls_context, connect(s) -> int,
        disconnect(s), await flow_wait(), enqueue(env, content, namaddr, received) -> str
    SmtpdSession(host)          an asyncio protocol (loop.connect_accepted_socket)
        .abort()                close now (shutdown)
    The transaction's pieces (parameters, DATA reading, Received:) are transports.smtpd_tx.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from aiosmtpd.smtp import SMTP, TLSSetupException, login_always_fail

from master import log
from master.config import Config
from master.config.params import BARE_NEWLINE_MODES
from qmgrd.spool.cleanup import CleanupError
from qmgrd.spool.envelope import SMTPUTF8_FLAG_REQUESTED, Envelope, Recipient, internal_form
from qmgrd.spool.statuslog import quote_822_local
from qmgrd.utf8 import malformed as malformed_utf8
from qmgrd.utf8 import shown
from transports.smtpd_policy import ClientInfo, Policy, queue_space
from transports.smtpd_tx import (
    NO,
    NORMALIZE,
    REJECT,
    BareLF,
    Transaction,
    content_with,
    mail_params,
    message_attrs,
    rcpt_params,
    read_data,
    received_header,
    truncate_headers,
    utf8_error,
)

__all__ = ["SessionHost", "SmtpdParams", "SmtpdSession"]

logging.getLogger("mail.log").setLevel(logging.CRITICAL)  # aiosmtpd's own chatter

WHERE_CONNECT = "CONNECT"
WHERE_DATA = "DATA content"
WHERE_EOM = "END-OF-MESSAGE"
_CMD_ORDER = ("helo", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "bdat", "rset",
              "noop", "vrfy", "etrn", "quit", "unknown")
_JUNK = frozenset({"HELO", "EHLO", "RSET", "NOOP", "VRFY"})
# Bytes asked of one read from the client. asyncio's socket transport asks for 256 KiB
# (its max_size): a buffer that size is above glibc's mmap threshold, so every read - a
# command line of 30 bytes - cost an mmap, mremap and munmap and a page fault: 18 us a
# read against 3 us at 64 KiB (measured on a socketpair), four reads a message. 64 KiB
# stays below the threshold and still takes a whole DATA burst of the socket buffer.
READ_SIZE = 65536
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+:\Z")
_NEUTER = str.maketrans({c: "?" for c in ' <>()\\";@'})
_SIMPLE_PATH = re.compile(r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+)>(.*)\Z")
_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")
_AIOSMTPD_REPLIES = {
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "500 Command line too long": "500 5.5.2 Error: command line too long",
    "500 Error: strict ASCII mode": "500 5.5.2 Error: bad syntax",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "554 Command refused due to lack of security": "554 5.7.0 Error: TLS handshake failed",
    "454 TLS not available": "454 4.7.0 TLS not available due to local problem",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
}
_DEFAULT_DSN = {"2": "2.0.0", "4": "4.0.0", "5": "5.5.2", "500": "5.5.2", "501": "5.5.4",
                "502": "5.5.1", "503": "5.5.1", "530": "5.7.0", "554": "5.7.0"}
_MAX_ERROR_SLEEP = 10.0


def _logged(address: str) -> str:
    """An envelope address as a log line shows it: Postfix >= 3.5's external form
    (info_log_address_format = external: a local part that is no dot-atom quoted,
    ``"a b"@example.org``), undecodable bytes escaped."""
    return shown(quote_822_local(address))


def _unquoted_space(path: str) -> bool:
    """True when ``path`` (the text between ``<`` and ``>``) has white space outside a
    quoted string (a backslash escapes the next character inside one)."""
    quoted = escaped = False
    for c in path:
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted and c.isspace():
            return True
    return False


@dataclass(frozen=True)
class SmtpdParams:
    """The parameters one smtpd process reads once (main.cf names)."""

    service: str
    queue_directory: str
    myhostname: str
    mail_name: str
    banner: str
    timeout: float
    recipient_limit: int
    overshoot_limit: int
    soft_error_limit: int
    hard_error_limit: int
    junk_limit: int
    error_sleep: float
    conn_limit: int
    helo_required: bool
    message_size_limit: int
    line_length_limit: int
    header_size_limit: int
    queue_minfree: int
    smtputf8: bool
    disable_vrfy: bool
    discard_ehlo: frozenset[str] = field(default_factory=frozenset)
    forbidden: frozenset[str] = frozenset({"CONNECT", "GET", "POST"})
    bare_newline: str = NORMALIZE  # smtpd_forbid_bare_newline: normalize, reject or no
    bare_newline_code: int = 550  # smtpd_forbid_bare_newline_reject_code (500-599)
    allow_min_user: bool = False  # allow_min_user: an address may start with "-"

    @classmethod
    def from_config(cls, cfg: Config, service: str, queue_directory: str) -> SmtpdParams:
        """Read the parameters; raises ConfigError for a bad value."""
        bare = cfg.get("smtpd_forbid_bare_newline").strip()
        if bare.lower() not in BARE_NEWLINE_MODES:  # Config.check refuses it first
            raise cfg.error("smtpd_forbid_bare_newline", "bad parameter value: "
                            f"'smtpd_forbid_bare_newline = {bare}'")
        return cls(
            service=service, queue_directory=queue_directory,
            myhostname=cfg.get("myhostname"), mail_name=cfg.get("mail_name") or "qmgrd",
            banner=cfg.get("smtpd_banner"), timeout=float(cfg.get_time("smtpd_timeout")),
            recipient_limit=cfg.get_int("smtpd_recipient_limit"),
            overshoot_limit=cfg.get_int("smtpd_recipient_overshoot_limit"),
            soft_error_limit=cfg.get_int("smtpd_soft_error_limit"),
            hard_error_limit=cfg.get_int("smtpd_hard_error_limit"),
            junk_limit=cfg.get_int("smtpd_junk_command_limit"),
            error_sleep=min(float(cfg.get_time("smtpd_error_sleep_time")), _MAX_ERROR_SLEEP),
            conn_limit=cfg.get_int("smtpd_client_connection_count_limit"),
            helo_required=cfg.get_bool("smtpd_helo_required"),
            message_size_limit=cfg.get_size("message_size_limit"),
            line_length_limit=max(cfg.get_size("line_length_limit"), 1000),
            header_size_limit=cfg.get_size("header_size_limit"),
            queue_minfree=cfg.get_size("queue_minfree"),
            smtputf8=cfg.get_bool("smtputf8_enable"),
            disable_vrfy=cfg.get_bool("disable_vrfy_command"),
            discard_ehlo=frozenset(k.lower() for k in cfg.get_list("smtpd_discard_ehlo_keywords")),
            forbidden=frozenset(c.upper() for c in cfg.get_list("smtpd_forbidden_commands")),
            bare_newline=BARE_NEWLINE_MODES[bare.lower()],
            bare_newline_code=cfg.get_int("smtpd_forbid_bare_newline_reject_code"),
            allow_min_user=cfg.get_bool("allow_min_user"),
        )


class SessionHost(Protocol):
    """What a session needs from the process that serves it (transports.smtpd)."""

    params: SmtpdParams
    policy: Policy
    tls_context: ssl.SSLContext | None
    tls_required: bool

    def connect(self, session: SmtpdSession) -> int:
        """Register a new session; returns how many sessions its client address has."""
        ...

    def disconnect(self, session: SmtpdSession) -> None:
        """The session has ended."""
        ...

    async def flow_wait(self) -> None:
        """Wait for inbound flow control before a message is queued (may return at
        once)."""
        ...

    def enqueue(self, env: Envelope, content: bytes, namaddr: str,
                received: Callable[[str], list[bytes]]) -> str:
        """Queue the message (complete and fsynced on return); returns the queue id.
        ``received(qid)`` gives our Received: header lines. Raises CleanupError."""
        ...


class _Commands(dict[str, Callable[[str | None], Awaitable[None]]]):
    """aiosmtpd's command table: unknown names get our 502 handler, not aiosmtpd's."""

    def __init__(self, unknown: Callable[[str], Callable[[str | None], Awaitable[None]]]):
        super().__init__()
        self._unknown = unknown

    def get(self, key: str, default: Any = None) -> Any:
        found = super().get(key)
        return found if found is not None else self._unknown(key)


class _NoHooks:
    """aiosmtpd's event handler: none of its hooks are used."""


class _CheckedReader(asyncio.StreamReader):
    """The session's StreamReader when smtpd_forbid_bare_newline = reject: each line
    that readuntil returns (aiosmtpd's command lines, read_data's lines) goes to
    ``check(line, by_line)`` first (by_line: read up to an LF), which may answer and hang
    up before aiosmtpd acts on the line. The other modes keep asyncio's own reader (no
    extra call per line)."""

    def __init__(self, check: Callable[[bytes, bool], None], limit: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self._check = check
        self._cr_read = False  # the last read() ended in CR

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self._cr_read = data.endswith(b"\r")
        return data

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        line = await super().readuntil(separator)
        # a line over the limit is read with read(consumed) up to its LF, CR included,
        # and its LF alone then: that LF ends a CRLF, not a bare LF
        split_crlf = self._cr_read and line == b"\n"
        self._cr_read = False
        if not split_crlf:
            self._check(line, separator == b"\n")
        return line



def _no_progress(nbytes: int) -> None:
    """read_data's progress callback: data_received counts the bytes and rearms the
    timeout instead."""

class SmtpdSession(SMTP):
    """One client connection (module docstring)."""

    def __init__(self, host: SessionHost) -> None:
        p = host.params
        self.host = host
        self.params = p
        # aiosmtpd reads these from the instance while it sets up its StreamReader.
        self.line_length_limit = p.line_length_limit
        self.command_size_limit = p.line_length_limit
        self.command_size_limits = collections.defaultdict(lambda: p.line_length_limit)
        tls = host.tls_context
        self._init_protocol(tls, bool(tls and host.tls_required))
        self.client = ClientInfo("unknown", "unknown")
        self.helo: str | None = None
        self.protocol = "SMTP"
        self.tls_on = False
        self.tx: Transaction | None = None
        self.where = WHERE_CONNECT
        self.reason: str | None = None
        self.stats: dict[str, list[int]] = {}
        self.error_count = 0
        self.junk = 0
        self.data_bytes = 0  # bytes received since DATA's 354 (the lost-connection log)
        self._rearm_at = 0.0  # in DATA: when smtpd_timeout is rearmed next (data_received)
        self._rearm_every = min(1.0, host.params.timeout / 10)  # seconds
        self._in_cmd = False
        self._cmd_name = ""  # the command in progress (its stats entry)
        self._cmd_error = False
        self._greeted = False
        self._setup_error: Exception | None = None  # raised by host.connect
        self._registered = False
        self._count = 0
        self._ended = False
        self.bare_newline = p.bare_newline  # this client's mode (connection_made)
        table = _Commands(self._unknown)
        names = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "QUIT", "AUTH",
                 "STARTTLS"]
        for name in names:
            table[name] = self._wrap(name, getattr(self, f"cmd_{name.lower()}"))
        self._smtp_methods = table

    def _init_protocol(self, tls: ssl.SSLContext | None, tls_required: bool) -> None:
        """What SMTP.__init__ sets up, without its introspection of the class on every
        connection (inspect.getmembers and dir: about 0.17 ms of CPU per connection, a
        tenth of a message). tests/test_issue6_units checks that every attribute
        SMTP.__init__ sets is set here too."""
        p = self.params
        loop = asyncio.get_running_loop()
        reader = (_CheckedReader(self._check_line, p.line_length_limit, loop)
                  if p.bare_newline == REJECT
                  else asyncio.StreamReader(loop=loop, limit=p.line_length_limit))
        asyncio.StreamReaderProtocol.__init__(
            self, reader, client_connected_cb=self._cb_client_connected, loop=loop)
        self.__ident__ = ""
        self.loop = loop
        self.event_handler = _NoHooks()
        self.data_size_limit = None
        self.enable_SMTPUTF8 = True  # arguments decoded as UTF-8 (surrogateescape)
        self._decode_data = False
        self.hostname = p.myhostname
        self.tls_context = tls
        self.require_starttls = tls_required
        self._timeout_duration = p.timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = {}
        self._handle_hooks = {}
        self._ehlo_hook_ver = None
        self._enforce_call_limit = False

    # ------------------------------------------------------------------ life cycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls_restart = self._original_transport is not None
        super().connection_made(transport)
        if tls_restart:
            self.tls_on = True
            self.helo, self.tx, self.protocol = None, None, "SMTP"
            obj = transport.get_extra_info("ssl_object")
            cipher = obj.cipher() if obj is not None else None
            if cipher:
                log.info(f"Anonymous TLS connection established from {self.client.namaddr}: "
                         f"{cipher[1]} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)")
            return
        if hasattr(transport, "max_size"):  # asyncio's selector socket transport
            transport.max_size = READ_SIZE
        peer = transport.get_extra_info("peername") or ("unknown", "unknown")
        self.client = ClientInfo(str(peer[0]), str(peer[1]))
        if self.bare_newline != NO and self.host.policy.bare_newline_exempt(peer[0]):
            self.bare_newline = NO  # smtpd_forbid_bare_newline_exclusions, as Postfix
        self._registered = True
        try:
            self._count = self.host.connect(self)
        except Exception as exc:  # noqa: BLE001 - answered by _handle_client (421)
            self._setup_error = exc

    def data_received(self, data: bytes) -> None:
        """Each read from the client. During DATA: count the bytes and rearm
        smtpd_timeout (Postfix's timeout is per read), at most every
        min(1 s, smtpd_timeout/10) - also while a long line is still coming."""
        if self.where == WHERE_DATA:
            self.data_bytes += len(data)
            now = self.loop.time()
            if now >= self._rearm_at:
                self._reset_timeout()
                self._rearm_at = now + self._rearm_every
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self._ended:
            return
        self._ended = True
        if self._in_cmd:
            # the connection was reset before the command ended (no EOF first, so the
            # command is not cancelled yet): it failed, as in Postfix's disconnect line
            self._in_cmd = False
            self._bump(self._cmd_name, False)
        if self.reason is None:
            self.reason = "lost connection"
        if self.reason and self.where:
            if self.where == WHERE_DATA:
                log.info(f"{self.reason} after DATA ({self.data_bytes} bytes) from "
                         f"{self.client.namaddr}")
            elif self.where != WHERE_EOM or self.reason != "lost connection":
                log.info(f"{self.reason} after {self.where} from {self.client.namaddr}")
        log.info(f"disconnect from {self.client.namaddr}{self._stats_text()}")
        if self._registered:
            self.host.disconnect(self)

    # ------------------------------------------------------------------ bare <LF>
    def _bare_lf_reply(self) -> str:
        """Postfix's reply to a bare <LF> (smtpd_forbid_bare_newline = reject)."""
        p = self.params
        return f"{p.bare_newline_code} 5.5.2 {p.myhostname} Error: bare <LF> received"

    def _log_bare_lf(self, tx: Transaction | None) -> None:
        """Postfix's log_whatsup line: ``NOQUEUE: reject: <where> from <client>: bare
        <LF> received; from=<s> to=<last rcpt> proto=<p> helo=<h>`` (from/to only in a
        transaction, helo only after HELO/EHLO)."""
        extra = ""
        if tx is not None:
            extra += f" from=<{_logged(tx.sender)}>"
            if tx.rcpts:
                extra += f" to=<{_logged(tx.rcpts[-1].address)}>"
        extra += f" proto={self.protocol}"
        if self.helo:
            extra += f" helo=<{self.helo}>"
        log.info(f"NOQUEUE: reject: {self.where} from {self.client.namaddr}: bare <LF> "
                 f"received;{extra}")

    def _check_line(self, line: bytes, by_line: bool) -> None:
        """_CheckedReader's check of each line: a command line that ends in a bare <LF>
        from a client not excluded is rejected, not executed - logged, answered with
        smtpd_forbid_bare_newline_reject_code, and the session ends there, as Postfix's
        smtpd >= 3.9 does (it reads no more commands: what the client pipelined after
        it is not executed either). Lines of DATA content are read_data's."""
        if (self.bare_newline != REJECT or self.where == WHERE_DATA or not by_line
                or line[-2:] == b"\r\n" or self._closing()):
            return
        self._log_bare_lf(self.tx)
        if self._writer is not None:
            self._writer.write(f"{self._bare_lf_reply()}\r\n".encode())
        self._hangup("")

    def _stats_text(self) -> str:
        parts = []
        ok_all = total_all = 0
        for name in _CMD_ORDER:
            if name not in self.stats:
                continue
            ok, total = self.stats[name]
            ok_all += ok
            total_all += total
            parts.append(f" {name}={ok}" if ok == total else f" {name}={ok}/{total}")
        parts.append(f" commands={ok_all}" if ok_all == total_all and total_all
                     else f" commands={ok_all}/{total_all}")
        return "".join(parts)

    def abort(self) -> None:
        """Close the connection now (process shutdown); nothing unfinished is queued."""
        if self.reason is None:
            self.reason = ""
        transport = self._write_transport()
        if transport is not None:
            transport.abort()

    def _write_transport(self) -> asyncio.WriteTransport | None:
        """The connection's transport, None before connection_made. Not an isinstance
        test: uvloop's transports (async_event_loop = uvloop) implement asyncio's
        transport methods without deriving from asyncio.WriteTransport."""
        return cast("asyncio.WriteTransport | None", self.transport)

    def _hangup(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        if self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        self.reason = "timeout"
        transport = self._write_transport()
        if transport is not None and not transport.is_closing():
            transport.write(f"421 4.4.2 {self.params.myhostname} Error: timeout exceeded\r\n"
                            .encode())
            transport.close()

    async def _handle_client(self) -> None:
        """The session: aiosmtpd's, after the client's name, the ``connect from`` line
        and the connection count limit. An exception before the greeting (aiosmtpd
        answers the ones in commands: handle_exception) ends the session at once
        (_local_error), instead of a client left without a word until smtpd_timeout
        and a process whose session slot stays taken that long."""
        try:
            await self._connect_and_serve()
        except Exception as exc:
            if self._greeted:
                raise
            self._local_error(exc)

    def _local_error(self, exc: Exception) -> None:
        """Postfix smtpd's answer to a local (internal) error: ``421 4.3.0 <myhostname>
        Server local error``, logged as a ``NOQUEUE: reject: CONNECT from ...`` line
        after a warning that names the exception, then the hang-up (the ``disconnect
        from`` line and the host's disconnect follow from connection_lost); the process
        goes on with its other sessions and the next client."""
        self._greeted = True
        reply = f"421 4.3.0 {self.params.myhostname} Server local error"
        log.warning(f"{self.client.namaddr}: {type(exc).__name__}: {exc}")
        log.info(f"NOQUEUE: reject: {self.where} from {self.client.namaddr}: {reply}")
        transport = self._write_transport()
        if transport is not None and not transport.is_closing():
            transport.write(f"{reply}\r\n".encode())
        self._hangup("")

    async def _connect_and_serve(self) -> None:
        p = self.params
        if self._setup_error is not None:
            raise self._setup_error
        self.client.name = await self.host.policy.lookup_name(self.client.addr)
        log.info(f"connect from {self.client.namaddr}")
        if (p.conn_limit and self._count > p.conn_limit
                and not self.host.policy.limit_exempt(self.client.addr)):
            log.warning(f"Connection concurrency limit exceeded: {self._count} from "
                        f"{self.client.namaddr} for service {p.service}")
            self._greeted = True
            await self._say(f"421 4.7.0 {p.myhostname} Error: too many connections from "
                            f"{self.client.addr}", count=False)
            self._hangup("")
            return
        await super()._handle_client()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # aiosmtpd hangs up after it
            self._log_tls_failure(error.__cause__)
            return "454 4.7.0 TLS not available due to local problem"
        log.warning(f"{self.client.namaddr}: {type(error).__name__}: {error}")
        return "451 4.3.0 Error: internal error"

    def _log_tls_failure(self, cause: BaseException | None) -> None:
        """A failed STARTTLS handshake, in Postfix's words (tls_server.c): ``warning: TLS
        library problem: <the SSL error>`` and ``SSL_accept error from <client>: -1``, or
        ``SSL_accept error from <client>: lost connection`` when the client went away
        (aiosmtpd's TLSSetupException has no text of its own: the line was a bare
        ``warning: <client>: TLSSetupException: ``)."""
        if isinstance(cause, ssl.SSLError) and not isinstance(
                cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            log.warning(f"TLS library problem: {cause}")
            log.info(f"SSL_accept error from {self.client.namaddr}: -1")
        else:
            log.info(f"SSL_accept error from {self.client.namaddr}: lost connection")

    # ------------------------------------------------------------------ replies
    async def push(self, status: Any) -> None:
        """aiosmtpd's replies: the greeting becomes ``220 <smtpd_banner>``; the rest get
        Postfix's wording or at least an enhanced status code."""
        text = status if isinstance(status, str) else bytes(status).decode("utf-8", "replace")
        if not self._greeted:
            self._greeted = True
            await self._say(f"220 {self.params.banner}", count=False)
            return
        text = _AIOSMTPD_REPLIES.get(text, text)
        if text[:1] in "245" and not _ENHANCED.match(text) and text[:3] != "220":
            dsn = _DEFAULT_DSN.get(text[:3], _DEFAULT_DSN.get(text[:1], "5.5.2"))
            text = f"{text[:3]} {dsn} {text[4:]}"
        await self._say(text)

    async def _say(self, *lines: str, count: bool = True) -> None:
        """Write reply lines (one reply) and count a 4xx/5xx as an error. A control
        character in a line (one the client sent, echoed in a 555 or 501) goes out as
        ``?``, as master.log writes it: no NUL, ESC or bare CR reaches the client."""
        p = self.params
        if self._writer is None or self.transport is None or self.transport.is_closing():
            return
        if self.error_count >= p.soft_error_limit and p.error_sleep > 0:
            await asyncio.sleep(p.error_sleep)
        self._writer.write(b"".join(
            log.printable(x).encode("utf-8", "surrogateescape") + b"\r\n" for x in lines))
        if lines[-1][:1] in "45" and count:
            if self._in_cmd:
                self._cmd_error = True
            else:
                self.error_count += 1
                self._bump("unknown", False)
        await self._writer.drain()
        if not self._in_cmd and self.error_count >= p.hard_error_limit:
            await self._too_many_errors()

    async def _too_many_errors(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.reason = "too many errors"
        self._writer.write(f"421 4.7.0 {self.params.myhostname} Error: too many errors\r\n"
                           .encode())
        self._hangup("too many errors")

    def _bump(self, name: str, ok: bool) -> None:
        entry = self.stats.setdefault(name, [0, 0])
        entry[0] += ok
        entry[1] += 1

    # ------------------------------------------------------------------ dispatch
    def _wrap(self, name: str, method: Callable[[str | None], Awaitable[None]]
              ) -> Callable[[str | None], Awaitable[None]]:
        lname = name.lower()

        async def run(arg: str | None) -> None:
            if self._closing():
                return
            p = self.params
            self.where = name
            self._in_cmd, self._cmd_error, self._cmd_name = True, False, lname
            done = False  # a command cut off (the client gone mid-DATA) failed: data=0/1
            try:
                await method(arg)
                done = True
            finally:
                if self._in_cmd:  # else connection_lost has counted it (failed)
                    self._bump(lname, done and not self._cmd_error)
                self._in_cmd = False
                if self._cmd_error:
                    self.error_count += 1
                if name in _JUNK:
                    if self.junk > p.junk_limit:
                        self.error_count += 1
                    self.junk += 1
            if self.error_count >= p.hard_error_limit and name != "QUIT":
                await self._too_many_errors()

        return run

    def _closing(self) -> bool:
        """The session is ending (QUIT, a 421 hang-up, a timeout): what the client
        pipelined after that is not executed, as Postfix's smtpd reads no command after
        QUIT or a hang-up (aiosmtpd's loop still parses the lines it has buffered until
        the connection is gone)."""
        return self.transport is None or self.transport.is_closing()

    def _unknown(self, name: str) -> Callable[[str | None], Awaitable[None]]:
        async def run(arg: str | None) -> None:
            if self._closing():
                return
            self.where = "UNKNOWN"
            # a mail header or a forbidden command (smtpd_forbidden_commands: HTTP
            # CONNECT/GET/POST) ends the session at once, as Postfix's smtpd does
            if _HEADER_NAME.match(name) or name.upper() in self.params.forbidden:
                line = f"{name} {arg}" if arg else name
                log.warning(f"non-SMTP command from {self.client.namaddr}: {line[:100]}")
                self._bump("unknown", False)
                await self._say("221 2.7.0 Error: I can break rules, too. Goodbye.",
                                count=False)
                self._hangup("")
                return
            if not name.strip():  # a line of white space: Postfix finds no command word
                await self._say("500 5.5.2 Error: bad syntax")
                return
            await self._say("502 5.5.2 Error: command not recognized")
        return run

    # ------------------------------------------------------------------ HELO / EHLO
    def _set_helo(self, arg: str, protocol: str) -> None:
        name = " ".join(arg.split())
        self.helo = "".join(c if " " < c < "\x7f" else "?" for c in name).translate(_NEUTER)
        self.tx = None
        if self.session is not None:
            self.session.host_name = self.helo
            self.session.extended_smtp = protocol == "ESMTP"
        self.protocol = protocol

    async def cmd_helo(self, arg: str | None) -> None:
        if not arg:
            await self._say("501 Syntax: HELO hostname")
            return
        self._set_helo(arg, "SMTP")
        await self._say(f"250 {self.params.myhostname}")

    async def cmd_ehlo(self, arg: str | None) -> None:
        if not arg:
            await self._say("501 Syntax: EHLO hostname")
            return
        self._set_helo(arg, "ESMTP")
        p = self.params
        words = [p.myhostname, "PIPELINING",
                 f"SIZE {p.message_size_limit}" if p.message_size_limit else "SIZE"]
        if not p.disable_vrfy:
            words.append("VRFY")
        if self.host.tls_context is not None and not self.tls_on:
            words.append("STARTTLS")
        words += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN"]
        if p.smtputf8:
            words.append("SMTPUTF8")
        words = [words[0]] + [w for w in words[1:] if w.split()[0].lower() not in p.discard_ehlo]
        await self._say(*[f"250{'-' if i < len(words) - 1 else ' '}{w}"
                          for i, w in enumerate(words)])

    async def cmd_starttls(self, arg: str | None) -> None:
        # Postfix's starttls_cmd, in its order: syntax, TLS already on, TLS not offered
        if arg:
            await self._say("501 5.5.4 Syntax: STARTTLS")
        elif self.tls_on:
            await self._say("554 5.5.1 Error: TLS already active")
        elif self.tls_context is None or "starttls" in self.params.discard_ehlo:
            await self._say("502 5.5.1 Error: command not implemented")
        else:
            await super().smtp_STARTTLS(arg or "")

    async def cmd_auth(self, arg: str | None) -> None:
        await self._say("503 5.5.1 Error: authentication not enabled")

    # ------------------------------------------------------------------ small commands
    async def cmd_rset(self, arg: str | None) -> None:
        if arg:
            await self._say("501 5.5.4 Syntax: RSET")
            return
        self.tx = None
        await self._say("250 2.0.0 Ok")

    async def cmd_noop(self, arg: str | None) -> None:
        await self._say("250 2.0.0 Ok")

    async def cmd_quit(self, arg: str | None) -> None:
        await self._say("221 2.0.0 Bye")
        self._hangup("")

    async def cmd_vrfy(self, arg: str | None) -> None:
        if self.params.disable_vrfy:
            await self._say("502 5.5.1 VRFY command is disabled")
            return
        if not arg:
            await self._say("501 5.5.4 Syntax: VRFY address")
            return
        addr = self._address(arg, "VRFY")[0]
        if not addr:
            await self._say("501 5.1.3 Bad recipient address syntax")
            return
        if malformed_utf8(addr):
            await self._say(f"553 5.1.3 <{shown(addr)}>: malformed UTF-8 in recipient "
                            f"address")
            return
        err = await self.host.policy.check_rcpt(self.client, self.helo or "", "", addr)
        await self._say(err or f"252 2.0.0 {arg}")

    # ------------------------------------------------------------------ MAIL / RCPT
    async def _reject(self, command: str, reply: str, envelope: str) -> None:
        """Log Postfix's ``NOQUEUE: reject: <command> from <client>: <reply>; <envelope>
        proto=<p> helo=<h>`` line and send ``reply``."""
        helo = f" helo=<{self.helo}>" if self.helo else ""
        log.info(f"NOQUEUE: reject: {command} from {self.client.namaddr}: {reply}; "
                 f"{envelope} proto={self.protocol}{helo}")
        await self._say(reply)

    def _address(self, text: str, command: str = "") -> tuple[str | None, list[str]]:
        """``<addr> params`` -> (internal-form address or None when malformed, params).

        Malformed, as Postfix's smtpd extract_addr(): besides what email's parser
        refuses, white space outside a quoted string inside the ``<>`` (email's parser
        would quote ``<we ird@x>`` into ``"we ird"@x``) and - unless ``allow_min_user``
        - an address that starts with ``-`` (a command that gets it in its argv, e.g.
        through pipe(8)'s ${sender}, would take it for an option). Those two are logged
        as Postfix logs them: ``warning: Illegal address syntax from <client> in
        <command> command: <text>``."""
        text = text.strip()
        if text.startswith("<>"):
            return "", text[2:].split()
        simple = _SIMPLE_PATH.match(text)
        if simple is not None:  # the common case, without email's full parser
            addr = simple.group(1)
            if addr[0] == "-" and not self.params.allow_min_user:
                return self._illegal(command, text)
            return addr, simple.group(2).split()
        if text.startswith("<") and ">" not in text:  # email's parser would add the ">"
            return None, []
        if text.startswith("<") and _unquoted_space(text[1:text.index(">")]):
            return self._illegal(command, text)
        addr, rest = self._getaddr(text)
        if addr is None or rest is None:
            return None, []
        addr = internal_form(addr)
        if any(c in addr for c in "\r\n\0<>") or addr.startswith("\""):
            return None, []
        if addr.startswith("-") and not self.params.allow_min_user:
            return self._illegal(command, text)
        return addr, rest.split()

    def _illegal(self, command: str, text: str) -> tuple[None, list[str]]:
        if command:
            log.warning(f"Illegal address syntax from {self.client.namaddr} in {command} "
                        f"command: {shown(text[:200])}")
        return None, []

    async def cmd_mail(self, arg: str | None) -> None:
        p = self.params
        if p.helo_required and self.helo is None:
            await self._say("503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.tx is not None:
            await self._say("503 5.5.1 Error: nested MAIL command")
            return
        if not arg or arg[:5].upper() != "FROM:":
            await self._say("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        sender, params = self._address(arg[5:], "MAIL")
        if sender is None:
            await self._say("501 5.1.7 Bad sender address syntax")
            return
        if malformed_utf8(sender):
            await self._reject(
                "MAIL", f"553 5.1.7 <{shown(sender)}>: malformed UTF-8 in sender address",
                f"from=<{_logged(sender)}>")
            return
        tx = Transaction(sender, time.time())
        err = (mail_params(tx, params, p.smtputf8, "dsn" in p.discard_ehlo)
               or utf8_error(sender, tx.smtputf8))
        if err is None and p.message_size_limit and tx.size > p.message_size_limit:
            err = "552 5.3.4 Message size exceeds fixed limit"
        if err is None and not queue_space(p.queue_directory, p.queue_minfree,
                                           p.message_size_limit, tx.size):
            # Postfix smtpd_check_size: smtpd_check_reject's NOQUEUE line (pflogsumm
            # counts it), then the warning
            await self._reject("MAIL", "452 4.3.1 Insufficient system storage",
                               f"from=<{_logged(sender)}>")
            log.warning(f"not enough free space in mail queue: {p.queue_directory}")
            return
        if err is not None:
            await self._say(err)
            return
        self.tx = tx
        await self._say("250 2.1.0 Ok")

    async def cmd_rcpt(self, arg: str | None) -> None:
        p = self.params
        tx = self.tx
        if tx is None:
            await self._say("503 5.5.1 Error: need MAIL command")
            return
        if not arg or arg[:3].upper() != "TO:":
            await self._say("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        rcpt, params = self._address(arg[3:], "RCPT")
        if not rcpt:
            await self._say("501 5.1.3 Bad recipient address syntax")
            return
        if malformed_utf8(rcpt):
            await self._reject(
                "RCPT", f"553 5.1.3 <{shown(rcpt)}>: malformed UTF-8 in recipient address",
                f"from=<{_logged(tx.sender)}> to=<{_logged(rcpt)}>")
            return
        parsed = rcpt_params(params, "dsn" in p.discard_ehlo)
        err = parsed if isinstance(parsed, str) else utf8_error(rcpt, tx.smtputf8)
        if err is not None or isinstance(parsed, str):
            await self._say(err or "451 4.3.0 Error: internal error")
            return
        if p.recipient_limit and len(tx.rcpts) >= p.recipient_limit:
            tx.overshoot += 1
            await self._say("452 4.5.3 Error: too many recipients",
                            count=tx.overshoot > p.overshoot_limit)
            return
        err = await self.host.policy.check_rcpt(self.client, self.helo or "", tx.sender, rcpt)
        if err:
            await self._reject("RCPT", err,
                               f"from=<{_logged(tx.sender)}> to=<{_logged(rcpt)}>")
            return
        notify, orcpt = parsed
        tx.rcpts.append(Recipient(rcpt, dsn_orcpt=orcpt or f"rfc822;{rcpt}", notify=notify))
        await self._say("250 2.1.5 Ok")

    # ------------------------------------------------------------------ DATA
    async def cmd_data(self, arg: str | None) -> None:
        tx = self.tx
        if tx is None or not tx.rcpts:
            await self._say("503 5.5.1 Error: need RCPT command" if tx is None
                            else "554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self._say("501 5.5.4 Syntax: DATA")
            return
        await self._say("354 End data with <CR><LF>.<CR><LF>")
        self.where = WHERE_DATA
        # data_received counts what comes from now on (and rearms smtpd_timeout); the
        # content the client pipelined with DATA is already in the reader's buffer
        self.data_bytes = len(getattr(self._reader, "_buffer", b""))
        self._rearm_at = self.loop.time() + self._rearm_every
        data = await read_data(self._reader, self.params.message_size_limit, _no_progress,
                               self.bare_newline)
        self.where = WHERE_EOM
        self.tx = None
        if isinstance(data, BareLF):  # Postfix: the content is read to its end, not queued
            self._log_bare_lf(tx)
            await self._say(self._bare_lf_reply())
            if self.params.bare_newline_code == 521:  # Postfix hangs up after a 521
                self._hangup("")
            return
        if data is None:
            log.warning(f"NOQUEUE: queue file size limit exceeded from {self.client.namaddr}")
            await self._say("552 5.3.4 Error: message file too big")
            return
        await self._queue(tx, data)

    async def _queue(self, tx: Transaction, data: bytes) -> None:
        p, client = self.params, self.client
        data, cut = truncate_headers(data, p.header_size_limit)
        protocol = self.protocol + ("S" if self.tls_on and self.protocol == "ESMTP" else "")
        received = received_header(p.myhostname, p.mail_name, client, self.helo,
                                   ("UTF8" if tx.smtputf8 else "") + protocol, tx)
        env = Envelope(tx.sender, tx.rcpts, arrival=(int(tx.arrival), int(tx.arrival % 1 * 1e6)),
                       ret=tx.ret, envid=tx.envid,
                       attrs=message_attrs(client, self.helo or "", self.protocol, tx),
                       smtputf8=SMTPUTF8_FLAG_REQUESTED if tx.smtputf8 else 0)
        await self.host.flow_wait()
        try:
            qid = self.host.enqueue(env, content_with(received("?"), data), client.namaddr,
                                    received)
        except CleanupError as exc:
            if exc.status != "5.4.0":  # too many hops: cleanup logged the rejection
                log.warning(f"{client.namaddr}: queue file write error: {exc.status} "
                            f"{exc.text}")
            if exc.status == "5.3.4":
                await self._say("552 5.3.4 Error: message file too big")
            elif exc.status.startswith("5"):
                await self._say(f"554 {exc.status} Error: {exc.text}")
            else:
                await self._say("451 4.3.0 Error: queue file write error")
            return
        except OSError as exc:
            log.warning(f"{client.namaddr}: queue file write error: {exc}")
            await self._say("451 4.3.0 Error: queue file write error")
            return
        if cut:
            log.info(f"{qid}: {cut} header(s) longer than header_size_limit "
                     f"({p.header_size_limit}) truncated")
        self.error_count = 0
        self.junk = 0
        await self._say(f"250 2.0.0 Ok: queued as {qid}")
