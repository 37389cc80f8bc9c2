"""Tests for master.log's line format: the cached time stamp and pid."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from master import log

LINE = re.compile(r"^(\w{3} [ \d]\d \d\d:\d\d:\d\d) vm qmgrd/test\[(\d+)\]: (.*)$")


@pytest.fixture
def maillog(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "maillog"
    log.setup("test", str(path), "qmgrd", myhostname="vm.example")
    yield path
    log.close()


def lines(path: Path) -> list[tuple[str, int, str]]:
    out = []
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        assert m, line
        out.append((m.group(1), int(m.group(2)), m.group(3)))
    return out


def test_a_child_forked_after_setup_logs_its_own_pid(maillog: Path) -> None:
    log.info("parent before")
    pid = os.fork()
    if pid == 0:  # the child logs without a setup of its own (as between fork and exec)
        try:
            log.info("child")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    log.info("parent after")
    got = {text: p for _, p, text in lines(maillog)}
    assert got == {"parent before": os.getpid(), "child": pid, "parent after": os.getpid()}


def test_the_stamp_follows_the_clock_second_by_second(
        maillog: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [time.mktime((2026, 11, 30, 23, 59, 58, 0, 0, -1)) + 0.25]
    monkeypatch.setattr(log.time, "time", lambda: now[0])
    log.info("a")
    now[0] += 0.5  # the same second
    log.info("b")
    now[0] += 0.5  # the next one
    log.info("c")
    now[0] += 3600 * 24  # a day later
    log.info("d")
    stamps = [s for s, _, _ in lines(maillog)]
    assert stamps == ["Nov 30 23:59:58", "Nov 30 23:59:58", "Nov 30 23:59:59",
                      "Dec 01 23:59:59"]


def test_control_characters_are_logged_as_question_marks(maillog: Path) -> None:
    """Postfix msg_text() censors with printable(text, '?'): a client's HELO name,
    address or Message-ID cannot put CR, NUL, ESC, BEL or DEL into the log (log lines
    forged or hidden on a terminal); a newline stays a space, UTF-8 text is kept."""
    log.info("message-id=<a\x1b[2Jb\rDec 01 00:00:00 vm qmgrd/x[1]: forged\x00\x07\x7f\tc>")
    log.info("from=<\u00e9l\u00e8ve@example.org>\nsecond line")
    raw = maillog.read_bytes()
    assert not any(b in raw for b in (b"\x1b", b"\r", b"\x00", b"\x07", b"\x7f", b"\t"))
    got = [text for _, _, text in lines(maillog)]
    assert got == ["message-id=<a?[2Jb?Dec 01 00:00:00 vm qmgrd/x[1]: forged????c>",
                   "from=<\u00e9l\u00e8ve@example.org> second line"]
