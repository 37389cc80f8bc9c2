"""Issue 5, in-process: the bounce service's rules, the notice format, error notices, and
the qmgr asking for success notices.

* BounceService.handle() on a real spool (tests/test_agent_support.make_env): who gets
  which notice for the null sender, the double-bounce sender, NOTIFY=NEVER with a
  postmaster copy, WARN keeping the log, a failing cleanup (status 1, log kept) and a
  failing postmaster copy (a warning only);
* build_notice(): SMTPUTF8 notices (message/global-delivery-status, utf-8 address types,
  raw UTF-8, no RFC 2047 words), long diagnostics not folded, Postfix's ``(expanded from
  <...>)``;
* transports.notify.error_notice(): the class filter and no notices about notices;
* the qmgr's completion step asks the ``trace`` service for a success notice when a
  trace log exists, and keeps the message deferred when that fails.
"""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from master import log
from qmgrd.delivery import (
    BOUNCE_CMD_FLUSH,
    BOUNCE_CMD_TRACE,
    BOUNCE_CMD_WARN,
    DeliverRequest,
    StatusRequest,
    encode,
    read_lists,
)
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import CleanupError
from qmgrd.spool.envelope import DSN_NOTIFY_NEVER, DSN_NOTIFY_SUCCESS, Envelope, Recipient
from qmgrd.spool.message import QueueFile
from tests.test_agent_support import Env, make_env
from tests.test_qmgr_scheduler import Env as QEnv
from tests.test_qmgr_scheduler import drain, run
from transports import notify
from transports.bounce import BounceService, build_notice

HOST = "mail.test.example"
MAIL_OWNER = "qmgrd"  # the account tests/conftest.py makes sure of
DSN = statuslog.Dsn("5.1.1", "failed", "host mx said: 550 5.1.1 unknown", "smtp",
                    "550 5.1.1 unknown", "dns", "mx.example.net")
CONTENT = b"Subject: original\r\nMessage-ID: <orig@issue5>\r\n\r\nthe body\r\n"


@pytest.fixture(autouse=True)
def _close_log() -> Iterator[None]:
    yield
    log.close()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path, notify_classes="bounce, 2bounce, delay")


def service(env: Env, name: str = "bounce") -> BounceService:
    return BounceService(env.ctx(name))


def request(qid: str, sender: str, nrequest: int = BOUNCE_CMD_FLUSH, ret: int = 0) -> StatusRequest:
    return StatusRequest(nrequest=nrequest, queue_name="active", queue_id=qid, sender=sender,
                         ret_flags=ret)


def bounced(env: Env, rcpts: list[Recipient], sender: str = "alice@example.com",
            logname: str = "bounce") -> str:
    qid = env.queue(rcpts, CONTENT, sender=sender)
    with QueueFile.open(env.spool, "active", qid, lock=None, readonly=True) as qf:
        offsets = {r.address: r.offset for r in qf.recipients}
    for r in rcpts:
        r.offset = offsets[r.address]
        statuslog.append(env.spool, logname, qid, r, DSN)
    return qid


def queued(env: Env) -> list[tuple[str, list[str], EmailMessage]]:
    """(sender, recipients, parsed content) of each message cleanup put in incoming/."""
    out = []
    for qid in sorted(env.spool.scan("incoming")):
        with QueueFile.open(env.spool, "incoming", qid, lock=None, readonly=True) as qf:
            data = b"\n".join(qf.iter_lines()) + b"\n"
            rcpts = [r.address for r in qf.recipients]
            sender = qf.sender
        msg = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        out.append((sender, rcpts, msg))
    return out


def dsn_rcpts(msg: EmailMessage) -> list[str]:
    ds = msg.get_payload()[1]
    return [str(b["Final-Recipient"]) for b in ds.get_payload()[1:]]


# --------------------------------------------------------------------------- the service
def test_null_sender_default_classes_drop_the_notice(tmp_path: Path) -> None:
    env = make_env(tmp_path)  # notify_classes = resource, software
    qid = bounced(env, [Recipient("x@example.net")], sender="")
    assert service(env).handle(request(qid, "")) == 0
    assert queued(env) == []
    assert statuslog.read(env.spool, "bounce", qid) == []  # the log is gone


def test_double_bounce_goes_to_2bounce_recipient_in_full(env: Env) -> None:
    rcpts = [Recipient("x@example.net", notify=DSN_NOTIFY_NEVER), Recipient("y@example.net")]
    qid = bounced(env, rcpts, sender="")
    assert service(env).handle(request(qid, "")) == 0
    ((sender, to, msg),) = queued(env)
    assert (sender, to) == (f"double-bounce@{HOST}", [f"postmaster@{HOST}"])
    assert msg["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert msg["Auto-Submitted"] == "auto-generated"
    # NOTIFY does not apply to the postmaster: both recipients are listed
    assert dsn_rcpts(msg) == ["rfc822; x@example.net", "rfc822; y@example.net"]
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert "the body" in returned.as_string()
    assert f"{qid}: postmaster non-delivery notification:" in env.log()


def test_notice_to_the_double_bounce_sender_is_discarded(env: Env) -> None:
    qid = bounced(env, [Recipient(f"postmaster@{HOST}")], sender=f"double-bounce@{HOST}")
    assert service(env).handle(request(qid, f"double-bounce@{HOST}")) == 0
    assert queued(env) == []
    assert f"warning: {qid}: undeliverable postmaster notification discarded" in env.log()


def test_notify_never_still_gets_the_postmaster_copy(env: Env) -> None:
    qid = bounced(env, [Recipient("x@example.net", notify=DSN_NOTIFY_NEVER)])
    assert service(env).handle(request(qid, "alice@example.com")) == 0
    ((sender, to, msg),) = queued(env)  # no sender notice, the class-bounce copy only
    assert (sender, to) == (f"double-bounce@{HOST}", [f"postmaster@{HOST}"])
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert "the body" not in msg.as_string()
    assert "sender non-delivery" not in env.log()


def test_warning_keeps_the_defer_log(env: Env) -> None:
    qid = bounced(env, [Recipient("x@example.net")], logname="defer")
    assert service(env, "defer").handle(request(qid, "alice@example.com",
                                                BOUNCE_CMD_WARN)) == 0
    assert len(statuslog.read(env.spool, "defer", qid)) == 1
    subjects = sorted(str(m["Subject"]) for _, _, m in queued(env))
    assert subjects == ["Delayed Mail (still being retried)",
                        "Postmaster Warning: Delayed Mail"]
    assert service(env, "defer").handle(request(qid, "alice@example.com")) == 0
    assert statuslog.read(env.spool, "defer", qid) == []  # expiry: the log is used up


def test_expiry_reports_each_recipient_once_with_its_last_reason(env: Env) -> None:
    qid = env.queue([Recipient("x@example.net"), Recipient("y@example.net")], CONTENT)
    with QueueFile.open(env.spool, "active", qid, lock=None, readonly=True) as qf:
        x, y = qf.recipients
    for rcpt, reason in ((x, "first try"), (y, "only try"), (x, "second try")):
        statuslog.append(env.spool, "defer", qid, rcpt,
                         statuslog.Dsn("4.4.1", "delayed", reason))
    assert service(env, "defer").handle(request(qid, "alice@example.com")) == 0
    (msg,) = [m for s, _, m in queued(env) if s == ""]
    assert dsn_rcpts(msg) == ["rfc822; x@example.net", "rfc822; y@example.net"]
    blocks = msg.get_payload()[1].get_payload()[1:]
    assert [str(b["Diagnostic-Code"]) for b in blocks] == ["X-Postfix; second try",
                                                           "X-Postfix; only try"]
    assert [str(b["Action"]) for b in blocks] == ["failed", "failed"]
    assert "first try" not in msg.get_payload()[0].get_content()



def test_expiry_without_a_defer_log_still_returns_the_message(env: Env) -> None:
    """The message expired but its defer log is missing (never written, or lost): as
    Postfix's bounce service, the non-delivery notice is sent all the same, with
    '--- Delivery report unavailable ---' in place of the recipients and no
    per-recipient delivery-status fields; the postmaster copy (class bounce) too."""
    qid = env.queue([Recipient("x@example.net")], CONTENT)
    assert statuslog.read_existing(env.spool, "defer", qid) is None
    assert service(env, "defer").handle(request(qid, "alice@example.com")) == 0
    notices = {sender: (to, msg) for sender, to, msg in queued(env)}
    to, msg = notices[""]
    assert to == ["alice@example.com"]
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    text = msg.get_payload()[0].get_content()
    assert text.endswith("The mail system\n\n\t--- Delivery report unavailable ---\n")
    status_blocks = msg.get_payload()[1].get_payload()
    assert len(status_blocks) == 1  # the per-message fields only
    assert str(status_blocks[0]["X-Postfix-Queue-ID"]) == qid
    assert "the body" in msg.get_payload()[2].as_string()
    to, copy = notices[f"double-bounce@{HOST}"]
    assert to == [f"postmaster@{HOST}"]
    assert "--- Delivery report unavailable ---" in copy.get_payload()[0].get_content()
    assert f"{qid}: sender non-delivery notification:" in env.log()


def test_an_empty_log_or_a_warning_without_a_log_sends_nothing(env: Env) -> None:
    """Postfix sends the "unavailable" notice for a missing log only, and only a
    non-delivery notice: an empty log has no recipient to report (no notice, the log
    is removed), and a delay warning without a log is not sent."""
    qid = env.queue([Recipient("x@example.net")], CONTENT)
    assert service(env, "defer").handle(request(qid, "alice@example.com",
                                                BOUNCE_CMD_WARN)) == 0
    Path(env.spool.path("defer", qid)).parent.mkdir(parents=True, exist_ok=True)
    Path(env.spool.path("defer", qid)).write_bytes(b"")
    assert service(env, "defer").handle(request(qid, "alice@example.com")) == 0
    assert queued(env) == []
    assert statuslog.read_existing(env.spool, "defer", qid) is None


def test_success_notice_only_for_a_real_sender(tmp_path: Path) -> None:
    # without class 2bounce ("bounce" does not imply it here: bounce_trace_service)
    env = make_env(tmp_path, notify_classes="bounce, delay")
    ok = statuslog.Dsn("2.0.0", "relayed", "250 ok", "smtp", "250 ok", "dns", "mx")
    for sender in ("", f"double-bounce@{HOST}", "alice@example.com"):
        qid = env.queue([Recipient("x@example.net", notify=DSN_NOTIFY_SUCCESS)], CONTENT,
                        sender=sender)
        statuslog.append(env.spool, "trace", qid, Recipient("x@example.net"), ok)
        assert service(env, "trace").handle(request(qid, sender, BOUNCE_CMD_TRACE)) == 0
        assert statuslog.read(env.spool, "trace", qid) == []
    ((sender, to, msg),) = queued(env)
    assert (sender, to) == ("", ["alice@example.com"])
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert "not sending trace/success notification for single-bounce message" in env.log()
    assert "not sending trace/success notification for double-bounce message" in env.log()


def test_success_notice_for_null_sender_mail_goes_to_2bounce_recipient(env: Env) -> None:
    """Postfix's bounce_trace_service: with class 2bounce the success notice of a
    null-sender message goes to 2bounce_notice_recipient from the double-bounce address
    (the sender's notice otherwise: its subject and text, the headers returned)."""
    ok = statuslog.Dsn("2.0.0", "relayed", "250 ok", "smtp", "250 ok", "dns", "mx")
    qid = env.queue([Recipient("x@example.net", notify=DSN_NOTIFY_SUCCESS)], CONTENT,
                    sender="")
    statuslog.append(env.spool, "trace", qid, Recipient("x@example.net"), ok)
    assert service(env, "trace").handle(request(qid, "", BOUNCE_CMD_TRACE)) == 0
    assert statuslog.read(env.spool, "trace", qid) == []
    ((sender, to, msg),) = queued(env)
    assert (sender, to) == (f"double-bounce@{HOST}", [f"postmaster@{HOST}"])
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert dsn_rcpts(msg) == ["rfc822; x@example.net"]
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert f"{qid}: sender delivery status notification:" in env.log()


def serve(svc: BounceService, env: Env, req: StatusRequest) -> int:
    client, server = socket.socketpair()
    with client, server:
        client.sendall(encode(req.to_attrs()))
        svc.serve(server, env.ctx())
        client.settimeout(5)
        greeting, reply = read_lists(client, 2)
    assert greeting == [("protocol", "delivery_status_protocol")]
    assert reply[0][0] == "status"
    return int(reply[0][1])


def test_cleanup_failure_keeps_the_log_and_answers_failure(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    qid = bounced(env, [Recipient("x@example.net")])
    svc = service(env)

    def refuse(env_: Envelope, data: bytes, **kw: object) -> str:
        raise CleanupError("4.3.0", "queue file write error: No space left on device")

    monkeypatch.setattr(svc.cleanup, "submit", refuse)
    assert serve(svc, env, request(qid, "alice@example.com")) == 1
    assert len(statuslog.read(env.spool, "bounce", qid)) == 1
    assert "cannot send notice" in env.log()


def test_failed_postmaster_copy_is_only_a_warning(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    qid = bounced(env, [Recipient("x@example.net")])
    svc = service(env)
    real = svc.cleanup.submit

    def only_senders(env_: Envelope, data: bytes, **kw: object) -> str:
        if env_.sender:
            raise CleanupError("4.3.0", "queue file write error")
        return real(env_, data, origin="bounce")

    monkeypatch.setattr(svc.cleanup, "submit", only_senders)
    assert serve(svc, env, request(qid, "alice@example.com")) == 0
    ((sender, to, _msg),) = queued(env)
    assert (sender, to) == ("", ["alice@example.com"])
    # Postfix's line (bounce_notify_service), after the reason
    assert f"warning: {qid}: cannot post the postmaster failed notice: " in env.log()
    assert (f"warning: {qid}: postmaster notice failed while bouncing to alice@example.com\n"
            in env.log())
    assert statuslog.read(env.spool, "bounce", qid) == []


def test_bad_requests_are_refused(env: Env) -> None:
    svc = service(env)
    assert svc.handle(request("../etc", "a@b")) == 1
    assert svc.handle(StatusRequest(nrequest=BOUNCE_CMD_FLUSH, queue_name="corrupt",
                                    queue_id="4jcrPw3lnBzJJJk", sender="a@b")) == 1
    assert svc.handle(StatusRequest(nrequest=9, queue_name="active",
                                    queue_id="4jcrPw3lnBzJJJk", sender="a@b")) == 1


# --------------------------------------------------------------------------- the format
def test_smtputf8_notice_is_raw_utf8_global_delivery_status() -> None:
    rcpt = Recipient("j\u00f6rg@b\u00fccher.example")
    long_diag = "550 5.1.1 " + "x" * 300
    dsn = statuslog.Dsn("5.1.1", "failed", "rejected", "smtp", long_diag, "dns", "mx")
    raw = build_notice(kind="failed", myhostname=HOST, qid="ABC", sender="s\u00e9@x.example",
                       to="s\u00e9@x.example", arrival=time.time(), entries=[(rcpt, dsn)],
                       original="Subject: h\u00e9\n\nb\u00e9\n".encode(), headers_only=False,
                       smtputf8=True)
    assert b"=?utf-8?" not in raw
    assert "To: s\u00e9@x.example\n".encode() in raw
    assert f"Diagnostic-Code: smtp; {long_diag}\n".encode() in raw  # not folded
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    types = [p.get_content_type() for p in msg.get_payload()]
    assert types == ["text/plain", "message/global-delivery-status", "message/global"]
    text = msg.get_payload()[0].get_content()
    assert "<j\u00f6rg@b\u00fccher.example>: rejected" in text
    assert "Final-Recipient: utf-8; j\u00f6rg@b\u00fccher.example\n".encode() in raw
    assert "X-Postfix-Sender: utf-8; s\u00e9@x.example\n".encode() in raw


def test_smtputf8_notice_types_ascii_addresses_rfc822() -> None:
    """Postfix ("Fix 20140708"): the "utf-8" address type only for a non-ASCII address;
    an ASCII address in an SMTPUTF8 notice stays "rfc822"."""
    rcpt = Recipient("user@example.net", orig_rcpt="alias@example.net")
    raw = build_notice(kind="failed", myhostname=HOST, qid="ABC", sender="a@x.example",
                       to="a@x.example", arrival=time.time(), entries=[(rcpt, DSN)],
                       original=b"Subject: s\n\nb\n", headers_only=False, smtputf8=True)
    assert b"X-Postfix-Sender: rfc822; a@x.example\n" in raw
    assert b"Final-Recipient: rfc822; user@example.net\n" in raw
    assert b"Original-Recipient: rfc822; alias@example.net\n" in raw
    assert b"utf-8;" not in raw


@pytest.mark.parametrize("smtputf8", [False, True])
def test_returned_message_is_the_original_byte_for_byte(smtputf8: bool) -> None:
    """The returned message is copied, not parsed and regenerated (Postfix's
    bounce_original() copies the queue file's records): a body line "From ..." stays
    as it is (not ">From ..."), a lone CR stays, 8-bit bytes stay."""
    original = (b"Subject: s\nMessage-ID: <m@x>\n\nFrom the start of a line\n"
                b"a lone\rCR\n8bit \xe9\xff\n")
    raw = build_notice(kind="failed", myhostname=HOST, qid="ABC", sender="a@x.example",
                       to="a@x.example", arrival=time.time(), entries=[(Recipient("r@y"), DSN)],
                       original=original, headers_only=False, smtputf8=smtputf8)
    assert b"\nReturn-Path: <a@x.example>\n" + original + b"\n--" in raw
    assert b">From" not in raw
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == ("message/global" if smtputf8 else "message/rfc822")
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert returned.get_payload()[0]["Message-ID"] == "<m@x>"


def test_double_bounce_has_no_x_postfix_sender() -> None:
    """Postfix's bounce_header_dsn() writes X-Postfix-Sender only for a non-null sender:
    a double bounce has none (not an empty "rfc822; ")."""
    def report(sender: str) -> str:
        raw = build_notice(kind="failed", myhostname=HOST, qid="ABC", sender=sender,
                           to=f"postmaster@{HOST}", arrival=time.time(),
                           entries=[(Recipient("r@y.example"), DSN)],
                           original=b"Subject: s\n\nb\n", headers_only=False,
                           postmaster_copy=True, boilerplate=False)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        return msg.get_payload()[1].get_payload()[0].as_string()

    assert "X-Postfix-Sender: rfc822; a@x.example\n" in report("a@x.example")
    null = report("")
    assert "X-Postfix-Sender" not in null
    assert "X-Postfix-Queue-ID: ABC\nArrival-Date: " in null


@pytest.mark.parametrize("smtputf8, ctype", [(False, "text/rfc822-headers"),
                                             (True, "message/global-headers")])
def test_returned_headers_type_and_8bit(smtputf8: bool, ctype: str) -> None:
    """Headers only: text/rfc822-headers (RFC 6522), message/global-headers for SMTPUTF8
    mail (RFC 6533 section 6.3, Postfix's bounce_original()); 8-bit header bytes are
    declared ``Content-Transfer-Encoding: 8bit``, the headers returned as they are."""
    head = "Subject: h\u00e9\nMessage-ID: <m@x>\n".encode()
    raw = build_notice(kind="failed", myhostname=HOST, qid="ABC", sender="a@x.example",
                       to="a@x.example", arrival=time.time(), entries=[(Recipient("r@y"), DSN)],
                       original=head + b"\nbody\n", headers_only=True, smtputf8=smtputf8)
    assert b"\nReturn-Path: <a@x.example>\n" + head in raw
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == ctype
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert b"body" not in raw


def test_expanded_from_and_original_recipient() -> None:
    rcpt = Recipient("real@example.net", orig_rcpt="alias@example.org")
    raw = build_notice(kind="failed", myhostname=HOST, qid="ABC", sender="a@x.example",
                       to="a@x.example", arrival=time.time(), entries=[(rcpt, DSN)],
                       original=b"Subject: s\n\nb\n", headers_only=True)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    text = msg.get_payload()[0].get_content()
    assert f"<real@example.net> (expanded from <alias@example.org>): {DSN.reason}" in text
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Original-Recipient"] == "rfc822; alias@example.org"


# --------------------------------------------------------------------------- error notices
def test_error_notice_classes_and_no_notice_about_notices(tmp_path: Path) -> None:
    env = make_env(tmp_path, notify_classes="software")
    kw = {"service": "smtp", "qid": "ABC", "text": "boom"}
    assert notify.error_notice(env.cfg, env.spool, "resource", sender="a@b", **kw) == ""
    assert notify.error_notice(env.cfg, env.spool, "software",
                               sender=f"double-bounce@{HOST}", **kw) == ""
    new = notify.error_notice(env.cfg, env.spool, "software", sender="a@b", **kw)
    assert new
    ((sender, to, msg),) = queued(env)
    assert (sender, to) == (f"double-bounce@{HOST}", [f"postmaster@{HOST}"])
    assert msg["Subject"] == "Postmaster Warning: smtp software problem with ABC"
    assert "    boom" in msg.get_content()


# --------------------------------------------------------------------------- the qmgr
def test_qmgr_asks_the_trace_service_for_success_notices(tmp_path: Path) -> None:
    env = QEnv(tmp_path)
    asked: list[tuple[str, int, str]] = []
    ok = [True]

    def traced(transport: str, req: DeliverRequest) -> None:
        for r in req.recipients:
            statuslog.append(env.spool, "trace", req.queue_id, Recipient(r.address),
                             statuslog.Dsn("2.0.0", "delivered", "delivered"))

    async def status_request(svc: str, req: StatusRequest) -> bool:
        asked.append((svc, req.nrequest, req.queue_id))
        return ok[0]

    env.agents.on_deliver = traced
    env.agents.status_request = status_request  # type: ignore[method-assign]
    first = env.submit("a@x.example", ["r@d.example"])

    async def go() -> None:
        sched = env.sched()
        sched.startup()
        await drain(sched)

    run(go())
    assert asked == [("trace", BOUNCE_CMD_TRACE, first)]
    assert env.files("active") == [] and env.files("deferred") == []  # finished
    assert not Path(env.spool.path("trace", first)).exists()  # removed with the message
    # the trace service fails: the message waits in deferred/ to ask again
    ok[0] = False
    second = env.submit("a@x.example", ["s@d.example"])
    asked.clear()
    run(go())
    assert asked == [("trace", BOUNCE_CMD_TRACE, second)]
    assert env.files("deferred") == [second]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the local agent's case")
def test_error_notice_from_a_root_agent_is_owned_by_the_queue_owner() -> None:
    base = Path(tempfile.mkdtemp(prefix="qmgrd-i5s-"))
    try:
        os.chmod(base, 0o755)
        env = make_env(base)
        owner = pwd.getpwnam(MAIL_OWNER)
        for q in ("incoming", "public"):
            os.chown(env.spool.queue_path(q), owner.pw_uid, owner.pw_gid)
        new = notify.error_notice(env.cfg, env.spool, "software", service="local",
                                  qid="ABC", sender="a@b", text="boom")
        assert new
        assert (os.geteuid(), os.getegid()) == (0, 0)
        st = os.stat(env.spool.path("incoming", new))
        assert (st.st_uid, st.st_gid) == (owner.pw_uid, owner.pw_gid)
    finally:
        shutil.rmtree(base, ignore_errors=True)
