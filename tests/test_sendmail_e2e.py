"""End-to-end checks of qmgr-sendmail's address handling under a running mail system:
what the SMTP peer and the local Maildir see for addresses given on the command line."""

from __future__ import annotations

import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.timeout(120)


def test_command_line_addresses_reach_peer_quoted_once(mailsys, peers) -> None:
    cap = peers.capture()
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{cap.port}"})
    ms.start()
    jobs = [
        (["-f", "<x@y.example>", '"a b"@example.com'], "1"),
        (["-f", "a b@y.example", "c@example.com, <d@example.com>"], "2"),
        (["-f", "<>", "e@example.com"], "3"),
        (["-f", "s@y.example", '"user"@localhost', "<other@localhost>"], "4"),
    ]
    for args, tag in jobs:
        r = ms.sendmail(*args, data=f"Subject: {tag}\n\nbody {tag}\n".encode())
        assert r.returncode == 0, r.stderr
    r = ms.sendmail("-t", data=b"To: undisclosed-recipients:;\nSubject: 5\n\nbody\n")
    assert r.returncode == 64
    assert r.stderr == b"qmgr-sendmail: fatal: No recipient addresses found in message header\n"
    wait_for(lambda: len(cap.messages()) >= 3 and ms.maildir("user") and ms.maildir("other"),
             30, "three SMTP transactions and two Maildir deliveries")
    wait_for(ms.queue_empty, 20, "an empty queue")
    by_subject = {}
    for sender, rcpts, content in cap.messages():
        subject = next(x for x in content.split(b"\r\n") if x.startswith(b"Subject: "))
        by_subject[subject[9:].decode()] = (sender, sorted(rcpts), content)
    assert by_subject["1"][:2] == ("x@y.example", ['"a b"@example.com'])
    assert b"\r\nFrom: x@y.example\r\n" in by_subject["1"][2]
    assert by_subject["2"][:2] == ('"a b"@y.example', ["c@example.com", "d@example.com"])
    assert b'\r\nFrom: "a b"@y.example\r\n' in by_subject["2"][2]
    assert by_subject["3"][:2] == ("<>", ["e@example.com"])  # aiosmtpd keeps "<>"
    assert b"\r\nFrom: MAILER-DAEMON\r\n" in by_subject["3"][2]
    assert len(ms.maildir("user")) == 1 and len(ms.maildir("other")) == 1
    delivered = ms.maildir("user")[0].read_bytes()
    assert b"Delivered-To: user@localhost\n" in delivered
    assert b"Return-Path: <s@y.example>\n" in delivered
    assert "to=<user@localhost>" in ms.log() and "\\\"" not in ms.log()
