"""Issue 5 acceptance 5: the DSN options change the notices as RFC 3461 says.

Five local senders each send to ``bad.example`` (550 on RCPT), ``slow.example`` (450 on
RCPT) and/or ``ok.example`` (accepts) of tests/tools/scenario_smtpd.py, with
delay_warning_time=2s and maximal_queue_lifetime=6s, and the notices in their Maildirs
are compared once the queue is empty (no notice can come after that):

* NOTIFY=NEVER: no notice at all (not for the bounce, the delay or the expiry);
* NOTIFY=SUCCESS,DELAY: a delay warning and a success notice, but no non-delivery
  notice (FAILURE was not asked for), neither now nor on expiry;
* RET=HDRS: the non-delivery notice returns only the headers; so does one for a
  message over bounce_size_limit without RET;
* NOTIFY per recipient (as SMTP gives it): NEVER, FAILURE and none given — only the
  last two are listed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from qmgrd.spool.envelope import DSN_NOTIFY_FAILURE, DSN_NOTIFY_NEVER
from tests.harness import LogCursor, MailSystem, maildir_messages, wait_for
from tests.test_issue5_notices import (  # noqa: F401 - dsn_system is a fixture
    DEFER,
    FAST_RETRY,
    HOST,
    PEER,
    REJECT,
    check_common,
    check_rcpt,
    dsn_system,
    inject_smtp,
    notices,
    returned_headers,
)
from tests.tools.scenario_smtpd import Scenario

pytestmark = pytest.mark.timeout(60)

MSG = b"Subject: dsn %s\nMessage-ID: <%s@issue5>\n\nthe body of %s\n"


def data(tag: str) -> bytes:
    return MSG % (tag.encode(), tag.encode(), tag.encode())


def send(ms: MailSystem, user: str, *args: str, body: bytes | None = None) -> None:
    r = ms.sendmail("-i", "-f", f"{user}@{HOST}", *args, data=body or data(user))
    assert r.returncode == 0, r.stderr


def qid_of(lines: list[str], user: str) -> str:
    for line in lines:
        m = re.search(rf"pickup\[\d+\]: (\w+): uid=\d+ from=<{user}@", line)
        if m:
            return m.group(1)
    raise AssertionError(f"no pickup line for {user}")


def test_notify_and_ret_change_the_notices(
        dsn_system: Callable[..., tuple[MailSystem, Scenario]]) -> None:  # noqa: F811
    ms, scen = dsn_system(PEER, delay_warning_time="2s", maximal_queue_lifetime="6s",
                          bounce_size_limit="2000", **FAST_RETRY)
    cur = LogCursor(ms)
    t0 = time.time()
    three = ["x@bad.example", "y@slow.example", "z@ok.example"]
    send(ms, "never", "-N", "never", *three)
    send(ms, "sd", "-N", "success,delay", *three)
    send(ms, "hdrs", "-R", "hdrs", "x@bad.example")
    big = data("big") + b"".join(b"line %d of a long body\n" % i for i in range(200))
    send(ms, "big", "x@bad.example", body=big)
    mixed = data("mixed")
    qid_mixed = inject_smtp(ms, f"mixed@{HOST}", [("a@bad.example", "", DSN_NOTIFY_NEVER),
                                                  ("b@bad.example", "", DSN_NOTIFY_FAILURE),
                                                  ("c@bad.example", "", 0)], mixed)
    wait_for(lambda: any("status=expired" in line for line in cur.lines())
             and ms.queue_empty(), 40, "both expiries and an empty queue")
    lines = cur.lines()

    # NOTIFY=NEVER: the recipients bounced, deferred and expired, and nobody heard of it
    never = qid_of(lines, "never")
    assert [line for line in lines if f"{never}: to=<x@bad.example>" in line
            and "status=bounced" in line]
    assert [line for line in lines if f"{never}: from=<never@{HOST}>, status=expired" in line]
    assert maildir_messages(ms, "never") == []
    assert not [line for line in lines if f"{never}: sender" in line]

    # NOTIFY=SUCCESS,DELAY: a warning for y, a success notice for z, nothing for x
    sd = qid_of(lines, "sd")
    got = notices(ms, "sd")
    assert sorted(n.subject for n in got) == ["Delayed Mail (still being retried)",
                                              "Successful Mail Delivery Report"]
    for n in got:
        check_common(n, to=f"sd@{HOST}", qid=sd, sender=f"sd@{HOST}",
                     arrival=t0)
        (r,) = n.rcpts
        if n.subject.startswith("Delayed"):
            check_rcpt(r, addr="y@slow.example", action="delayed", status="4.2.0",
                       diag="smtp; " + DEFER)
        else:
            check_rcpt(r, addr="z@ok.example", action="relayed", status="2.0.0",
                       diag="smtp; 250 2.0.0 Ok: queued")
    assert [line for line in lines if f"{sd}: from=<sd@{HOST}>, status=expired" in line]

    # RET=HDRS: headers only
    hdrs = qid_of(lines, "hdrs")
    (n,) = notices(ms, "hdrs")
    check_common(n, to=f"hdrs@{HOST}", qid=hdrs, sender=f"hdrs@{HOST}",
                 arrival=t0)
    check_rcpt(n.rcpts[0], addr="x@bad.example", action="failed", status="5.1.1",
               diag="smtp; " + REJECT.format("x@bad.example"))
    returned_headers(n, data("hdrs"), f"hdrs@{HOST}", "Undelivered Message Headers")
    assert b"the body of hdrs" not in n.raw

    # over bounce_size_limit: headers only although RET was not given
    (n,) = notices(ms, "big")
    returned_headers(n, big, f"big@{HOST}", "Undelivered Message Headers")
    assert b"line 150 of a long body" not in n.raw
    assert len(n.raw) < 2000 + 3000

    # per-recipient NOTIFY: NEVER is left out, FAILURE and "none given" are listed
    (n,) = notices(ms, "mixed")
    check_common(n, to=f"mixed@{HOST}", qid=qid_mixed, sender=f"mixed@{HOST}",
                 arrival=t0)
    assert [r["Final-Recipient"] for r in n.rcpts] == ["rfc822; b@bad.example",
                                                      "rfc822; c@bad.example"]
    assert "a@bad.example" not in n.text
    assert n.returned.get_content_type() == "message/rfc822"  # small, RET not given

    # the default notify_classes (resource, software) send the postmaster nothing
    assert maildir_messages(ms, "postmaster") == []
    assert len(scen.messages("ok.example")) == 2

