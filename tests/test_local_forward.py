"""Alias forwarding to remote addresses (transports.local_forward, Postfix local/forward.c):
one new message through cleanup per original recipient, logged ``forwarded as``."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path

import pytest
from test_agent_support import SIMPLE, Env, close_log, make_env, round_trip  # noqa: F401
from test_local_alias import inbox
from test_local_delivery import bounce_of, content_lines

from qmgrd.delivery import BOUNCE_CMD_TRACE, DeliverStatus, StatusRequest
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import (
    DSN_NOTIFY_FAILURE,
    DSN_NOTIFY_NEVER,
    DSN_NOTIFY_SUCCESS,
    DSN_RET_HDRS,
    Recipient,
)
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from tests.harness import tool, wait_for
from transports.bounce import BounceService
from transports.local import LocalAgent

ALIASES = """\
away: Admin@Elsewhere.example
mixed: alice, admin@elsewhere.example, other@far.example, ADMIN@elsewhere.example
badmix: /tmp/x, admin@elsewhere.example
loop: loop@alias.example
fwdonly: one@far.example, two@far.example
solo: bob
"""


def fwd_env(tmp_path: Path, **main: str) -> Env:
    table = tmp_path / "aliases"
    table.write_text(ALIASES)
    settings = {"mail_spool_directory": f"{tmp_path}/mail/", "alias_maps": f"hash:{table}"}
    settings.update(main)
    return make_env(tmp_path, **settings)


def run_local(env: Env, qid: str, nexthop: str = "mail.test.example") -> DeliverStatus:
    agent = LocalAgent()
    agent.configure(env.cfg, "local")
    _, reply = round_trip(agent, env.request(qid, nexthop), env.ctx("local"))
    assert reply is not None
    return reply


def deliver(env: Env, rcpts: list[Recipient], content: bytes = SIMPLE,
            sender: str = "alice@example.com", **envkw: object) -> tuple[str, DeliverStatus]:
    qid = env.queue(rcpts, content, sender=sender, **envkw)
    return qid, run_local(env, qid)


def incoming(env: Env) -> list[str]:
    return sorted(os.listdir(env.spool.queue_path("incoming")))


def forwarded_as(env: Env, qid: str, rcpt: str) -> str:
    """The new queue id in the original's ``status=sent (...forwarded as X)`` line."""
    m = re.search(rf"{qid}: to=<{re.escape(rcpt)}>, (?:orig_to=<[^>]*>, )?relay=local, "
                  r".*dsn=2\.0\.0, "
                  r"status=sent \((?:.*; )?forwarded as (\w+)\)", env.log())
    assert m, env.log()
    return m.group(1)


def test_remote_target_is_forwarded_as_a_new_message(tmp_path: Path) -> None:
    env = fwd_env(tmp_path)
    notify = DSN_NOTIFY_SUCCESS | DSN_NOTIFY_FAILURE
    rcpt = Recipient("away@localhost", "Away@localhost", "rfc822;away@localhost", notify)
    qid, reply = deliver(env, [rcpt], sender="", envid="env-1", ret=DSN_RET_HDRS)
    assert reply.status == 0
    assert env.undone(qid) == []  # marked done
    new = forwarded_as(env, qid, "away@localhost")
    assert incoming(env) == [new]
    # NOTIFY=SUCCESS: the alias reports "expanded" itself (Postfix local/alias.c), and
    # the copy goes on without SUCCESS
    ((_, dsn),) = statuslog.read(env.spool, "trace", qid)
    assert (dsn.status, dsn.action, dsn.reason) == ("2.0.0", "expanded",
                                                    "delivery via local: alias expanded")
    with QueueFile.open(env.spool, "incoming", new, lock=None, readonly=True) as qf:
        assert qf.sender == ""
        assert (qf.envid, qf.ret) == ("env-1", DSN_RET_HDRS)
        ((addr, orig, orcpt, flags),) = [(r.address, r.orig_rcpt, r.dsn_orcpt, r.notify)
                                         for r in qf.recipients]
        lines = list(qf.iter_lines())
    assert (addr, orig, orcpt, flags) == ("Admin@Elsewhere.example", "Away@localhost",
                                          "rfc822;away@localhost", DSN_NOTIFY_FAILURE)
    assert lines[0] == b"Received: by mail.test.example (qmgrd)"
    assert re.fullmatch(rb"\tid " + new.encode() + rb"; \w{3}, .*", lines[1])
    assert lines[2] == b"Delivered-To: away@localhost"
    assert lines[3:] == content_lines(env, qid)  # headers and body unchanged
    postcat = tool("postcat")
    if postcat is not None:
        out = subprocess.run([postcat, "-c", str(tmp_path / "etc"),
                              env.spool.path("incoming", new)],
                             capture_output=True, text=True, check=True).stdout
        assert "recipient: Admin@Elsewhere.example" in out
        assert "original_recipient: Away@localhost" in out
        assert "Delivered-To: away@localhost" in out


def test_mixed_local_and_remote_targets(tmp_path: Path) -> None:
    env = fwd_env(tmp_path)
    qid, reply = deliver(env, [Recipient("mixed@localhost"), Recipient("badmix@localhost")])
    assert reply.status == 0
    assert len(inbox(tmp_path, "alice")) == 1
    new = forwarded_as(env, qid, "mixed@localhost")
    assert f"status=sent (delivered to maildir; forwarded as {new})" in env.log()
    # another target's bounce still wins; its remote target is forwarded all the same
    why = "/tmp/x: alias delivery to a file is not implemented"
    assert bounce_of(env, qid) == ("5.7.1", why)
    assert len(incoming(env)) == 2
    copies = {}
    for name in incoming(env):
        with QueueFile.open(env.spool, "incoming", name, lock=None, readonly=True) as qf:
            copies[name] = ([(r.address, r.orig_rcpt) for r in qf.recipients],
                            list(qf.iter_lines())[2])
    # one message per original recipient, duplicate targets (any case) once
    assert copies[new] == ([("admin@elsewhere.example", "mixed@localhost"),
                            ("other@far.example", "mixed@localhost")],
                           b"Delivered-To: mixed@localhost")
    (other,) = set(copies) - {new}
    assert copies[other] == ([("admin@elsewhere.example", "badmix@localhost")],
                             b"Delivered-To: badmix@localhost")


def test_deferred_local_target_forwards_nothing(tmp_path: Path) -> None:
    """A target deferred: the whole recipient is tried again later, so no copy now
    (Postfix's forward_finish cancels it) - the retry would send a second one."""
    (tmp_path / "first").write_text("split: bob, admin@elsewhere.example\n")
    env = fwd_env(tmp_path, alias_maps=f"hash:{tmp_path}/first, hash:{tmp_path}/gone")
    qid, reply = deliver(env, [Recipient("split@localhost")])
    assert reply.status == 1
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert (dsn.status, dsn.reason) == (
        "4.3.0", "bob@mail.test.example: alias database unavailable")
    assert incoming(env) == []
    assert "forwarded as" not in env.log()


def test_forwarding_loop_ends_in_a_bounce(tmp_path: Path) -> None:
    """``loop: loop@alias.example`` where alias.example comes back to this local agent:
    each copy gets a Delivered-To: header, and the copy that reaches the same address
    again bounces 5.4.6 instead of going round for ever."""
    env = fwd_env(tmp_path)
    qid, _ = deliver(env, [Recipient("loop@localhost")])
    for rcpt in ("loop@localhost", "loop@alias.example"):  # forwarded twice
        new = forwarded_as(env, qid, rcpt)
        assert incoming(env) == [new]
        env.spool.move(new, "incoming", "active")
        qid = new
        reply = run_local(env, qid, "alias.example")
    assert reply.status == 0
    assert bounce_of(env, qid) == ("5.4.6", "mail forwarding loop for loop@alias.example")
    assert incoming(env) == []


@pytest.mark.parametrize("fail", ["write", "create"])
def test_failed_submission_defers_and_leaves_nothing(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     fail: str) -> None:
    env = fwd_env(tmp_path)
    qid = env.queue([Recipient("mixed@localhost")])

    def broken(*args: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fail == "write":  # the queue file exists when the write fails
        monkeypatch.setattr(Cleanup, "_build", broken)
    else:
        monkeypatch.setattr(Spool, "create", broken)
    reply = run_local(env, qid)
    assert reply.status == 1
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    why = f"unable to forward message: queue file {fail} error: No space left on device"
    assert (dsn.status, dsn.reason) == ("4.3.0", why)
    assert incoming(env) == []  # no half-written queue file
    assert env.undone(qid) == ["mixed@localhost"]


def copy_notify(env: Env, name: str) -> list[tuple[str, int]]:
    with QueueFile.open(env.spool, "incoming", name, lock=None, readonly=True) as qf:
        return [(r.address, r.notify) for r in qf.recipients]


def success_notice(env: Env, qid: str) -> bytes:
    """The success notice the bounce service makes of ``qid``'s trace log."""
    before = set(incoming(env))
    svc = BounceService(env.ctx("trace"))
    req = StatusRequest(nrequest=BOUNCE_CMD_TRACE, queue_name="active", queue_id=qid,
                        sender="alice@example.com")
    assert svc.handle(req) == 0
    (nid,) = set(incoming(env)) - before
    with QueueFile.open(env.spool, "incoming", nid, lock=None, readonly=True) as qf:
        return b"\n".join(qf.iter_lines()) + b"\n"


def test_alias_expanded_to_several_addresses_notifies_expanded(tmp_path: Path) -> None:
    """RFC 3461 section 6.2.7.3, Postfix local/alias.c deliver_alias(): an alias with
    NOTIFY=SUCCESS gets one success notice, action "expanded", ``alias expanded``, and
    what it expands to goes without SUCCESS (SUCCESS alone becomes NEVER), forwarded
    copy and local deliveries alike - with one target as with several."""
    env = fwd_env(tmp_path)
    qid, reply = deliver(env, [Recipient("fwdonly@localhost", notify=DSN_NOTIFY_SUCCESS)])
    assert reply.status == 0
    new = forwarded_as(env, qid, "fwdonly@localhost")
    assert copy_notify(env, new) == [("one@far.example", DSN_NOTIFY_NEVER),
                                     ("two@far.example", DSN_NOTIFY_NEVER)]
    ((rcpt, dsn),) = statuslog.read(env.spool, "trace", qid)
    assert rcpt.address == "fwdonly@localhost"
    assert (dsn.status, dsn.action, dsn.reason) == ("2.0.0", "expanded",
                                                    "delivery via local: alias expanded")
    text = success_notice(env, qid).decode()
    assert "<fwdonly@localhost>: delivery via local: alias expanded\n" in text
    assert "Action: expanded\n" in text and "Status: 2.0.0\n" in text
    assert "Action: delivered" not in text and "Action: relayed" not in text
    # local and remote targets: the same one notice, not "delivered"; FAILURE stays
    notify = DSN_NOTIFY_SUCCESS | DSN_NOTIFY_FAILURE
    qid2, reply2 = deliver(env, [Recipient("mixed@localhost", notify=notify)])
    assert reply2.status == 0 and len(inbox(tmp_path, "alice")) == 1
    new2 = forwarded_as(env, qid2, "mixed@localhost")
    assert f"status=sent (delivered to maildir; forwarded as {new2})" in env.log()
    assert {n for _, n in copy_notify(env, new2)} == {DSN_NOTIFY_FAILURE}
    ((_, dsn2),) = statuslog.read(env.spool, "trace", qid2)
    assert (dsn2.status, dsn2.action, dsn2.reason) == ("2.0.0", "expanded",
                                                       "delivery via local: alias expanded")
    # one target: the same (Postfix makes no exception for a single address)
    qid3, _ = deliver(env, [Recipient("solo@localhost", notify=DSN_NOTIFY_SUCCESS)])
    assert len(inbox(tmp_path, "bob")) == 1
    ((_, dsn3),) = statuslog.read(env.spool, "trace", qid3)
    assert (dsn3.action, dsn3.reason) == ("expanded", "delivery via local: alias expanded")
    qid4, _ = deliver(env, [Recipient("away@localhost", notify=DSN_NOTIFY_SUCCESS)])
    new4 = forwarded_as(env, qid4, "away@localhost")
    assert copy_notify(env, new4) == [("Admin@Elsewhere.example", DSN_NOTIFY_NEVER)]
    ((_, dsn4),) = statuslog.read(env.spool, "trace", qid4)
    assert (dsn4.action, dsn4.reason) == ("expanded", "delivery via local: alias expanded")


def forward_to_sink(mailsys, peers, aliases: str, rcpt: str, body: bytes):
    """A system relaying to a fresh smtp-sink with ``aliases`` as its alias_maps; ``body``
    sent to ``rcpt`` with sendmail, and waited for until the sink has a message and the
    queue is empty. Returns (the system, the sink)."""
    sink = peers.sink()
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{sink.port}"})
    (ms.etc / "aliases").write_text(aliases)
    ms.write_main(alias_maps=f"texthash:{ms.etc}/aliases")
    ms.start()
    assert ms.sendmail("-f", "sender@example.org", rcpt, data=body).returncode == 0
    wait_for(lambda: sink.count() >= 1, 60, "the forwarded copy at smtp-sink")
    wait_for(ms.queue_empty, 30, "an empty queue")
    return ms, sink


@pytest.mark.timeout(120)
def test_forwarded_copy_reaches_smtp_sink(mailsys, peers) -> None:
    """The real pipeline: sendmail -> local (alias) -> cleanup -> qmgr -> smtp ->
    smtp-sink; the copy written as root by local is read by the qmgr (mail_owner)."""
    ms, sink = forward_to_sink(
        mailsys, peers, "root: admin@elsewhere.example, root\n", "root@localhost",
        b"Subject: forward me\nMessage-ID: <fwd-1@test.example>\n\nline one\n")
    (msg,) = sink.messages()
    assert b"Delivered-To: root@localhost" in msg
    assert b"Received: by mail.test.example (qmgrd)" in msg
    assert b"Message-ID: <fwd-1@test.example>" in msg and b"line one" in msg
    log = ms.log()
    m = re.search(r"to=<root@localhost>, relay=local, .*status=sent \(delivered to "
                  r"maildir; forwarded as (\w+)\)", log)
    assert m, log
    assert re.search(rf"{m.group(1)}: from=<sender@example\.org>, ", log), log
    assert re.search(rf"{m.group(1)}: to=<admin@elsewhere.example>, orig_to=<root@localhost>"
                     r", relay=127\.0\.0\.1.*status=sent", log), log
    assert len(ms.maildir("root")) == 1


@pytest.mark.timeout(120)
def test_utf8_target_does_not_hold_back_an_ascii_one(mailsys, peers) -> None:
    """An ASCII message without SMTPUTF8, an alias to a UTF-8 and an ASCII remote
    address, a next hop without SMTPUTF8 (smtp-sink): the copy is not flagged (no
    SMTPUTF8 autodetection for forwarded mail, Postfix's smtputf8_autodetect_classes),
    and Postfix's smtp(8) sends it as it is - no 5.6.7 for either recipient."""
    ms, _ = forward_to_sink(mailsys, peers,
                            "u8fwd: j\u00f6rg@sink.test, ascii@sink.test\n",
                            "u8fwd@localhost", b"Subject: ascii\n\nplain\n")
    log = ms.log()
    assert "5.6.7" not in log, log
    for rcpt in ("j\u00f6rg@sink.test", "ascii@sink.test"):
        assert re.search(rf"to=<{rcpt}>, orig_to=<u8fwd@localhost>, relay=127\.0\.0\.1"
                         r".*status=sent", log), log
