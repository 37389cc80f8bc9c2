"""format — render queue entries as ``mailq`` text or ``postqueue -j`` JSON lines.

Summary
    The output half of Postfix's postqueue(1) (``showq_compat.c``, ``showq_json.c``;
    postfix.md §7.1, §7.2). qmgrd uses long queue ids, so the text layout is Postfix's
    long-id one::

        ----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------
        4SVLCh0sf8z9HdB*      1234 Tue Nov 14 22:13:20 alice@example.com
                            (host mx.example.net[192.0.2.1] said: 450 4.2.0 try later)
                                                       bob@example.net

        -- 1 Kbytes in 1 Request.

    * header ``"%-17s %8s %-19s %s"``; message line ``"%-17s %8ld %19.19s %s"`` with the
      queue id followed by its markers (``*`` active, ``!`` hold, then ``#`` forced to
      expire), the size, ``asctime(localtime(arrival))`` cut to 19 characters, the sender;
    * a ``(reason)`` line before a recipient whose reason differs from the previous
      recipient's, right-aligned so that ``)`` ends in column 78 (76 - strlen(reason)
      spaces, at least 0; strlen counts UTF-8 bytes as C does); when the previous
      recipient had a reason and this one has none: ``(reason unavailable)``;
    * recipient lines: three empty fields in the header layout (47 spaces), the address;
    * a blank line between messages; at the end ``-- <sum of sizes // 1024> Kbytes in
      <n> Request[s].`` after a blank line (the division truncates, as ``%lu`` of an
      integer division does), or ``Mail queue is empty`` when nothing was listed
      (``No message matches`` when a selector matched nothing).

    JSON: one object per line, members in postqueue's order ``queue_name``, ``queue_id``,
    ``arrival_time``, ``message_size``, ``forced_expire``, ``sender``, ``recipients``
    (each ``{"address": ..., "delay_reason": ...}``, ``delay_reason`` only when non-empty),
    with ``", "`` and ``": "`` separators as Postfix prints them; non-ASCII text is
    written as UTF-8, not escaped.

Public API
    HEADER: str                                   the long-id heading line (with newline)
    format_message(entry) -> str                  one message block (no separator)
    format_mailq(entries) -> Iterator[str]        header, blocks, separators, summary
    format_json(entry) -> str                     one JSON line (with newline)

Pure functions; no I/O, nothing logged or raised.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from json.encoder import encode_basestring as _quote

from qmgrd.ctl.showq import QueueEntry

__all__ = ["HEADER", "format_json", "format_mailq", "format_message"]

_STRING_FORMAT = "{:<17} {:>8} {:<19} {}\n"
HEADER = _STRING_FORMAT.format(
    "----Queue ID-----", "--Size--", "---Arrival Time----", "--Sender/Recipient------")
_RCPT_PREFIX = _STRING_FORMAT.format("", "", "", "")[:-1]


def _id_status(entry: QueueEntry) -> str:
    marker = {"active": "*", "hold": "!"}.get(entry.queue_name, "")
    return entry.queue_id + marker + ("#" if entry.forced_expire else "")


def format_message(entry: QueueEntry) -> str:
    """The mailq block of one message: the sender line, then reason and recipient lines."""
    when = time.asctime(time.localtime(entry.arrival_time))[:19]
    out = [f"{_id_status(entry):<17} {entry.message_size:>8} {when:>19} {entry.sender}\n"]
    saved = ""
    for rcpt in entry.recipients:
        if rcpt.reason != saved:
            saved = rcpt.reason
            show = saved or "reason unavailable"
            padding = max(0, 76 - len(show.encode("utf-8", "surrogateescape")))
            out.append(f"{'':{padding}}({show})\n")
        out.append(f"{_RCPT_PREFIX}{rcpt.address}\n")
    return "".join(out)


def format_mailq(entries: Iterable[QueueEntry], selected: bool = False) -> Iterator[str]:
    """Yield mailq output chunk by chunk (so that a long listing streams).

    Args:
        entries: queue entries in display order (usually showq.scan()).
        selected: the entries are a selector's matches: when there are none, say
            ``No message matches`` (the queue need not be empty).
    """
    count = 0
    total = 0
    for entry in entries:
        yield "\n" if count else HEADER
        yield format_message(entry)
        total += entry.message_size
        count += 1
    if count == 0:
        yield "No message matches\n" if selected else "Mail queue is empty\n"
    else:
        yield f"\n-- {total // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}.\n"


def format_json(entry: QueueEntry) -> str:
    """One ``postqueue -j`` line for ``entry`` (ends with a newline).

    Built with json's own string encoder, member by member: the same bytes as
    ``json.dumps(obj, ensure_ascii=False)`` of the object in postqueue's order, at a
    fraction of the cost (a listing writes 100,000 of these)."""
    rcpts = ", ".join(
        '{"address": ' + _quote(r.address)
        + (', "delay_reason": ' + _quote(r.reason) + "}" if r.reason else "}")
        for r in entry.recipients)
    return ('{"queue_name": ' + _quote(entry.queue_name)
            + ', "queue_id": ' + _quote(entry.queue_id)
            + f', "arrival_time": {int(entry.arrival_time)}'
            + f', "message_size": {int(entry.message_size)}'
            + ', "forced_expire": ' + ("true" if entry.forced_expire else "false")
            + ', "sender": ' + _quote(entry.sender)
            + ', "recipients": [' + rcpts + "]}\n")
