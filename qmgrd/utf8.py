"""qmgrd.utf8 - envelope text that is not valid UTF-8, found and shown (no imports).

Summary
    Python decodes command-line arguments and SMTP command lines with "surrogateescape":
    a byte that is not part of valid UTF-8 becomes a lone surrogate (U+DC80..U+DCFF).
    Such an address cannot be written as UTF-8 (queue files, logs, notices), so smtpd
    and qmgr-sendmail refuse it (Postfix refuses malformed UTF-8 in envelope addresses),
    naming it with the bad bytes shown as ``\\xNN``.

Public API
    malformed(text: str) -> bool    True when ``text`` holds a lone surrogate
    shown(text: str) -> str         ``text`` for a reply or log line: each escaped byte
                                    as ``\\xNN``, any other lone surrogate as ``?``
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


def shown(text: str) -> str:
    """``text`` with each escaped byte as ``\\xNN`` and any other lone surrogate as "?"."""
    if not malformed(text):
        return text
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else "?" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
