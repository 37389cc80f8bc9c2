"""The bounce service never fails on bytes that are not valid UTF-8.

An address or diagnostic reaches the service decoded with "surrogateescape" (from the
queue file or the status log); a notice used to die with UnicodeEncodeError in the
human-readable part, so the service crashed on every retry. Checked on build_notice()
(every kind, SMTPUTF8 or not, full message or headers) and on BounceService.handle()
over a real spool: a notice is queued, the bad bytes are shown as ``\\xff`` in the text,
``+FF`` in the delivery-status address fields and ``?`` elsewhere, and the log is gone.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from qmgrd.delivery import BOUNCE_CMD_FLUSH, BOUNCE_CMD_TRACE, BOUNCE_CMD_WARN, StatusRequest
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import SMTPUTF8_FLAG_REQUESTED, Recipient
from qmgrd.spool.message import QueueFile
from tests.test_agent_support import close_log, make_env  # noqa: F401  (fixture)
from transports.bounce import BounceService, build_notice

HOST = "mail.test.example"
BAD = "a/\udcff@localhost"  # the bytes b"a/\xff@localhost"
DSN = statuslog.Dsn("5.1.1", "failed", "invalid mailbox name: a/\udcff", "x-unix",
                    "bad mailbox \udcfe", "dns", "mx\udcff.example")


@pytest.mark.parametrize("kind", ["failed", "delayed", "delivered"])
@pytest.mark.parametrize("smtputf8", [False, True])
@pytest.mark.parametrize("headers_only", [False, True])
def test_build_notice_escapes_bad_bytes(kind: str, smtputf8: bool, headers_only: bool) -> None:
    rcpt = Recipient(BAD, orig_rcpt="al\udcfeias@localhost", dsn_orcpt=f"rfc822;{BAD}")
    raw = build_notice(kind=kind, myhostname=HOST, qid="ABC", sender="s\udcff@x.example",
                       to="s\udcff@x.example", arrival=time.time(), entries=[(rcpt, DSN)],
                       original=b"Subject: x\xff\nMessage-ID: <m\xfe@x>\n\nbody\n",
                       headers_only=headers_only, smtputf8=smtputf8)
    head, _, rest = raw.partition(b"--")
    parts = rest.split(b"\n--")
    text = parts[0].decode("utf-8")  # the human-readable part is valid UTF-8
    assert "<a/\\xff@localhost> (expanded from <al\\xfeias@localhost>): " \
           "invalid mailbox name: a/\\xff" in text
    report = parts[1]
    report.decode("ascii")  # no raw bad byte in the delivery-status part
    # not valid UTF-8: "rfc822" even for SMTPUTF8 mail (Postfix's IS_UTF8_ADDRESS)
    assert b"Final-Recipient: rfc822; a/+FF@localhost\n" in report
    assert b"Original-Recipient: rfc822;a/+FF@localhost\n" in report
    assert b"X-Postfix-Sender: rfc822; s+FF@x.example\n" in report
    assert b"Remote-MTA: dns; mx?.example\n" in report
    assert b"Diagnostic-Code: x-unix; bad mailbox ?\n" in report
    assert b"\nTo: s?@x.example\n" in head
    assert b"Return-Path: <s?@x.example>\n" in raw


def _queue_bad(tmp_path: Path, logname: str, sender: str = "alice@example.com"
               ) -> tuple[BounceService, str]:
    env = make_env(tmp_path, notify_classes="bounce, delay")
    qid = env.queue([Recipient(BAD)], b"Subject: x\n\nx\n", sender=sender)
    with QueueFile.open(env.spool, "active", qid, lock=None, readonly=True) as qf:
        (rcpt,) = qf.recipients
    assert rcpt.address == BAD
    statuslog.append(env.spool, logname, qid, rcpt, DSN)
    return BounceService(env.ctx(logname)), qid


def _notices(svc: BounceService) -> list[tuple[str, list[str], bytes]]:
    out = []
    for qid in sorted(svc.spool.scan("incoming")):
        with QueueFile.open(svc.spool, "incoming", qid, lock=None, readonly=True) as qf:
            out.append((qf.sender, [r.address for r in qf.recipients],
                        b"\n".join(qf.iter_lines()) + b"\n"))
    return out


@pytest.mark.parametrize("logname, nrequest", [
    ("bounce", BOUNCE_CMD_FLUSH), ("defer", BOUNCE_CMD_FLUSH), ("defer", BOUNCE_CMD_WARN),
    ("trace", BOUNCE_CMD_TRACE)])
def test_service_sends_the_notice_for_a_bad_recipient(tmp_path: Path, logname: str,
                                                      nrequest: int) -> None:
    svc, qid = _queue_bad(tmp_path, logname)
    req = StatusRequest(nrequest=nrequest, queue_name="active", queue_id=qid,
                        sender="alice@example.com")
    assert svc.handle(req) == 0
    notices = _notices(svc)
    assert ("", ["alice@example.com"]) in [(s, r) for s, r, _ in notices]
    for _, _, data in notices:
        assert b"<a/\\xff@localhost>" in data
        assert b"; a/+FF@localhost\n" in data
    kept = nrequest == BOUNCE_CMD_WARN
    assert bool(statuslog.read(svc.spool, logname, qid)) == kept


def test_service_sends_the_notice_to_a_bad_sender(tmp_path: Path) -> None:
    sender = "s\udcff@example.com"
    svc, qid = _queue_bad(tmp_path, "bounce", sender=sender)
    req = StatusRequest(nrequest=BOUNCE_CMD_FLUSH, queue_name="active", queue_id=qid,
                        sender=sender)
    assert svc.handle(req) == 0
    ((_, rcpts, data),) = [n for n in _notices(svc) if n[0] == ""]
    assert rcpts == [sender]  # the envelope keeps the address as it is
    assert b"\nTo: s?@example.com\n" in data
    assert statuslog.read(svc.spool, "bounce", qid) == []


def test_notice_of_smtputf8_mail_requests_smtputf8(tmp_path: Path) -> None:
    """The notice of a message whose client asked for SMTPUTF8 is itself queued with the
    SMTPUTF8 request (Postfix's bounce passes the request's smtputf8 to cleanup); that
    of an ASCII message is not."""
    for flags in (SMTPUTF8_FLAG_REQUESTED, 0):
        svc, qid = _queue_bad(tmp_path / str(flags), "bounce")
        req = StatusRequest(nrequest=BOUNCE_CMD_FLUSH, queue_name="active", queue_id=qid,
                            sender="alice@example.com", smtputf8=flags)
        assert svc.handle(req) == 0
        seen = []
        for nqid in svc.spool.scan("incoming"):
            with QueueFile.open(svc.spool, "incoming", nqid, lock=None, readonly=True) as qf:
                if [r.address for r in qf.recipients] == ["alice@example.com"]:
                    seen.append(bool(qf.smtputf8 & SMTPUTF8_FLAG_REQUESTED))
        assert seen == [bool(flags)]
