"""smtp_mime — 8-bit to 7-bit MIME conversion for the smtp client (RFC 6152, RFC 2045).

Summary
    A server that does not announce 8BITMIME in its EHLO reply (or one greeted with HELO)
    must not receive 8-bit content (RFC 6152 section 3). With
    ``disable_mime_output_conversion = no`` (the default) Postfix's smtp client converts
    the message on the fly (smtp_proto.c, mime_state.c with MIME_OPT_DOWNGRADE): each
    leaf body part with 8-bit content is sent quoted-printable and its
    Content-Transfer-Encoding header says so; a multipart/* or message/* entity that
    declared ``8bit`` or ``binary`` gets ``7bit`` once its parts are converted; nested
    message/rfc822 parts are converted the same way. Message headers are never
    converted (8-bit headers are the SMTPUTF8 case). Nothing is logged.

    :func:`downgrade` does that with the standard ``email`` package: the message is
    parsed, the parts that need it re-encoded, and the message generated again; a
    message with no 8-bit body text is returned as it was, byte for byte. In a
    converted one, every header is written back exactly as it was read (a compat32
    policy that keeps what follows the colon: spacing, folding, 8-bit bytes), and so is
    the text of every part left alone; a CR inside a line (which the parser would take
    for a line end) stands in as a byte the message does not use while it is parsed.
    What the generator makes again are the boundary lines of a multipart (``--b`` and
    ``--b--`` with nothing after them: white space after a boundary, which RFC 2046
    allows, is dropped).
    Where qmgrd differs from Postfix's MIME engine, it errs towards 7-bit on the wire:

    * Conversion follows the content, not only the declared encoding: a leaf part with
      8-bit bytes is converted whatever its Content-Transfer-Encoding said (absent,
      ``7bit``, ``8bit``, ``binary``); Postfix converts only parts that declared ``8bit``
      or ``binary`` and sends undeclared 8-bit data as it is. A part that declared
      ``8bit`` but holds only 7-bit text is left alone (Postfix re-encodes it too).
    * A part declared ``quoted-printable``, ``base64`` or any other encoding that has
      raw 8-bit bytes is left as it is (it is broken already; re-encoding would change
      what it decodes to), as in Postfix. So is the preamble or epilogue of a
      multipart, and a multipart/* or message/* entity that the parser could not
      split (no boundary): RFC 2045 forbids quoted-printable for those.
    * Quoted-printable is made per line (binascii.b2a_qp in binary mode): line breaks
      stay hard line breaks, a stray CR inside a line is ``=0D``, lines are at most 76
      characters (soft breaks ``=``), so the text decodes to exactly the bytes it had.
    * A top-level message without a ``MIME-Version`` header that is converted gets
      ``MIME-Version: 1.0`` after its headers, without which its new
      Content-Transfer-Encoding would mean nothing (RFC 2045 section 4); Postfix does
      not convert such a message.

    Nesting deeper than ``mime_nesting_limit`` (default 100; multipart and message/*
    levels) cannot be converted: MimeError 5.6.0 ``MIME nesting exceeds safety limit``,
    which the smtp client bounces, as Postfix's smtp_mime_fail().

Public API
    downgrade(lines, nesting_limit=100) -> list[bytes]   lines without line ends, in
                                                         and out; raises MimeError
    MimeError(Exception)                                 .status ("5.6.0"), .text
"""

from __future__ import annotations

import binascii
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import Compat32
from io import BytesIO

__all__ = ["MimeError", "downgrade"]



class _Verbatim(Compat32):
    """compat32, but a header is written back exactly as it was read: what follows the
    colon (white space, folding, 8-bit bytes) is kept, and a header set here must start
    its value with the space it wants after the colon."""

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = "".join(sourcelines).split(":", 1)
        return name, value.removesuffix("\n")

    def fold(self, name: str, value: str) -> str:
        return f"{name}:{value}\n"

    def fold_binary(self, name: str, value: str) -> bytes:
        return self.fold(name, value).encode("ascii", "surrogateescape")


# "\n" as line end in and out: the queue file's lines have none of their own
_POLICY = _Verbatim(linesep="\n", max_line_length=0)
_IDENTITY = ("", "7bit", "8bit", "binary")
_CTE = "Content-Transfer-Encoding"
# stand-ins for a CR inside a line while the message is parsed: controls, then 8-bit
_STAND_INS = [*range(1, 9), *range(14, 32), *range(128, 256)]


class MimeError(Exception):
    """The message cannot be converted: ``status`` (enhanced status code) and ``text``,
    as Postfix's mime_state_detail()."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def downgrade(lines: list[bytes], nesting_limit: int = 100) -> list[bytes]:
    """``lines`` (the message, each line without its line end) with every 8-bit body
    part quoted-printable (module docstring); ``lines`` itself when no body part has
    8-bit content. ``nesting_limit``: mime_nesting_limit (0 = none).

    Raises:
        MimeError: 5.6.0 when the nesting exceeds ``nesting_limit``.
    """
    data = b"\n".join(lines) + b"\n"
    # The parser ends a line at a CR as well: a CR inside a line stands in as a byte
    # that the message does not use, until the end (none free: it stays a CR)
    stand_in = b"\r"
    if b"\r" in data:
        stand_in = next((bytes([c]) for c in _STAND_INS if bytes([c]) not in data), b"\r")
        data = data.replace(b"\r", stand_in)
    try:
        msg = BytesParser(policy=_POLICY).parsebytes(data)
        changed = _convert(msg, 0, nesting_limit, stand_in)
    except RecursionError:  # deeper than the parser can go, whatever the limit
        raise MimeError("5.6.0", "MIME nesting exceeds safety limit") from None
    if not changed:
        return lines
    if "MIME-Version" not in msg:
        msg["MIME-Version"] = " 1.0"
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(msg)
    result = out.getvalue().replace(stand_in, b"\r").split(b"\n")
    if result[-1] == b"":
        result.pop()
    return result


def _cte(part: Message) -> str:
    value = part.get(_CTE)
    return str(value).strip().lower() if value is not None else ""


def _set_cte(part: Message, value: str) -> None:
    """Content-Transfer-Encoding:``value``, where the header was (or after the others)."""
    if _CTE in part:
        part.replace_header(_CTE, value)
    else:
        part[_CTE] = value


def _convert(part: Message, depth: int, limit: int, stand_in: bytes) -> bool:
    """Convert ``part`` (at nesting ``depth``) in place; True if anything changed."""
    payload = part.get_payload()
    if isinstance(payload, list):  # multipart/*, or message/* with its message
        if limit > 0 and depth >= limit:
            raise MimeError("5.6.0", "MIME nesting exceeds safety limit")
        changed = False
        for sub in payload:
            if isinstance(sub, Message):
                changed = _convert(sub, depth + 1, limit, stand_in) or changed
        if changed and _cte(part) in ("8bit", "binary"):
            _set_cte(part, " 7bit")
        return changed
    if not isinstance(payload, str) or payload.isascii() or _cte(part) not in _IDENTITY:
        return False
    raw = part.get_payload(decode=True)  # the bytes as read, for these encodings
    if not isinstance(raw, bytes) or raw.replace(stand_in, b"\r").isascii():
        return False
    if part.get_content_maintype() in ("multipart", "message"):
        return False  # not split by the parser; quoted-printable is not allowed here
    raw = raw.replace(stand_in, b"\r")
    part.set_payload("\n".join(binascii.b2a_qp(line, istext=False).decode("ascii")
                               for line in raw.split(b"\n")))
    _set_cte(part, " quoted-printable")
    return True
