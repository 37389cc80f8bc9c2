"""mailcopy — a message as a delivery agent writes it out (Postfix mail_copy()).

Summary
    :func:`mail_copy` turns the content lines of a queue file (without their line ends:
    QueueFile.iter_lines) into the bytes a pipe(8) command reads on its standard input,
    with the pipe(8) ``flags=`` letters that change the content, in Postfix's order:

    * ``F`` - first a ``From <sender>  <asctime>`` envelope line (local time; the empty
      sender as ``MAILER-DAEMON``);
    * ``R`` - ``Return-Path: <sender>``;
    * ``O`` - ``X-Original-To: <original recipient>``;
    * ``D`` - ``Delivered-To: <recipient>``;
    * then each content line; ``>`` puts ``>`` before a line that starts with
      ``From ``, ``.`` puts ``.`` before a line that starts with ``.``;
    * ``B`` - a blank line at the end.

    Every line, the added ones included, ends with ``eol`` (pipe's ``eol=``, default
    ``\\n``).  Addresses are written in quoted (RFC 822) form, their case kept.

    :func:`delivered_to` gives the (lower-cased) addresses of a message's
    ``Delivered-To:`` headers: the loop check of local(8) and of pipe's ``D`` flag
    (Postfix delivered_hdr; the comparison is case-insensitive).

Public API
    mail_copy(lines, flags, *, sender, orig_rcpt="", rcpt="", eol=b"\\n", now=None) -> bytes
        lines: Iterable[bytes]; flags: str or set of letters; sender: already the
        null_sender replacement when empty; now: epoch seconds for the From_ line
    delivered_to(lines) -> set[str]

Raises
    Whatever iterating ``lines`` raises (CorruptQueueFile): nothing is caught here.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable

from qmgrd.spool.statuslog import quote_822_local

__all__ = ["delivered_to", "mail_copy"]

_MAIL_DAEMON = "MAILER-DAEMON"


def _addr(address: str) -> bytes:
    return quote_822_local(address).encode("utf-8", "surrogateescape")


def mail_copy(lines: Iterable[bytes], flags: Collection[str], *, sender: str,
              orig_rcpt: str = "", rcpt: str = "", eol: bytes = b"\n",
              now: float | None = None) -> bytes:
    """The message as pipe(8) writes it to a command (module docstring)."""
    out: list[bytes] = []
    if "F" in flags:
        stamp = time.asctime(time.localtime(time.time() if now is None else now))
        who = _addr(sender) if sender else _MAIL_DAEMON.encode()
        out.append(b"From " + who + b"  " + stamp.encode() + eol)
    if "R" in flags:
        out.append(b"Return-Path: <" + (_addr(sender) if sender else b"") + b">" + eol)
    if "O" in flags:
        out.append(b"X-Original-To: " + _addr(orig_rcpt) + eol)
    if "D" in flags:
        out.append(b"Delivered-To: " + _addr(rcpt) + eol)
    quote, dot = ">" in flags, "." in flags
    for line in lines:
        if quote and line.startswith(b"From "):
            out.append(b">")
        elif dot and line.startswith(b"."):
            out.append(b".")
        out.append(line)
        out.append(eol)
    if "B" in flags:
        out.append(eol)
    return b"".join(out)


def delivered_to(lines: Iterable[bytes]) -> set[str]:
    """Lower-cased values of the Delivered-To: headers (unfolded) of the message."""
    found: set[str] = set()
    current: bytes | None = None
    for line in lines:
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current += line
            continue
        if current is not None:
            found.add(_header_value(current))
        current = line if line[:13].lower() == b"delivered-to:" else None
    if current is not None:
        found.add(_header_value(current))
    return found


def _header_value(line: bytes) -> str:
    value = line[13:].decode("utf-8", "surrogateescape").strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value.lower()
