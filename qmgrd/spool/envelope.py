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

Raises ValueError for bad DSN keywords; logs nothing.
"""

from __future__ import annotations

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
    "notify_str",
    "parse_notify",
    "parse_ret",
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

_NOTIFY_WORDS = {
    "never": DSN_NOTIFY_NEVER,
    "success": DSN_NOTIFY_SUCCESS,
    "failure": DSN_NOTIFY_FAILURE,
    "delay": DSN_NOTIFY_DELAY,
}


@dataclass
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
            raise ValueError(f"bad DSN notify keyword: {w!r}")
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
    raise ValueError(f"bad DSN ret keyword: {text!r}")
