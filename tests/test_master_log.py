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


def test_a_thread_logs_under_its_own_task_id(maillog: Path) -> None:
    """A line logged in a thread (an smtpd session thread) carries that thread's task
    id, the main thread's the process id: two sessions at once never share a number."""
    import threading

    got: dict[str, int] = {}

    def worker() -> None:
        got["tid"] = threading.get_native_id()
        log.info("thread")

    log.info("main")
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert got["tid"] != os.getpid()
    assert {text: p for _, p, text in lines(maillog)} == {"main": os.getpid(),
                                                          "thread": got["tid"]}


def test_syslog_lines_carry_the_task_id_in_the_ident(monkeypatch: pytest.MonkeyPatch) -> None:
    """With syslog (maillog_file empty) the ident is "<tag>[<id>]" without LOG_PID, set
    again when another thread logs, so syslog shows the same numbers as the file."""
    import syslog
    import threading

    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(log.syslog, "openlog",
                        lambda ident, opt, fac: calls.append(("open", (ident, opt, fac))))
    monkeypatch.setattr(log.syslog, "syslog", lambda prio, text: calls.append(("log", text)))
    monkeypatch.setattr(log.syslog, "closelog", lambda: None)
    log.setup("smtpd", "", "qmgrd")
    try:
        log.info("one")
        log.info("two")
        tid: list[int] = []

        def worker() -> None:
            tid.append(threading.get_native_id())
            log.info("three")

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        log.info("four")
    finally:
        log.close()
    pid = os.getpid()
    opened = (syslog.LOG_NDELAY, syslog.LOG_MAIL)
    assert calls == [("open", (f"qmgrd/smtpd[{pid}]", *opened)), ("log", "one"), ("log", "two"),
                     ("open", (f"qmgrd/smtpd[{tid[0]}]", *opened)), ("log", "three"),
                     ("open", (f"qmgrd/smtpd[{pid}]", *opened)), ("log", "four")]
