"""Issue 6 acceptance 1: Postfix's smtp-source sends 2,000 messages over 10 sessions into
our smtpd; all 2,000 reach Postfix's smtp-sink through our qmgr and smtp agent; the log
has one ``status=sent`` per recipient, and smtpd's log lines are Postfix's (one
``connect from``, ``client=``, ``message-id=`` and ``disconnect from ... commands=`` per
connection/message), so pflogsumm would count 2,000 connections and messages."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter

import pytest

from tests.harness import LogCursor, MakeSystem, require_tool, wait_for
from tests.tools.smtpd_system import smtp, start

pytestmark = pytest.mark.timeout(300)

MESSAGES = 2000
SESSIONS = 10


def test_two_thousand_messages_from_smtp_source_reach_smtp_sink(mailsys: MakeSystem,
                                                                   peers) -> None:
    source = require_tool("smtp-source")
    sink = peers.sink()
    ms, port = start(mailsys, {"relayhost": f"[127.0.0.1]:{sink.port}"})
    cursor = LogCursor(ms)
    t0 = time.monotonic()
    r = subprocess.run([source, "-s", str(SESSIONS), "-m", str(MESSAGES), "-l", "1000", "-N",
                        "-M", "source.test.example", "-f", "alice@source.test.example",
                        "-t", "bob@sink.test.example", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=240, check=False)
    accepted = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-2000:]

    def sent() -> int:
        return sum("status=sent" in text for _, text in cursor.by("smtp"))

    wait_for(lambda: sent() >= MESSAGES, 240, f"{MESSAGES} status=sent lines", interval=0.5)
    delivered = time.monotonic() - t0
    wait_for(ms.queue_empty, 30, "an empty queue")
    wait_for(lambda: sink.count() >= MESSAGES, 30, f"{MESSAGES} messages at smtp-sink")
    print(f"\nsmtp-source -> smtpd: {MESSAGES / accepted:.0f} msg/s accepted; "
          f"through to smtp-sink: {MESSAGES / delivered:.0f} msg/s")
    smtp_lines = [text for _, text in cursor.by("smtp")]
    rcpts = Counter(m.group(1) for t in smtp_lines
                    if (m := re.match(r"\w+: to=<([^>]+)>, relay=.*status=sent", t)))
    assert len(rcpts) == MESSAGES and set(rcpts.values()) == {1}, rcpts.most_common(3)
    assert all(re.fullmatch(r"\d+bob@sink\.test\.example", a) for a in rcpts)
    assert sink.count() == MESSAGES
    smtpd = [text for _, text in cursor.by("smtpd")]
    assert sum(t == "connect from localhost[127.0.0.1]" for t in smtpd) == MESSAGES
    assert sum(bool(re.fullmatch(r"\w+: client=localhost\[127\.0\.0\.1\]", t))
               for t in smtpd) == MESSAGES
    assert sum(bool(re.fullmatch(r"\w+: message-id=<.+>", t)) for t in smtpd) == MESSAGES
    assert sum(t == "disconnect from localhost[127.0.0.1] helo=1 mail=1 rcpt=1 data=1 "
               "quit=1 commands=5" for t in smtpd) == MESSAGES
    assert not [t for t in smtpd if t.startswith(("warning", "fatal", "panic"))]
    assert "imported after the jail" not in ms.log()


def pflogsumm_counts(report: str) -> dict[str, int]:
    """"N  label" lines of pflogsumm's Grand Totals and smtpd sections."""
    head = report.split("Per-Hour Traffic Summary", 1)[0]
    return {m.group(2): int(m.group(1))
            for m in re.finditer(r"^\s+(\d+)\s+([a-z][a-z ]*?)\s*$", head, re.MULTILINE)}


def test_pflogsumm_counts_connections_and_messages(mailsys: MakeSystem, peers) -> None:
    """pflogsumm (with --smtpd-stats) over our log counts smtpd's connections and the
    messages received: it pairs "connect from" with "disconnect from" by pid, which works
    because an smtpd process serves one client at a time."""
    pflogsumm = require_tool("pflogsumm")
    source = require_tool("smtp-source")
    sink = peers.sink()
    ms, port = start(mailsys, {"relayhost": f"[127.0.0.1]:{sink.port}"})
    r = subprocess.run([source, "-s", "5", "-m", "300", "-l", "1000", "-N",
                        "-f", "alice@source.test.example", "-t", "bob@sink.test.example",
                        f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    wait_for(lambda: ms.log().count("status=sent") >= 300, 120, "300 deliveries")
    p = subprocess.run([pflogsumm, "--smtpd-stats", "--syslog-name=qmgrd", str(ms.maillog)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    got = pflogsumm_counts(p.stdout)
    assert got["received"] == 300 and got["delivered"] == 300, p.stdout
    assert got["connections"] == 301, p.stdout  # and start()'s probe


@pytest.mark.parametrize("busy_sessions, processes", [("1", 3), ("3", 1)])
def test_smtpd_process_busy_sessions(mailsys: MakeSystem, peers, busy_sessions: str,
                                     processes: int) -> None:
    """Three clients at once: one smtpd process each with smtpd_process_busy_sessions =
    1 (Postfix's model); one process for all three with 3, each session in a thread of
    its own. Either way the three sessions log under three numbers, each session's
    lines under one (pflogsumm's --smtpd-stats pairs them by it), and with threads the
    numbers are the process's task ids. Every message is queued."""
    sink = peers.sink()
    ms, port = start(mailsys, {"relayhost": f"[127.0.0.1]:{sink.port}",
                               "smtpd_process_busy_sessions": busy_sessions})
    cursor = LogCursor(ms)
    clients = [smtp(port) for _ in range(3)]  # all three connected before any mails
    for i, client in enumerate(clients):
        client.ehlo()
    smtpds = [p for p in ms.processes() if "127.0.0.1:" in " ".join(p.cmdline())]
    tasks = {t.id: p.pid for p in smtpds for t in p.threads()}
    for i, client in enumerate(clients):
        client.sendmail("alice@source.test.example", [f"bob{i}@sink.test.example"],
                        f"Subject: {i}\r\n\r\nbody {i}\r\n")
    for client in clients:
        client.quit()
    wait_for(lambda: sink.count() >= 3, 30, "3 messages at smtp-sink")
    lines = cursor.lines()
    ids = {m.group(1) for t in lines if (m := re.search(r"/smtpd\[(\d+)\]: connect from ", t))}
    assert len(ids) == 3, ids
    assert {int(i) for i in ids} <= set(tasks), (ids, tasks)
    assert len({tasks[int(i)] for i in ids}) == processes, (ids, tasks)
    for i in ids:  # each session's lines under its number: connect, client=, disconnect
        mine = [t for t in lines if f"/smtpd[{i}]: " in t]
        assert [t for t in mine if "connect from " in t and "disconnect" not in t], mine
        assert sum("client=" in t for t in mine) == 1, mine
        assert sum("disconnect from " in t for t in mine) == 1, mine
