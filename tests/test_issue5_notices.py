"""Issue 5 acceptance: the notices senders and postmasters get (RFC 3461-3464).

One qmgrd instance (tests.harness.MailSystem) sends to tests/tools/scenario_smtpd.py,
one behaviour per domain: ``bad.example`` rejects every RCPT (550 5.1.1), ``slow.example``
defers every RCPT (450 4.2.0), ``ok.example`` accepts. With delay_warning_time=3s and
maximal_queue_lifetime=9s, and ``notify_classes = bounce, delay, ...``, three messages
run once for the whole module:

* alice sends the corpus' multipart message to one recipient of each domain (ENVID set):
  one non-delivery notice at once, one delay warning later, and on expiry one final
  non-delivery notice naming the deferred recipient with its last reason (acceptance 3);
* bob's message enters through cleanup as smtpd would hand it over, with an ORCPT;
* carol asks NOTIFY=SUCCESS for a remote and a local recipient.

Every notice is parsed with the standard ``email`` package and its fields are checked
against the failure that caused it (acceptance 1); ``flufl.bounce`` finds exactly the
failed addresses in the non-delivery notices (acceptance 2). The postmaster gets the
copies that notify_classes ``bounce`` and ``delay`` ask for.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path

import pytest
from flufl.bounce import all_failures, scan_message

from tests.harness import CORPUS, PY, LogCursor, MailSystem, maildir_messages, wait_for
from tests.tools.scenario_smtpd import Scenario

pytestmark = pytest.mark.timeout(90)

HOST = "mail.test.example"
ALICE, BOB, CAROL = (f"{u}@{HOST}" for u in ("alice", "bob", "carol"))
REJECT = "550 5.1.1 <{}>: Recipient address rejected: User unknown"
DEFER = "450 4.2.0 try again later"
PEER = {"bad.example": "reject", "slow.example": "defer", "ok.example": "accept"}
FAST_RETRY = {"minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
              "queue_run_delay": "1s"}


# --------------------------------------------------------------------------- helpers
def start_system(root: Path, behaviours: dict[str, str], master_cf: str | None = None,
                 extra_routes: str = "", **main: str) -> tuple[MailSystem, Scenario]:
    """A started MailSystem under ``root`` whose transport_maps route each domain of
    ``behaviours`` to its scenario_smtpd port (plus the ``extra_routes`` lines)."""
    scen = Scenario(root / "peer", behaviours)
    ms = MailSystem(root / "ms", main=main, master_cf=master_cf)
    os.chmod(ms.root, 0o755)
    table = ms.etc / "transport"
    table.write_text(scen.transport_lines() + extra_routes)
    ms.write_main(transport_maps=f"texthash:{table}")
    try:
        ms.start()
    except BaseException:
        ms.stop(check=False)
        scen.stop()
        raise
    return ms, scen


@pytest.fixture
def dsn_system() -> Iterator[Callable[..., tuple[MailSystem, Scenario]]]:
    """setup(behaviours, master_cf=None, extra_routes="", **main) -> (started MailSystem,
    Scenario); both stopped at teardown."""
    base = Path(tempfile.mkdtemp(prefix="qmgrd-i5-"))
    os.chmod(base, 0o755)
    made: list[tuple[MailSystem, Scenario]] = []

    def setup(behaviours: dict[str, str], master_cf: str | None = None,
              extra_routes: str = "", **main: str) -> tuple[MailSystem, Scenario]:
        pair = start_system(base / f"s{len(made)}", behaviours, master_cf, extra_routes,
                            **main)
        made.append(pair)
        return pair

    yield setup
    for ms, scen in made:
        ms.stop(check=False)
        scen.stop()
    shutil.rmtree(base, ignore_errors=True)


_INJECT = r"""
import json, os, sys
from master.config import Config
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.queue import Spool
spec = json.loads(sys.stdin.buffer.readline())
data = sys.stdin.buffer.read()
cfg = Config.load(spec["etc"])
spool = Spool.from_config(cfg)
cleanup = Cleanup(cfg, spool)
env = Envelope(spec["sender"], [Recipient(a, dsn_orcpt=o, notify=n) for a, o, n in spec["rcpts"]],
               ret=spec["ret"], envid=spec["envid"])
if os.geteuid() == 0:   # write the queue file as the queue's owner, as cleanup would
    st = os.stat(spool.queue_path("incoming"))
    os.setegid(st.st_gid)
    os.seteuid(st.st_uid)
print(cleanup.submit(env, data, origin="smtp"))
"""


def inject_smtp(ms: MailSystem, sender: str, rcpts: list[tuple[str, str, int]], data: bytes,
                *, envid: str = "", ret: int = 0) -> str:
    """Queue a message through cleanup with per-recipient ORCPT and NOTIFY, the way
    smtpd hands mail over (qmgr-sendmail has no ORCPT). Returns the queue id."""
    spec = {"etc": str(ms.etc), "sender": sender, "rcpts": rcpts, "envid": envid, "ret": ret}
    r = subprocess.run([PY, "-c", _INJECT], input=json.dumps(spec).encode() + b"\n" + data,
                       capture_output=True, env=ms.env, timeout=30, check=False)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode().strip()


@dataclass
class Notice:
    """A delivered notice, parsed with the standard email package."""

    raw: bytes
    msg: EmailMessage
    text: str                          # the human-readable part
    report: dict[str, str]             # the per-message DSN fields
    rcpts: list[dict[str, str]]        # the per-recipient DSN fields, in order
    returned: Message                  # the third part (message/rfc822 or headers)

    @classmethod
    def parse(cls, raw: bytes) -> Notice:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        assert msg.get_content_type() == "multipart/report", msg.get_content_type()
        assert msg.get_param("report-type") == "delivery-status"
        parts = msg.get_payload()
        assert isinstance(parts, list) and len(parts) == 3, parts
        text_part, ds, returned = parts
        assert text_part.get_content_type() == "text/plain"
        assert text_part["Content-Description"] == "Notification"
        assert ds.get_content_type() == "message/delivery-status"
        assert ds["Content-Description"] == "Delivery report"
        blocks = ds.get_payload()
        assert isinstance(blocks, list) and len(blocks) >= 2
        fields = [{k: str(v) for k, v in b.items()} for b in blocks]
        return cls(raw, msg, text_part.get_content(), fields[0], fields[1:], returned)

    @property
    def subject(self) -> str:
        return str(self.msg["Subject"])

    def header(self, name: str) -> str:
        return str(self.msg[name])


def notices(ms: MailSystem, user: str) -> list[Notice]:
    return [Notice.parse(b) for b in maildir_messages(ms, user)]


def one(items: list[Notice], subject: str) -> Notice:
    got = [n for n in items if n.subject == subject]
    assert len(got) == 1, [n.subject for n in items]
    return got[0]


def date(value: str) -> float:
    return email.utils.parsedate_to_datetime(value).timestamp()


def check_common(n: Notice, *, to: str, qid: str, sender: str, arrival: float,
                 envid: str = "", postmaster: bool = False) -> None:
    """The fields every notice has, checked against the message it is about."""
    assert f"\nFrom: MAILER-DAEMON@{HOST} (Mail Delivery System)\n".encode() in n.raw
    assert n.header("To") == to
    assert n.header("Auto-Submitted") == ("auto-generated" if postmaster else "auto-replied")
    # the envelope sender: <> for sender notices, double-bounce for postmaster notices
    assert n.header("Return-Path") == (f"<double-bounce@{HOST}>" if postmaster else "<>")
    assert n.msg["Message-ID"], "cleanup adds a Message-ID"
    assert n.report["Reporting-MTA"] == f"dns; {HOST}"
    assert n.report["X-Postfix-Queue-ID"] == qid
    if sender:
        assert n.report["X-Postfix-Sender"] == f"rfc822; {sender}"
    else:  # a double bounce: Postfix has no X-Postfix-Sender for the null sender
        assert "X-Postfix-Sender" not in n.report
    assert abs(date(n.report["Arrival-Date"]) - arrival) < 5, n.report["Arrival-Date"]
    if envid:
        assert n.report["Original-Envelope-Id"] == envid
    else:
        assert "Original-Envelope-Id" not in n.report
    for r in n.rcpts:
        assert date(r["Last-Attempt-Date"]) >= arrival - 1
    if postmaster:
        assert "I'm sorry" not in n.text and "THIS IS A WARNING" not in n.text
    else:
        assert n.text.startswith(f"This is the mail system at host {HOST}.")


def check_rcpt(block: dict[str, str], *, addr: str, action: str, status: str, diag: str,
               remote: bool = True, orig: str | None = None) -> None:
    assert block["Final-Recipient"] == f"rfc822; {addr}"
    assert block["Action"] == action
    assert block["Status"] == status
    assert block["Diagnostic-Code"] == diag
    if remote:
        assert block["Remote-MTA"] == "dns; 127.0.0.1"
    else:
        assert "Remote-MTA" not in block
    if orig is None:
        assert "Original-Recipient" not in block
    else:
        assert block["Original-Recipient"] == orig


def returned_full(n: Notice, original: bytes, sender: str) -> None:
    """The third part is the whole original message (its headers and body intact)."""
    part = n.returned
    assert part.get_content_type() == "message/rfc822"
    assert part["Content-Description"] == "Undelivered Message"
    (inner,) = part.get_payload()
    assert inner["Return-Path"] == f"<{sender}>"
    orig = email.message_from_bytes(original, policy=email.policy.default)
    for name in ("Subject", "Message-ID", "From", "To"):
        assert str(inner[name]) == str(orig[name]), name
    assert [p.get_content_type() for p in inner.walk()] == \
        [p.get_content_type() for p in orig.walk()]
    assert [p.get_payload(decode=True) for p in inner.walk() if not p.is_multipart()] == \
        [p.get_payload(decode=True) for p in orig.walk() if not p.is_multipart()]


def returned_headers(n: Notice, original: bytes, sender: str, description: str) -> None:
    """The third part is only the original headers (text/rfc822-headers)."""
    part = n.returned
    assert part.get_content_type() == "text/rfc822-headers"
    assert part["Content-Description"] == description
    head = part.get_payload(decode=True)
    assert isinstance(head, bytes)
    assert head.startswith(f"Return-Path: <{sender}>\n".encode())
    orig_head, _, body = original.partition(b"\n\n")
    for line in orig_head.split(b"\n")[:6]:
        assert line in head, line
    assert body.strip().split(b"\n")[0] not in head


def flufl(n: Notice) -> tuple[set[bytes], set[bytes]]:
    """(temporary, permanent) failures flufl.bounce finds in the raw notice."""
    msg = email.message_from_bytes(n.raw)
    temporary, permanent = all_failures(msg)
    assert set(scan_message(msg)) == set(permanent)
    return set(temporary), set(permanent)


# --------------------------------------------------------------------------- the run
@dataclass
class Run:
    ms: MailSystem
    scen: Scenario
    t0: float
    qid_alice: str
    qid_bob: str
    qid_carol: str
    original: bytes
    bob_data: bytes
    lines: list[str]


def _qid_of(cur: LogCursor, pattern: str) -> str:
    def find() -> str:
        for line in cur.lines():
            m = re.search(r"pickup\[\d+\]: (\w+): uid=\d+ from=<" + re.escape(pattern) + ">",
                          line)
            if m:
                return m.group(1)
        return ""
    return str(wait_for(find, 20, f"pickup of {pattern}'s message"))


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    base = Path(tempfile.mkdtemp(prefix="qmgrd-i5n-"))
    os.chmod(base, 0o755)
    ms, scen = start_system(
        base, PEER, notify_classes="bounce, delay, resource, software",
        delay_warning_time="3s", maximal_queue_lifetime="9s", bounce_queue_lifetime="9s",
        **FAST_RETRY)
    try:
        cur = LogCursor(ms)
        original = (CORPUS / "02-multipart-attachment.eml").read_bytes()
        t0 = time.time()
        r = ms.sendmail("-i", "-f", ALICE, "-V", "alice-envid-1", "x@bad.example",
                        "y@slow.example", "z@ok.example", data=original)
        assert r.returncode == 0, r.stderr
        bob_data = b"Subject: bob's\nMessage-ID: <bob1@issue5>\nFrom: bob\n\nfrom bob\n"
        qid_bob = inject_smtp(ms, BOB, [("w@bad.example", "rfc822;Original@Example.ORG", 0)],
                              bob_data, envid="bob-envid")
        r = ms.sendmail("-i", "-f", CAROL, "-N", "success", "s@ok.example",
                        f"carol2@{HOST}", data=b"Subject: carol's\n\nhi\n")
        assert r.returncode == 0, r.stderr
        qid_alice = _qid_of(cur, ALICE)
        qid_carol = _qid_of(cur, CAROL)
        wait_for(lambda: len(maildir_messages(ms, "alice")) >= 3 and ms.queue_empty(), 45,
                 "alice's three notices and an empty queue")
        yield Run(ms, scen, t0, qid_alice, qid_bob, qid_carol, original, bob_data,
                  cur.lines())
    finally:
        ms.stop(check=False)
        scen.stop()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- AC 3
def test_three_recipients_give_one_bounce_one_warning_one_expiry(run: Run) -> None:
    got = notices(run.ms, "alice")
    assert sorted(n.subject for n in got) == sorted([
        "Undelivered Mail Returned to Sender", "Undelivered Mail Returned to Sender",
        "Delayed Mail (still being retried)"])
    # the order in the log: the non-delivery notice first, the warning later, the
    # expiry last; exactly one of each (the warning is sent once although the message
    # was retried after the warning time)
    marks = {"sender non-delivery notification": "notice", "sender delay notification":
             "warning", "status=expired": "expired"}
    events = [word for line in run.lines if f"{run.qid_alice}: " in line
              for key, word in marks.items() if key in line]
    assert events == ["notice", "warning", "expired", "notice"], events
    attempts = [line for line in run.lines
                if f"{run.qid_alice}: to=<y@slow.example>" in line and "status=deferred" in line]
    assert len(attempts) >= 3, attempts
    assert [line for line in run.lines if f"{run.qid_alice}: to=<z@ok.example>" in line
            and "status=sent" in line]
    assert len(run.scen.messages("ok.example")) == 2  # z@ok.example and carol's s@ok.example


# --------------------------------------------------------------------------- AC 1
def test_non_delivery_notice_fields(run: Run) -> None:
    bounces = [n for n in notices(run.ms, "alice")
               if n.subject == "Undelivered Mail Returned to Sender"
               and n.rcpts[0]["Final-Recipient"] == "rfc822; x@bad.example"]
    assert len(bounces) == 1
    n = bounces[0]
    check_common(n, to=ALICE, qid=run.qid_alice, sender=ALICE, arrival=run.t0,
                 envid="alice-envid-1")
    assert len(n.rcpts) == 1  # only the failed recipient: not the deferred, not the sent
    check_rcpt(n.rcpts[0], addr="x@bad.example", action="failed", status="5.1.1",
               diag="smtp; " + REJECT.format("x@bad.example"))
    assert ("<x@bad.example>: host 127.0.0.1[127.0.0.1] said: "
            + REJECT.format("x@bad.example") + " (in reply to RCPT TO command)") in n.text
    assert "y@slow.example" not in n.text and "z@ok.example" not in n.text
    orig = email.message_from_bytes(run.original)
    assert n.header("In-Reply-To") == n.header("References") == orig["Message-ID"]
    returned_full(n, run.original, ALICE)
    assert flufl(n) == (set(), {b"x@bad.example"})


def test_delay_warning_fields(run: Run) -> None:
    n = one(notices(run.ms, "alice"), "Delayed Mail (still being retried)")
    check_common(n, to=ALICE, qid=run.qid_alice, sender=ALICE, arrival=run.t0,
                 envid="alice-envid-1")
    assert len(n.rcpts) == 1
    check_rcpt(n.rcpts[0], addr="y@slow.example", action="delayed", status="4.2.0",
               diag="smtp; " + DEFER)
    until = date(n.rcpts[0]["Will-Retry-Until"])
    assert abs(until - (run.t0 + 9)) < 5  # arrival + maximal_queue_lifetime
    assert "THIS IS A WARNING ONLY" in n.text
    assert "for more than 3 second(s)" in n.text and "until it is 9 second(s) old" in n.text
    assert f"<y@slow.example>: host 127.0.0.1[127.0.0.1] said: {DEFER}" in n.text
    # warnings return the headers only (RFC 3461 RET is about failure notices)
    returned_headers(n, run.original, ALICE, "Delayed Message Headers")
    assert flufl(n) == ({b"y@slow.example"}, set())


def test_expiry_notice_names_the_deferred_recipient_with_its_last_reason(run: Run) -> None:
    expiry = [n for n in notices(run.ms, "alice")
              if n.subject == "Undelivered Mail Returned to Sender"
              and n.rcpts[0]["Final-Recipient"] == "rfc822; y@slow.example"]
    assert len(expiry) == 1
    n = expiry[0]
    check_common(n, to=ALICE, qid=run.qid_alice, sender=ALICE, arrival=run.t0,
                 envid="alice-envid-1")
    assert len(n.rcpts) == 1
    # Postfix keeps the last 4.x.x status; the action is "failed"
    check_rcpt(n.rcpts[0], addr="y@slow.example", action="failed", status="4.2.0",
               diag="smtp; " + DEFER)
    assert date(n.rcpts[0]["Last-Attempt-Date"]) >= run.t0 + 9 - 1
    assert f"<y@slow.example>: host 127.0.0.1[127.0.0.1] said: {DEFER}" in n.text
    returned_full(n, run.original, ALICE)
    assert flufl(n) == (set(), {b"y@slow.example"})


def test_orcpt_becomes_original_recipient(run: Run) -> None:
    (n,) = notices(run.ms, "bob")
    assert n.subject == "Undelivered Mail Returned to Sender"
    check_common(n, to=BOB, qid=run.qid_bob, sender=BOB, arrival=run.t0, envid="bob-envid")
    (r,) = n.rcpts
    check_rcpt(r, addr="w@bad.example", action="failed", status="5.1.1",
               diag="smtp; " + REJECT.format("w@bad.example"),
               orig="rfc822;Original@Example.ORG")
    inner = n.returned.get_payload()[0]
    assert inner["Subject"] == "bob's" and inner.get_payload() == "from bob\n"
    # a mailing-list bounce parser reports the address the list knows: the ORCPT
    assert flufl(n) == (set(), {b"Original@Example.ORG"})


def test_success_notice_for_notify_success(run: Run) -> None:
    (n,) = notices(run.ms, "carol")
    assert n.subject == "Successful Mail Delivery Report"
    check_common(n, to=CAROL, qid=run.qid_carol, sender=CAROL, arrival=run.t0)
    by = {r["Final-Recipient"]: r for r in n.rcpts}
    assert set(by) == {"rfc822; s@ok.example", f"rfc822; carol2@{HOST}"}
    check_rcpt(by["rfc822; s@ok.example"], addr="s@ok.example", action="relayed",
               status="2.0.0", diag="smtp; 250 2.0.0 Ok: queued")
    # Postfix trace_append(): "delivery via <relay>: " before the agent's text (the
    # X-Postfix diagnostic is that text; an SMTP server's reply is its own diagnostic)
    check_rcpt(by[f"rfc822; carol2@{HOST}"], addr=f"carol2@{HOST}", action="delivered",
               status="2.0.0", diag="X-Postfix; delivery via local: delivered to maildir",
               remote=False)
    assert "successfully delivered" in n.text
    assert f"<carol2@{HOST}>: delivery via local: delivered to maildir" in n.text
    assert re.search(r"<s@ok\.example>: delivery via \S+\[127\.0\.0\.1\]:\d+: 250 2\.0\.0 "
                     r"Ok: queued", n.text), n.text
    returned_headers(n, b"Subject: carol's\n\nhi\n", CAROL, "Message Headers")
    assert flufl(n) == (set(), set())
    assert maildir_messages(run.ms, "carol2")  # and the mail itself arrived


def test_postmaster_copies_per_notify_classes(run: Run) -> None:
    got = notices(run.ms, "postmaster")
    alice = [n for n in got if n.report["X-Postfix-Queue-ID"] == run.qid_alice]
    bob = [n for n in got if n.report["X-Postfix-Queue-ID"] == run.qid_bob]
    assert len(got) == len(alice) + len(bob)
    # class bounce: a copy of each non-delivery notice; class delay: of the warning
    assert sorted(n.subject for n in alice) == [
        "Postmaster Copy: Undelivered Mail", "Postmaster Copy: Undelivered Mail",
        "Postmaster Warning: Delayed Mail"]
    assert [n.subject for n in bob] == ["Postmaster Copy: Undelivered Mail"]
    for n in alice:
        check_common(n, to=f"postmaster@{HOST}", qid=run.qid_alice, sender=ALICE,
                     arrival=run.t0, envid="alice-envid-1", postmaster=True)
        # postmaster copies carry the headers only
        returned_headers(n, run.original, ALICE, "Undelivered Message Headers"
                         if "Undelivered" in n.subject else "Delayed Message Headers")
    by_rcpt = {(n.subject, n.rcpts[0]["Final-Recipient"]) for n in alice}
    assert by_rcpt == {("Postmaster Copy: Undelivered Mail", "rfc822; x@bad.example"),
                       ("Postmaster Copy: Undelivered Mail", "rfc822; y@slow.example"),
                       ("Postmaster Warning: Delayed Mail", "rfc822; y@slow.example")}
    log = "\n".join(run.lines)
    assert f"{run.qid_alice}: postmaster non-delivery notification:" in log
    assert f"{run.qid_alice}: postmaster delay notification:" in log


def test_every_notice_went_out_with_the_null_sender(run: Run) -> None:
    created = [line for line in run.lines if "notification: " in line]
    assert len(created) == 3 + 1 + 1 + 4  # alice, bob, carol, postmaster copies
    froms = re.findall(r"qmgr\[\d+\]: \w+: from=<([^>]*)>", "\n".join(run.lines))
    assert sorted(set(froms)) == sorted({"", ALICE, BOB, CAROL, f"double-bounce@{HOST}"})
    assert not [line for line in run.lines if ": warning: " in line]
