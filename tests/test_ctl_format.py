"""Golden tests for qmgrd.ctl.format: Postfix's long-id mailq layout and postqueue -j."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from qmgrd.ctl.format import HEADER, format_json, format_mailq, format_message
from qmgrd.ctl.showq import QueueEntry, ShowRecipient

REASON = "host mx.example.net[192.0.2.1] said: 450 4.2.0 try later"


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def entry(queue: str = "deferred", qid: str = "4SVLCh0sf8z9HdB", size: int = 1234,
          expire: bool = False, sender: str = "alice@example.com",
          rcpts: tuple[tuple[str, str], ...] = ()) -> QueueEntry:
    return QueueEntry(queue, qid, 1700000000, size, expire, sender,
                      [ShowRecipient(a, r) for a, r in rcpts])


def test_header_is_postfix_long_id_heading() -> None:
    assert HEADER == ("----Queue ID----- --Size-- ---Arrival Time---- "
                      "--Sender/Recipient------\n")
    assert HEADER == "%-17s %8s %-19s %s\n" % (  # noqa: UP031 (Postfix's printf format)
        "----Queue ID-----", "--Size--", "---Arrival Time----", "--Sender/Recipient------")


def test_one_message_golden() -> None:
    e = entry("active", rcpts=(("bob@example.net", REASON), ("carol@example.net", REASON),
                               ("dave@example.net", "")))
    out = "".join(format_mailq([e]))
    assert out == (
        "----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------\n"
        "4SVLCh0sf8z9HdB*      1234 Tue Nov 14 22:13:20 alice@example.com\n"
        "                    (host mx.example.net[192.0.2.1] said: 450 4.2.0 try later)\n"
        "                                               bob@example.net\n"
        "                                               carol@example.net\n"
        "                                                          (reason unavailable)\n"
        "                                               dave@example.net\n"
        "\n"
        "-- 1 Kbytes in 1 Request.\n"
    )
    reason_line = out.splitlines()[2]
    assert len(reason_line) == 78 and reason_line.endswith(")")


def test_markers_and_separator_and_plural() -> None:
    a = entry("hold", qid="4SVLCh0sf8z9HdC", size=1023, expire=True, sender="MAILER-DAEMON",
              rcpts=(("x@example.org", ""),))
    b = entry("incoming", qid="4SVLCh0sf8z9HdD", size=1024, expire=True)
    c = entry("active", qid="4SVLCh0sf8z9HdF", size=1, expire=False)
    out = "".join(format_mailq([a, b, c]))
    assert out == (
        HEADER
        + "4SVLCh0sf8z9HdC!#     1023 Tue Nov 14 22:13:20 MAILER-DAEMON\n"
        + " " * 47 + "x@example.org\n"
        + "\n"
        + "4SVLCh0sf8z9HdD#      1024 Tue Nov 14 22:13:20 alice@example.com\n"
        + "\n"
        + "4SVLCh0sf8z9HdF*         1 Tue Nov 14 22:13:20 alice@example.com\n"
        + "\n"
        + "-- 2 Kbytes in 3 Requests.\n"  # 2048 // 1024: truncating division
    )


def test_kbytes_truncate() -> None:
    out = "".join(format_mailq([entry(size=1023), entry(size=1024)]))
    assert out.endswith("\n-- 1 Kbytes in 2 Requests.\n")


def test_empty_queue() -> None:
    assert "".join(format_mailq([])) == "Mail queue is empty\n"


def test_reason_changes_and_long_reason_not_padded() -> None:
    long_reason = "z" * 80
    e = entry(rcpts=(("a@x", "one"), ("b@x", "two"), ("c@x", "two"), ("d@x", long_reason),
                     ("e@x", "")))
    lines = format_message(e).splitlines()
    assert lines[1:] == [
        " " * 73 + "(one)",
        " " * 47 + "a@x",
        " " * 73 + "(two)",
        " " * 47 + "b@x",
        " " * 47 + "c@x",
        f"({long_reason})",
        " " * 47 + "d@x",
        " " * 58 + "(reason unavailable)",
        " " * 47 + "e@x",
    ]


def test_reason_padding_counts_utf8_bytes() -> None:
    reason = "Zustellung verzögert"  # 20 characters, 21 bytes
    line = format_message(entry(rcpts=(("a@x", reason),))).splitlines()[1]
    assert line == " " * (76 - 21) + f"({reason})"


def test_no_reason_line_when_nobody_has_a_reason() -> None:
    lines = format_message(entry(rcpts=(("a@x", ""), ("b@x", "")))).splitlines()
    assert lines[1:] == [" " * 47 + "a@x", " " * 47 + "b@x"]


def test_long_queue_id_widens_column() -> None:
    e = entry("hold", qid="ZZZZZZZZZZZZZzZZZZZZZZZ", expire=True)
    line = format_message(e).splitlines()[0]
    assert line == "ZZZZZZZZZZZZZzZZZZZZZZZ!#     1234 Tue Nov 14 22:13:20 alice@example.com"


def test_json_line_golden() -> None:
    e = entry("deferred", expire=True,
              rcpts=(("bob@example.net", REASON), ("dave@example.net", ""),
                     ("ü@example.net", "verzögert")))
    line = format_json(e)
    assert line == (
        '{"queue_name": "deferred", "queue_id": "4SVLCh0sf8z9HdB", '
        '"arrival_time": 1700000000, "message_size": 1234, "forced_expire": true, '
        '"sender": "alice@example.com", "recipients": ['
        '{"address": "bob@example.net", "delay_reason": "' + REASON + '"}, '
        '{"address": "dave@example.net"}, '
        '{"address": "ü@example.net", "delay_reason": "verzögert"}]}\n'
    )
    obj = json.loads(line, object_pairs_hook=list)
    assert [k for k, _ in obj] == ["queue_name", "queue_id", "arrival_time", "message_size",
                                   "forced_expire", "sender", "recipients"]


def test_json_escapes_quotes() -> None:
    e = entry(sender='"a b"@example.com', rcpts=(('"c\\d"@x', 'said "no"'),))
    obj = json.loads(format_json(e))
    assert obj["sender"] == '"a b"@example.com'
    assert obj["recipients"] == [{"address": '"c\\d"@x', "delay_reason": 'said "no"'}]
