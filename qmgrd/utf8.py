"""qmgrd.utf8 - envelope text that is not valid UTF-8, found and shown (no imports).

Summary
    Python decodes command-line arguments and SMTP command lines with "surrogateescape":
    a byte that is not part of valid UTF-8 becomes a lone surrogate (U+DC80..U+DCFF).
    Such an address cannot be written as UTF-8 (queue files, logs, notices), so smtpd
    and qmgr-sendmail refuse it (Postfix refuses malformed UTF-8 in envelope addresses),
    naming it with the bad bytes shown as ``\\xNN``.

Public API
    malformed(text: str) -> bool    True when ``text`` holds a lone surrogate
    shown(text: str, style="text") -> str   ``text`` writable as UTF-8: each escaped
                                    byte as ``\\xNN`` ("text"), ``+NN`` ("xtext") or ``?``
                                    ("header"), any other lone surrogate as ``?``
"""

from __future__ import annotations

__all__ = ["malformed", "shown"]


def malformed(text: str) -> bool:
    """True when ``text`` (decoded with "surrogateescape") has bytes that are not valid
    UTF-8 (a lone surrogate)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def shown(text: str, style: str = "text") -> str:
    """``text`` with every character that cannot be written as UTF-8 replaced: an escaped
    byte as ``\\xNN`` (style "text": replies, logs, the readable part of a notice),
    ``+NN`` (style "xtext", RFC 3461 xtext-style: a notice's delivery-status address
    fields) or ``?`` (style "header": Postfix printable()); any other lone surrogate as
    ``?``. Valid text, UTF-8 included, is returned unchanged."""
    if not malformed(text):
        return text
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            byte = code - 0xDC00
            out.append(f"\\x{byte:02x}" if style == "text"
                       else f"+{byte:02X}" if style == "xtext" else "?")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)
