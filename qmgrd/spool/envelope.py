"""envelope — the message envelope handed to cleanup: sender, recipients, DSN options.

Summary
    Plain data classes shared by cleanup, the queue-file reader, the status logs, smtpd,
    pickup and qmgr-sendmail. DSN values are Postfix's bit masks (postfix.md §2.2):
    NOTIFY NEVER=1, SUCCESS=2, FAILURE=4, DELAY=8; RET FULL=1, HDRS=2. This module
    imports nothing heavy (qmgr-sendmail uses it).

Public API
    Recipient(address, orig_rcpt="", dsn_orcpt="", notify=0, offset=0)
    Envelope(sender, recipients, fullname="", arrival=(0, 0), ret=0, envid="", attrs={},
             smtputf8=0)        arrival (0, 0) means "now" to cleanup
    DSN_NOTIFY_NEVER, DSN_NOTIFY_SUCCESS, DSN_NOTIFY_FAILURE, DSN_NOTIFY_DELAY,
    DSN_NOTIFY_ANY, DSN_RET_FULL, DSN_RET_HDRS
    SMTPUTF8_FLAG_REQUESTED, SMTPUTF8_FLAG_HEADER, SMTPUTF8_FLAG_SENDER
    parse_notify(text) -> int        "never" | comma list of success,delay,failure
    notify_str(mask) -> str          inverse of parse_notify ("" for 0)
    parse_ret(text) -> int           "full" | "hdrs"
    valid_envid(text) -> bool        RFC 3461 ENVID (decoded): 1-100 chars, ASCII 33..126

Addresses (RFC 5322 address lists, as Postfix's sendmail and cleanup read them with
tok822_parse + tok822_internalize). The *internal* form of an address has the quotes of a
quoted local part and their backslash escapes removed (``"a b"@example.com`` is stored as
``a b@example.com``); the smtp and local agents put the quotes back on output
(quote_822_local). ``email.utils`` is imported on first use only, so that qmgr-sendmail
stays light when no argument needs parsing:

    needs_parsing(text) -> bool      text has a character from ``"<>(),;:\\`` or whitespace
    internal_form(addr) -> str       ``"a b"@x`` -> ``a b@x``
    parse_recipient_arg(text) -> list[str]   one command-line argument: a comma list of
                                     addresses, each well formed, at least one
    parse_sender_arg(text) -> str    ``-f`` value: one address, or ``<>``/"" (null sender)
    extract_addresses(values) -> list[str]   To/Cc/Bcc header values -> addresses (those
                                     that do not parse and group names are skipped)

Raises ValueError for bad DSN keywords and for malformed address arguments (the message
names the argument); logs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "DSN_NOTIFY_ANY",
    "DSN_NOTIFY_DELAY",
    "DSN_NOTIFY_FAILURE",
    "DSN_NOTIFY_NEVER",
    "DSN_NOTIFY_SUCCESS",
    "DSN_RET_FULL",
    "DSN_RET_HDRS",
    "SMTPUTF8_FLAG_HEADER",
    "SMTPUTF8_FLAG_REQUESTED",
    "SMTPUTF8_FLAG_SENDER",
    "Envelope",
    "Recipient",
    "extract_addresses",
    "internal_form",
    "needs_parsing",
    "notify_str",
    "parse_notify",
    "parse_recipient_arg",
    "parse_ret",
    "parse_sender_arg",
    "valid_envid",
]

DSN_NOTIFY_NEVER = 1
DSN_NOTIFY_SUCCESS = 2
DSN_NOTIFY_FAILURE = 4
DSN_NOTIFY_DELAY = 8
DSN_NOTIFY_ANY = DSN_NOTIFY_SUCCESS | DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY
DSN_RET_FULL = 1
DSN_RET_HDRS = 2

SMTPUTF8_FLAG_REQUESTED = 1
SMTPUTF8_FLAG_HEADER = 2
SMTPUTF8_FLAG_SENDER = 4

_ADDR_SPECIALS = frozenset('"<>(),;:\\ \t\r\n\f\v')
_CONTROLS = frozenset([*map(chr, range(32)), "\x7f"])

_NOTIFY_WORDS = {
    "never": DSN_NOTIFY_NEVER,
    "success": DSN_NOTIFY_SUCCESS,
    "failure": DSN_NOTIFY_FAILURE,
    "delay": DSN_NOTIFY_DELAY,
}


@dataclass(slots=True)
class Recipient:
    """One envelope recipient.

    Attributes:
        address: the recipient address (str; no angle brackets).
        orig_rcpt: the address before any rewriting ("" = same as address).
        dsn_orcpt: DSN ORCPT as ``addr-type;address`` ("" = none).
        notify: DSN NOTIFY bit mask (0 = not specified).
        offset: file offset of this recipient's ``R`` record (0 = not in a file yet).
    """

    address: str
    orig_rcpt: str = ""
    dsn_orcpt: str = ""
    notify: int = 0
    offset: int = 0


@dataclass
class Envelope:
    """The envelope cleanup writes into a queue file.

    Attributes:
        sender: envelope sender ("" = the null sender <>).
        recipients: the recipients, in order.
        fullname: sender full name ("" = none).
        arrival: (seconds, microseconds) of arrival; (0, 0) = now.
        ret: DSN RET (DSN_RET_FULL / DSN_RET_HDRS, 0 = not given).
        envid: DSN ENVID ("" = none).
        attrs: extra named attributes written as ``A name=value`` records (for example
            ``rewrite_context``, ``log_client_name``, ``log_protocol_name``).
        smtputf8: SMTPUTF8 flags (SMTPUTF8_FLAG_REQUESTED when the client asked for it).
    """

    sender: str
    recipients: list[Recipient]
    fullname: str = ""
    arrival: tuple[int, int] = (0, 0)
    ret: int = 0
    envid: str = ""
    attrs: dict[str, str] = field(default_factory=dict)
    smtputf8: int = 0


def parse_notify(text: str) -> int:
    """DSN NOTIFY keywords (``never`` or a comma list of success, delay, failure) -> mask.

    Raises:
        ValueError: unknown keyword, empty list, or ``never`` combined with others.
    """
    mask = 0
    words = [w.strip().lower() for w in text.split(",")]
    for w in words:
        if w not in _NOTIFY_WORDS:
            raise ValueError(f"bad DSN notify keyword: {w or '(empty)'}")
        mask |= _NOTIFY_WORDS[w]
    if mask & DSN_NOTIFY_NEVER and mask != DSN_NOTIFY_NEVER:
        raise ValueError("DSN notify 'never' cannot be combined with other keywords")
    return mask


def notify_str(mask: int) -> str:
    """Mask -> comma list of keywords in Postfix's order (success,delay,failure)."""
    if mask & DSN_NOTIFY_NEVER:
        return "never"
    words = [
        w
        for w, bit in (
            ("success", DSN_NOTIFY_SUCCESS),
            ("delay", DSN_NOTIFY_DELAY),
            ("failure", DSN_NOTIFY_FAILURE),
        )
        if mask & bit
    ]
    return ",".join(words)


def parse_ret(text: str) -> int:
    """DSN RET keyword ``full`` or ``hdrs`` -> DSN_RET_FULL / DSN_RET_HDRS.

    Raises:
        ValueError: any other word.
    """
    w = text.strip().lower()
    if w == "full":
        return DSN_RET_FULL
    if w == "hdrs":
        return DSN_RET_HDRS
    raise ValueError(f"bad DSN ret keyword: {text or '(empty)'}")


def valid_envid(text: str) -> bool:
    """True when ``text`` is an acceptable DSN ENVID in its decoded form (RFC 3461 §4.4):
    1 to 100 printable US-ASCII characters, codes 33..126 (no space, no controls)."""
    return 0 < len(text) <= 100 and all("!" <= c <= "~" for c in text)


def needs_parsing(text: str) -> bool:
    """True when ``text`` holds a character that only an RFC 5322 parser can interpret
    (one of ``"<>(),;:\\`` or whitespace); plain ``user@domain`` is taken as is."""
    return not _ADDR_SPECIALS.isdisjoint(text)


def internal_form(addr: str) -> str:
    """An addr-spec as ``email.utils`` returns it -> Postfix's internal form: the double
    quotes of quoted strings are removed and their backslash escapes resolved
    (``"a\\"b"@x`` -> ``a"b@x``)."""
    if '"' not in addr:
        return addr
    out: list[str] = []
    quoted = False
    i, n = 0, len(addr)
    while i < n:
        c = addr[i]
        if c == '"':
            quoted = not quoted
        elif c == "\\" and quoted and i + 1 < n:
            i += 1
            out.append(addr[i])
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _well_formed(addr: str) -> bool:
    """An internal-form address: not empty, no control characters, and when it has an
    ``@`` neither the local part nor the domain is empty."""
    if not addr or not _CONTROLS.isdisjoint(addr):
        return False
    at = addr.rfind("@")
    return at < 0 or 0 < at < len(addr) - 1


def _parse_list(text: str) -> list[str]:
    from email.utils import getaddresses

    return [internal_form(addr.strip()) for _name, addr in getaddresses([text])]


def parse_recipient_arg(text: str) -> list[str]:
    """One command-line recipient argument -> internal-form addresses.

    The argument is an RFC 5322 address list (``a@x, "b c"@y, Name <d@z>``); plain text
    without specials (see needs_parsing) is the only address, unchanged.

    Raises:
        ValueError: an element of the list is not a well-formed address (empty, control
            characters, empty local part or domain), or there is none.
    """
    addrs = _parse_list(text) if needs_parsing(text) else [text]
    if not addrs or not all(_well_formed(a) for a in addrs) or _whole_words(text, addrs) != addrs:
        raise ValueError(f"malformed recipient address: {text}")
    return addrs


def _whole_words(text: str, addrs: list[str]) -> list[str]:
    """``addrs`` (getaddresses() of ``text``) with each address of which it kept only the
    first of several bare words (``a b c`` -> ``a``: the rest silently lost) replaced by
    the whole local part, as the email package's header parser and Postfix's tok822
    read it (``a b c``)."""
    if not any(c.isspace() for c in text):
        return addrs
    from email.policy import default

    try:
        modern = [f"{a.username}@{a.domain}" if a.domain else a.username
                  for a in default.header_factory("To", text).addresses]
    except Exception:  # noqa: BLE001 - a cross-check only: getaddresses() decided
        return addrs
    return [m if m != a and m.partition("@")[0].startswith(a.partition("@")[0] + " ") else a
            for a, m in zip(addrs, modern + addrs[len(modern):], strict=True)]


def parse_sender_arg(text: str) -> str:
    """A ``-f`` value -> the internal-form sender ("" = the null sender).

    ``""`` and ``<>`` are the null sender; ``<a@x>``, ``Name <a@x>`` and ``"a b"@x`` give
    ``a@x``, ``a@x`` and ``a b@x``.

    Raises:
        ValueError: not exactly one well-formed address.
    """
    if not text or "".join(text.split()) == "<>":
        return ""
    addrs = _parse_list(text) if needs_parsing(text) else [text]
    if len(addrs) != 1 or not _well_formed(addrs[0]):
        raise ValueError(f"-f option specified malformed sender: {text}")
    return addrs[0]


def extract_addresses(values: Iterable[str]) -> list[str]:
    """To/Cc/Bcc header values -> the internal-form addresses they hold, in order.

    Entries that do not parse to a well-formed address (``<>``, an empty group such as
    ``undisclosed-recipients:;``, garbage) are skipped, as cleanup does; bare words are
    one address (``To: john smith`` is ``john smith``, as Postfix reads it, never
    ``john``), and words after an address are not one (``<b@x> Trailing junk`` is
    ``b@x`` only). Parsed with the email package's header parser (email.policy), the
    older getaddresses() only for what that one cannot parse.
    """
    from email.policy import default
    from email.utils import getaddresses

    out: list[str] = []
    for value in values:
        try:  # the email package's header parser: RFC 5322 with its obsolete forms
            parsed = default.header_factory("To", " ".join(value.splitlines())).addresses
            addrs = [f"{a.username}@{a.domain}" if a.domain else a.username for a in parsed]
        except Exception:  # noqa: BLE001 - unparsable for it: the older, laxer parser
            addrs = _whole_words(value, [internal_form(addr.strip())
                                         for _name, addr in getaddresses([value])])
        out += [a for a in addrs if _well_formed(a)]
    return out
