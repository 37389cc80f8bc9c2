"""smtpd_tx — one SMTP mail transaction of smtpd(8): parameters, message data, the
Received: header and the queue-file attributes (helpers of transports.smtpd_session).

Summary
    * ``mail_params`` / ``rcpt_params``: the ESMTP parameters of MAIL FROM (BODY=7BIT|
      8BITMIME, SIZE, RET=FULL|HDRS, ENVID as RFC 3461 xtext, SMTPUTF8) and RCPT TO
      (NOTIFY, ORCPT ``type;xtext``), with Postfix's replies for bad values (``501 5.5.4
      Bad RET parameter syntax`` ...; ``555 5.5.4 Unsupported option: X`` for anything
      else; ``501 5.7.1 DSN support is disabled`` when ``dsn`` is in
      smtpd_discard_ehlo_keywords). DSN values are stored as qmgr-sendmail's -N/-R/-V store
      them (qmgrd.spool.envelope masks; ENVID and ORCPT decoded).
    * ``read_data``: the DATA content up to the end of data, as smtpd_forbid_bare_newline
      says (``mode``, Postfix >= 3.9). Lines are read with the stream's limit
      (line_length_limit) per read; longer lines arrive in pieces and are kept whole. A
      dot at the start of any line (after CRLF or a bare LF) is removed. A line ending
      in a bare LF is taken as if it ended in CRLF (size and content: the queue file
      keeps lines, not line ends).
        - ``normalize`` (the default; also "yes"): only CRLF.CRLF ends the data - a
          lone dot on a line that ends in a bare LF, or that follows one, is data (the
          dot removed): no SMTP smuggling.
        - ``reject``: the same framing; when any line ended in a bare LF, the content
          is read to its end and dropped, and BARE_LF is returned (the caller rejects
          it: ``550 5.5.2 <myhostname> Error: bare <LF> received``).
        - ``no`` (Postfix < 3.9): a lone dot line ends the data whatever its line ends
          or the previous line's (<LF>.<LF>, <CR><LF>.<LF>, <LF>.<CR><LF>): what the
          client sends after it is read as commands. This is what makes SMTP smuggling
          possible (a message that an upstream server took as one can be two here).
      Over ``message_size_limit`` (each line counted with CRLF, as Postfix) the rest is
      read and dropped and None is returned.
    * ``truncate_headers``: a header longer than ``header_size_limit`` is cut (Postfix
      cleanup discards the excess).
    * ``received_header``: Postfix smtpd's Received: header, three lines
      (``from HELO (NAME [ADDR])``, ``by HOST (MAIL_NAME) with PROTO id QID``, ``for
      <RCPT>; DATE`` when there is one recipient, else ``;`` and the date alone).
    * ``content_with``: Received: lines + data, with Postfix's two kludges: content that
      starts with white space gets an empty line first (it is body, not part of our
      header); a ``From `` line first becomes ``X-Mailbox-Line: From ...``.
    * ``message_attrs``: the client attributes Postfix stores (log_client_name ...,
      rewrite_context=remote, encoding).

Public API
    Transaction(sender, arrival) .ret .envid .encoding .smtputf8 .size .rcpts .overshoot
    mail_params(tx, params, smtputf8_enable, dsn_off) -> str | None   (error reply)
    rcpt_params(params, dsn_off) -> (notify, orcpt) | str             (str: error reply)
    utf8_error(address, smtputf8) -> str | None
    async read_data(reader, limit, progress, mode="normalize") -> bytes | BareLF | None
    BARE_LF (the BareLF result: reject mode saw a bare LF); NORMALIZE, REJECT, NO
    truncate_headers(data, limit) -> (bytes, int)
    received_header(myhostname, mail_name, client, helo, protocol, tx)
        -> Callable[[qid], list[bytes]]
    content_with(received_lines, data) -> bytes
    message_attrs(client, helo, protocol, tx) -> dict[str, str]
    xtext_decode(text) -> str | None
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from qmgrd.spool.cleanup import mail_date, truncate_headers
from qmgrd.spool.envelope import (
    DSN_RET_FULL,
    DSN_RET_HDRS,
    Recipient,
    parse_notify,
    valid_envid,
)
from qmgrd.spool.statuslog import quote_822_local
from transports.smtpd_policy import ClientInfo

__all__ = [
    "BARE_LF",
    "NO",
    "NORMALIZE",
    "REJECT",
    "BareLF",
    "Transaction",
    "content_with",
    "mail_params",
    "message_attrs",
    "rcpt_params",
    "read_data",
    "received_header",
    "truncate_headers",
    "utf8_error",
    "xtext_decode",
]

_RET = {"FULL": DSN_RET_FULL, "HDRS": DSN_RET_HDRS}
# smtpd_forbid_bare_newline's modes (master.config.params.BARE_NEWLINE_MODES: "yes" is
# normalize)
NORMALIZE, REJECT, NO = "normalize", "reject", "no"


class BareLF:
    """read_data's result in reject mode when a line ended in a bare LF."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BARE_LF"


BARE_LF = BareLF()


@dataclass
class Transaction:
    """A mail transaction between MAIL FROM and the end of DATA."""

    sender: str
    arrival: float
    ret: int = 0
    envid: str = ""
    encoding: str = ""
    smtputf8: bool = False
    size: int = 0
    rcpts: list[Recipient] = field(default_factory=list)
    overshoot: int = 0


def xtext_decode(text: str) -> str | None:
    """RFC 3461 xtext -> text; None when malformed (a bad ``+XX``, ``=``, space, controls
    or non-ASCII)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "+":
            h = text[i + 1:i + 3]
            if len(h) != 2 or any(x not in "0123456789ABCDEFabcdef" for x in h):
                return None
            out.append(chr(int(h, 16)))
            i += 3
        elif "!" <= c <= "~" and c != "=":
            out.append(c)
            i += 1
        else:
            return None
    return "".join(out)


def utf8_error(address: str, smtputf8: bool) -> str | None:
    """The reply for a non-ASCII address in a transaction without SMTPUTF8, else None."""
    if address.isascii() or smtputf8:
        return None
    return "553 5.6.7 Must declare SMTPUTF8 to send unicode address"


def mail_params(tx: Transaction, params: list[str], smtputf8_enable: bool,
                dsn_off: bool) -> str | None:
    """Apply MAIL FROM's parameters to ``tx``; the error reply, or None."""
    for param in params:
        key, eq, value = param.partition("=")
        key, word = key.upper(), value.upper()
        if key == "BODY" and word in ("8BITMIME", "7BIT"):
            tx.encoding = "8bit" if word == "8BITMIME" else "7bit"
        elif key == "SIZE" and eq:
            if not value.isdigit():
                return "501 5.5.4 Bad message size syntax"
            tx.size = int(value)
        elif key in ("RET", "ENVID") and dsn_off:
            return "501 5.7.1 DSN support is disabled"
        elif key == "RET":
            if tx.ret or word not in _RET:
                return "501 5.5.4 Bad RET parameter syntax"
            tx.ret = _RET[word]
        elif key == "ENVID":
            envid = xtext_decode(value)
            if tx.envid or envid is None or not valid_envid(envid):
                return "501 5.5.4 Bad ENVID parameter syntax"
            tx.envid = envid
        elif key == "SMTPUTF8" and not eq and smtputf8_enable:
            tx.smtputf8 = True
        else:
            return f"555 5.5.4 Unsupported option: {param}"
    return None


def rcpt_params(params: list[str], dsn_off: bool) -> tuple[int, str] | str:
    """RCPT TO's parameters -> (NOTIFY mask, ORCPT ``type;address``), or the error reply."""
    notify, orcpt = 0, ""
    for param in params:
        key, _, value = param.partition("=")
        key = key.upper()
        if key in ("NOTIFY", "ORCPT") and dsn_off:
            return "501 5.7.1 DSN support is disabled"
        if key == "NOTIFY":
            try:
                notify = 0 if notify else parse_notify(value)
            except ValueError:
                notify = 0
            if not notify:
                return "501 5.5.4 Error: Bad NOTIFY parameter syntax"
        elif key == "ORCPT":
            kind, semi, coded = value.partition(";")
            decoded = xtext_decode(coded) if semi and kind else None
            # Postfix rcpt_cmd: the decoded address must be printable (allprint); a
            # "+00" or "+0A" would otherwise pass RCPT and fail the whole message at
            # the end of DATA (cleanup refuses NUL and line breaks in envelope data)
            if orcpt or decoded is None or any(c < " " or c == "\x7f" for c in decoded):
                return "501 5.5.4 Error: Bad ORCPT parameter syntax"
            orcpt = f"{kind};{decoded}"
        else:
            return f"555 5.5.4 Unsupported option: {param}"
    return notify, orcpt


class _Data:
    """read_data's state: the content so far, its size and where the stream is."""

    __slots__ = ("at_start", "bare_lf", "last_cr", "lax_end", "limit", "line_crlf", "parts",
                 "reject", "size", "too_big")

    def __init__(self, limit: int, mode: str = NORMALIZE) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.too_big = False
        self.at_start, self.last_cr, self.line_crlf = True, False, True
        self.reject = mode == REJECT  # drop the content after a bare LF
        self.lax_end = mode == NO  # a lone dot line ends the data, whatever its line ends
        self.bare_lf = False  # a line ended in a bare LF

    def chunk(self, chunk: bytes) -> bool:
        """One line, or a piece of one (a line over the stream's limit). True at the
        end of the data (a lone dot after CRLF; in ``no`` mode any lone dot line)."""
        if self.at_start:
            if chunk == b".\r\n" and (self.line_crlf or self.lax_end):
                return True
            if chunk == b".\n" and self.lax_end:
                return True
            if chunk[:1] == b".":
                chunk = chunk[1:]
        self.at_start = chunk.endswith(b"\n")
        if self.at_start:
            self.line_crlf = chunk.endswith(b"\r\n") or (chunk == b"\n" and self.last_cr)
            self.size += len(chunk) + (0 if self.line_crlf else 1)  # a bare LF as CRLF
            self.bare_lf = self.bare_lf or not self.line_crlf
            self.last_cr = False
        else:
            self.size += len(chunk)
            self.last_cr = chunk.endswith(b"\r")
        self._keep(chunk)
        return False

    def pieces(self, data: bytes) -> None:
        """Bytes that hold no end of data: each line (or piece) in turn."""
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end + 1
            self.chunk(data[start:end])
            start = end

    def complete_lines(self, data: bytes) -> None:
        """Whole lines, CRLF last, from a line start whose first byte is no dot: the
        per-line rules at once (a dot after every LF removed; a bare LF counted as CRLF)."""
        data = data.replace(b"\n.", b"\n")
        bare = data.count(b"\n") - data.count(b"\r\n")
        self.size += len(data) + bare
        self.bare_lf = self.bare_lf or bare > 0
        self.at_start, self.last_cr, self.line_crlf = True, False, True
        self._keep(data)

    def _keep(self, data: bytes) -> None:
        if self.too_big:
            return
        if self.reject and self.bare_lf:  # rejected at the end: nothing more is kept
            self.parts = []
            return
        if self.limit and self.size > self.limit:
            self.too_big = True
            self.parts = []
        else:
            self.parts.append(data)


async def read_data(reader: asyncio.StreamReader, limit: int,
                    progress: Callable[[int], None], mode: str = NORMALIZE
                    ) -> bytes | BareLF | None:
    """The DATA content up to the end of data, dot-unstuffed (module docstring); None
    when over ``limit`` bytes (0 = no limit); BARE_LF when ``mode`` is REJECT and a line
    ended in a bare LF (checked before the size: the content is read to its end either
    way). ``mode``: smtpd_forbid_bare_newline's NORMALIZE, REJECT or NO. ``progress(n)``
    is called after each read of n bytes from ``reader`` (smtpd_timeout is rearmed per
    read from the network, by the session's data_received, not here). Raises what the
    reader raises (the connection went away).

    At a line start whose first byte is not a dot, CR or LF, everything up to the first
    CRLF.CRLF is read in one go and handled at once (no end of data can begin in the
    bytes already read: module docstring's rules); in NO mode, where any lone dot line
    ends the data, everything up to the next LF-dot (whole lines, none of them a dot
    line), and the dot line after it line by line. Otherwise, and for what is over the
    stream's limit, line by line as the rules say."""
    st = _Data(limit, mode)
    prefix = b""
    while True:
        if st.at_start and not prefix:
            prefix = await reader.readexactly(1)
            if prefix == b"\n":
                prefix = b""
                progress(1)
                if st.chunk(b"\n"):
                    break
                continue
            if prefix not in (b".", b"\r"):
                # up to the end of data (CRLF.CRLF), or in NO mode up to the next
                # LF-dot: whole lines without an end of data; NO mode's dot line after
                # them goes line by line (below)
                try:
                    blob = prefix + await reader.readuntil(b"\n." if st.lax_end
                                                           else b"\r\n.\r\n")
                except asyncio.LimitOverrunError as exc:
                    blob = prefix + await reader.read(exc.consumed)
                    prefix = b""
                    progress(len(blob))
                    st.pieces(blob)
                    continue
                if st.lax_end:
                    progress(len(blob) - 1)  # the dot is counted with its line
                    st.complete_lines(blob[:-1])
                    prefix = b"."
                    continue
                progress(len(blob))
                st.complete_lines(blob[:-3])
                break
        try:
            chunk = prefix + await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            chunk = prefix + await reader.read(exc.consumed)
        prefix = b""
        progress(len(chunk))
        if st.chunk(chunk):
            break
    if st.reject and st.bare_lf:
        return BARE_LF
    return None if st.too_big else b"".join(st.parts)


def received_header(myhostname: str, mail_name: str, client: ClientInfo, helo: str | None,
                    protocol: str, tx: Transaction) -> Callable[[str], list[bytes]]:
    """A function of the queue id that gives our Received: header's lines."""
    first = f"Received: from {helo or client.name} ({client.name} [{client.rfc_addr}])"
    by = f"\tby {myhostname} ({mail_name}) with {protocol} id "
    date = mail_date(tx.arrival)
    rcpts = tx.rcpts

    def build(qid: str) -> list[bytes]:
        if len(rcpts) == 1:
            lines = [first, by + qid, f"\tfor <{quote_822_local(rcpts[0].address)}>; {date}"]
        else:
            lines = [first, by + qid + ";", f"\t{date}"]
        return [x.encode("utf-8", "surrogateescape") for x in lines]

    return build


def content_with(received: list[bytes], data: bytes) -> bytes:
    """Our Received: lines, then the data (with Postfix's kludges, module docstring)."""
    head = b"\n".join(received) + b"\n"
    first = data[: data.find(b"\n") + 1] if b"\n" in data else data
    if first[:1] in (b" ", b"\t"):
        head += b"\n"
    elif first.lstrip(b">").startswith(b"From "):
        head += b"X-Mailbox-Line: "
    return head + data


def message_attrs(client: ClientInfo, helo: str, protocol: str,
                  tx: Transaction) -> dict[str, str]:
    """The named attributes of the queue file (Postfix smtpd's, empty ones left out)."""
    attrs = {"rewrite_context": "remote", "log_client_name": client.name,
             "log_client_address": client.rfc_addr, "log_client_port": client.port,
             "log_message_origin": client.namaddr, "log_helo_name": helo,
             "log_protocol_name": protocol, "client_name": client.name,
             "reverse_client_name": client.name, "client_address": client.addr,
             "client_port": client.port, "helo_name": helo, "protocol_name": protocol,
             "client_address_type": str(client.family), "encoding": tx.encoding}
    return {k: v for k, v in attrs.items() if v}
