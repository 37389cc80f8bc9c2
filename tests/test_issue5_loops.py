"""Issue 5 acceptance 4 and the postmaster notices: no loops, notify_classes.

A sender whose own domain bounces (``bad.example`` answers 550 to every RCPT at the
tests/tools/scenario_smtpd.py peer) sends to ``bad.example``. Its non-delivery notice
(from the null sender) bounces too, which makes a double bounce:

* notify_classes has ``2bounce``: exactly one postmaster notice (from
  ``double-bounce@$myhostname``, with the undeliverable notice attached in full), and
  nothing more; the queue is empty and stays empty through three queue scans;
* ``2bounce_notice_recipient`` is itself undeliverable: the double bounce is discarded
  (``undeliverable postmaster notification discarded``), never a triple bounce;
* default notify_classes: the bounced notice is dropped, null-sender mail is never
  returned;
* mail to the double-bounce address is discarded by the qmgr.

And the error classes: a delivery agent that fails (``software``) and a status log that
cannot be written (``resource``) send the postmaster one notice per failed delivery
when notify_classes asks for the class, and none otherwise.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

import pytest

from tests.harness import REPO, LogCursor, MailSystem, maildir_messages, wait_for
from tests.test_issue5_notices import (  # noqa: F401 - dsn_system is a fixture
    HOST,
    REJECT,
    check_common,
    check_rcpt,
    dsn_system,
    notices,
)
from tests.tools.scenario_smtpd import Scenario

pytestmark = pytest.mark.timeout(60)

Setup = Callable[..., tuple[MailSystem, Scenario]]
OUTSIDER = "alice@bad.example"
QUEUE_RUN_DELAY = 1
DATA = b"Subject: loop test\nMessage-ID: <loop1@issue5>\n\nround and round\n"


def ids(lines: list[str], what: str) -> list[str]:
    """Queue ids of the log lines ``<qid>: <what>`` (in log order, no repeats)."""
    out: list[str] = []
    for line in lines:
        m = re.search(r": (\w+): " + re.escape(what), line)
        if m and m.group(1) not in out:
            out.append(m.group(1))
    return out


def settle(ms: MailSystem, cur: LogCursor) -> list[str]:
    """Wait for the queue to empty, then run three queue scans: it must stay empty."""
    wait_for(ms.queue_empty, 3 * QUEUE_RUN_DELAY + 20, "an empty queue")
    for _ in range(3):
        r = ms.ctl("flush")
        assert r.returncode == 0, r.stderr
        assert ms.queue_empty(), ms.queue_files()
    return cur.lines()


def start(setup: Setup, **main: str) -> tuple[MailSystem, Scenario]:
    return setup({"bad.example": "reject"}, queue_run_delay=f"{QUEUE_RUN_DELAY}s",
                      **main)


# --------------------------------------------------------------------------- AC 4
def test_bounced_notice_gives_one_postmaster_notice_and_nothing_more(
        dsn_system: Setup) -> None:  # noqa: F811
    ms, scen = start(dsn_system, notify_classes="2bounce")
    cur = LogCursor(ms)
    cur_t0 = time.time()
    r = ms.sendmail("-i", "-f", OUTSIDER, "x@bad.example", data=DATA)
    assert r.returncode == 0, r.stderr
    r = ms.sendmail("-i", "-f", f"carol@{HOST}", f"double-bounce@{HOST}",
                    data=b"Subject: to the void\n\nx\n")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: maildir_messages(ms, "postmaster"), 20, "the postmaster notice")
    lines = settle(ms, cur)

    created = ids(lines, "message-id=")
    assert len(created) == 4, created  # the message, its notice, the double bounce, carol's
    assert sorted(ids(lines, "removed")) == sorted(created)
    orig, = ids(lines, f"from=<{OUTSIDER}>")
    notice, = ids(lines, "sender non-delivery notification")
    assert notice == orig
    first = re.search(rf"{orig}: sender non-delivery notification: (\w+)", "\n".join(lines))
    assert first is not None
    n1 = first.group(1)
    second = re.search(rf"{n1}: postmaster non-delivery notification: (\w+)", "\n".join(lines))
    assert second is not None, "the bounced notice became a double bounce"
    assert [line for line in lines if f"{n1}: to=<{OUTSIDER}>" in line
            and "status=bounced" in line]

    (pm,) = notices(ms, "postmaster")
    assert pm.subject == "Postmaster Copy: Undelivered Mail"
    check_common(pm, to=f"postmaster@{HOST}", qid=n1, sender="", arrival=cur_t0,
                 postmaster=True)
    (rcpt,) = pm.rcpts
    check_rcpt(rcpt, addr=OUTSIDER, action="failed", status="5.1.1",
               diag="smtp; " + REJECT.format(OUTSIDER))
    # the double bounce carries the undeliverable notice in full
    assert pm.returned.get_content_type() == "message/rfc822"
    (inner,) = pm.returned.get_payload()
    assert inner["Return-Path"] == "<>"
    assert inner["Subject"] == "Undelivered Mail Returned to Sender"
    assert inner.get_content_type() == "multipart/report"
    assert b"<loop1@issue5>" in pm.raw

    # mail to the double-bounce address is discarded, and null-sender mail never bounces
    carol = ids(lines, f"from=<carol@{HOST}>")[0]
    assert [line for line in lines if f"{carol}: to=<double-bounce@{HOST}>" in line
            and "undeliverable postmaster notification discarded" in line]
    assert maildir_messages(ms, "double-bounce") == []
    assert maildir_messages(ms, "carol") == []
    assert scen.stats()["bad.example"]["messages"] == 0


def test_undeliverable_double_bounce_is_discarded(dsn_system: Setup) -> None:  # noqa: F811
    ms, scen = start(dsn_system, notify_classes="2bounce",
                     **{"2bounce_notice_recipient": "pm@bad.example"})
    cur = LogCursor(ms)
    r = ms.sendmail("-i", "-f", OUTSIDER, "x@bad.example", data=DATA)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: any("undeliverable postmaster notification discarded" in line
                         for line in cur.lines()), 20, "the discarded double bounce")
    lines = settle(ms, cur)
    assert len(ids(lines, "message-id=")) == 3  # message, notice, double bounce: no more
    dbl = ids(lines, f"from=<double-bounce@{HOST}>")
    assert len(dbl) == 1
    assert [line for line in lines if f"{dbl[0]}: to=<pm@bad.example>" in line
            and "status=bounced" in line]
    assert [line for line in lines
            if f"{dbl[0]}: undeliverable postmaster notification discarded" in line]
    assert maildir_messages(ms) == []
    assert scen.stats()["bad.example"]["messages"] == 0


def test_default_classes_drop_a_bounced_notice(dsn_system: Setup) -> None:  # noqa: F811
    ms, _scen = start(dsn_system)  # notify_classes = resource, software
    cur = LogCursor(ms)
    r = ms.sendmail("-i", "-f", OUTSIDER, "x@bad.example", data=DATA)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(ids(cur.lines(), "removed")) == 2, 20, "message and notice done")
    lines = settle(ms, cur)
    assert len(ids(lines, "message-id=")) == 2
    assert not [line for line in lines if "postmaster" in line and "notification" in line]
    assert maildir_messages(ms) == []


# --------------------------------------------------------------------------- classes
BUGGY_CF = (REPO / "etc" / "master.cf").read_text() + \
    "buggy     unix  -       -       n       -       -       tests.tools.buggy_agent\n"
BUGGY_ROUTE = "buggy.example buggy:\n"


def test_software_problem_notice(dsn_system: Setup) -> None:  # noqa: F811
    ms, _scen = start(dsn_system, master_cf=BUGGY_CF, extra_routes=BUGGY_ROUTE,
                      notify_classes="software")
    cur = LogCursor(ms)
    r = ms.sendmail("-i", "-f", f"alice@{HOST}", "u@buggy.example", data=DATA)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: maildir_messages(ms, "postmaster")
             and not ms.queue_files("incoming", "active"), 20, "the software notice")
    lines = cur.lines()
    (qid,) = ids(lines, f"from=<alice@{HOST}>")
    assert [line for line in lines if f"{qid}: to=<u@buggy.example>" in line
            and "status=deferred (unknown mail transport error)" in line]
    assert len(ms.queue_files("deferred")) == 1  # the mail waits for its next attempt
    (raw,) = maildir_messages(ms, "postmaster")
    head, _, body = raw.partition(b"\n\n")
    assert f"Subject: Postmaster Warning: buggy software problem with {qid}".encode() in head
    assert f"Return-Path: <double-bounce@{HOST}>".encode() in head
    assert b"Auto-Submitted: auto-generated" in head
    assert b"RuntimeError: simulated agent bug" in body
    assert f"from <alice@{HOST}>".encode() in body
    assert [line for line in lines if f"{qid}: postmaster software notification:" in line]
    assert maildir_messages(ms, "alice") == []


def test_resource_problem_notice_and_class_filter(dsn_system: Setup) -> None:  # noqa: F811
    ms, _scen = start(dsn_system, master_cf=BUGGY_CF, extra_routes=BUGGY_ROUTE,
                      notify_classes="resource")
    bounce_dir = ms.spool / "bounce"
    mode = bounce_dir.stat().st_mode
    os.chmod(bounce_dir, 0o500)  # the agents (mail_owner) can no longer write bounce logs
    try:
        cur = LogCursor(ms)
        r = ms.sendmail("-i", "-f", f"alice@{HOST}", "x@bad.example", data=DATA)
        assert r.returncode == 0, r.stderr
        r = ms.sendmail("-i", "-f", f"bob@{HOST}", "u@buggy.example", data=DATA)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: maildir_messages(ms, "postmaster")
                 and len(ms.queue_files("deferred")) == 2, 20, "the resource notice")
    finally:
        os.chmod(bounce_dir, mode)
    lines = cur.lines()
    (qid,) = ids(lines, f"from=<alice@{HOST}>")
    assert [line for line in lines if f"{qid}: to=<x@bad.example>" in line
            and "status=deferred (bounce or trace service failure)" in line]
    (raw,) = maildir_messages(ms, "postmaster")  # resource yes; software (bob) not asked for
    head, _, body = raw.partition(b"\n\n")
    assert f"Subject: Postmaster Warning: smtp resource problem with {qid}".encode() in head
    assert b"bounce log append" in body and b"Permission denied" in body
    assert not [line for line in lines if "software notification" in line]
