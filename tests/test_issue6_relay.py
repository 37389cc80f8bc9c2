"""Issue 6 acceptance 3 (and ESMTP details) against a running qmgrd with smtpd services:
relaying for a foreign domain from outside mynetworks is refused (554 5.7.1 with
reject_unauth_destination, 454 4.7.1 with the default restrictions), a message over
message_size_limit gets 552 5.3.4 (declared or not), mail at hopcount_limit gets 554 5.4.0
at the end of DATA, the DSN parameters reach the queue file, and STARTTLS works when a certificate is set."""

from __future__ import annotations

import os
import re
import smtplib
import ssl
from pathlib import Path

import pytest

from qmgrd.spool.envelope import DSN_NOTIFY_DELAY, DSN_NOTIFY_FAILURE, DSN_RET_HDRS
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from tests.harness import LogCursor, MakeSystem, free_port, maildir_messages, wait_for
from tests.tools.smtpd_system import master_cf_with_smtpd, smtp, smtpd_cert, start, wait_smtpd

pytestmark = pytest.mark.timeout(120)

SENDER = "alice@mail.test.example"


def test_relay_control_from_outside_mynetworks(mailsys: MakeSystem) -> None:
    strict = free_port()
    ms, default = start(mailsys, {"mynetworks": "192.0.2.0/24",
                                  "relay_domains": "relay.test.example"},
                        extra_cf=f"127.0.0.1:{strict} inet n - n - - smtpd -o "
                                 "smtpd_relay_restrictions=permit_mynetworks,"
                                 "reject_unauth_destination\n")
    wait_smtpd(strict)
    cursor = LogCursor(ms)
    with smtp(strict) as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt("bob@far.example") == (
            554, b"5.7.1 <bob@far.example>: Relay access denied")
        assert s.rcpt("bob%far.example@mail.test.example")[0] == 554
        assert s.rcpt("bob@mail.test.example")[0] == 250
        assert s.rcpt("bob@relay.test.example")[0] == 250
    with smtp(default) as s:
        s.ehlo()
        s.mail(SENDER)
        # the default smtpd_relay_restrictions end in defer_unauth_destination
        assert s.rcpt("bob@far.example") == (
            454, b"4.7.1 <bob@far.example>: Relay access denied")
        s.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail(SENDER, ["carol@far.example"], b"Subject: relay?\r\n\r\nno\r\n")
    rejects = [t for _, t in cursor.by("smtpd") if t.startswith("NOQUEUE: reject: RCPT")]
    assert len(rejects) == 4, rejects
    assert rejects[0] == ("NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 5.7.1 "
                          "<bob@far.example>: Relay access denied; from=<alice@mail.test.example>"
                          " to=<bob@far.example> proto=ESMTP helo=<client.test.example>")
    assert not ms.queue_files("incoming", "active", "deferred")


def test_message_size_limit(mailsys: MakeSystem) -> None:
    ms, port = start(mailsys, {"message_size_limit": "200000"})
    big = b"Subject: big\r\n\r\n" + b"x" * 990 + b"\r\n" + (b"y" * 998 + b"\r\n") * 300
    with smtp(port) as s:
        s.ehlo()
        assert s.has_extn("size") and s.esmtp_features["size"] == "200000"
        assert s.mail(SENDER, ["SIZE=300000"]) == (
            552, b"5.3.4 Message size exceeds fixed limit")
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt("bob@mail.test.example")[0] == 250
        assert s.data(big) == (552, b"5.3.4 Error: message file too big")
        # the connection goes on, and a small message passes
        assert s.sendmail(SENDER, ["bob@mail.test.example"], b"Subject: small\r\n\r\nok\r\n") == {}
    wait_for(lambda: ms.maildir("bob"), 30, "the small message")
    wait_for(ms.queue_empty, 30, "an empty queue")
    assert len(ms.maildir("bob")) == 1 and b"Subject: small" in ms.maildir("bob")[0].read_bytes()


def test_hopcount_exceeded_is_refused_at_end_of_data(mailsys: MakeSystem) -> None:
    ms, port = start(mailsys, {"hopcount_limit": "5"})
    hops = b"".join(b"Received: from h%d.example by h%d.example; Sun, 29 Nov 2026\r\n" % (i, i)
                    for i in range(4))
    with smtp(port) as s:
        # 4 Received: + ours = 5 >= hopcount_limit: refused at the end of DATA (Postfix
        # cleanup's CLEANUP_STAT_HOPS), nothing queued
        with pytest.raises(smtplib.SMTPDataError) as err:
            s.sendmail(SENDER, ["bob@mail.test.example"],
                       hops + b"Message-ID: <hop5@test>\r\n\r\nloop\r\n")
        assert (err.value.smtp_code, err.value.smtp_error) == (554,
                                                               b"5.4.0 Error: too many hops")
        # 3 + ours = 4: delivered
        assert s.sendmail(SENDER, ["carol@mail.test.example"],
                          hops[hops.index(b"Received", 1):] + b"\r\nfine\r\n") == {}
    wait_for(lambda: ms.maildir("carol"), 30, "the 4-hop message")
    wait_for(ms.queue_empty, 30, "an empty queue")
    assert re.search(r"warning: \w+: message rejected: hopcount exceeded", ms.log())
    assert "to=<bob@mail.test.example>" not in ms.log()
    assert not ms.maildir("bob")
    assert not any(b"<hop5@test>" in m for m in maildir_messages(ms, "alice"))


def test_dsn_parameters_stored_for_the_bounce_service(mailsys: MakeSystem) -> None:
    ms, port = start(mailsys, {"defer_transports": "smtp"})
    with smtp(port) as s:
        s.ehlo()
        assert s.has_extn("dsn") and s.has_extn("8bitmime") and s.has_extn("pipelining")
        assert s.mail(SENDER, ["RET=HDRS", "ENVID=env+2B42", "BODY=8BITMIME"])[0] == 250
        assert s.rcpt("bob@far.example", ["NOTIFY=FAILURE,DELAY",
                                          "ORCPT=rfc822;Bob+40Orig.example"])[0] == 250
        code, reply = s.data(b"Subject: dsn\r\n\r\nbody\r\n")
        assert code == 250
    qid = reply.decode().rsplit(" ", 1)[1]
    spool = Spool(str(ms.spool))
    wait_for(lambda: Path(spool.path("deferred", qid)).exists(), 30, "the deferred file")
    with QueueFile.open(spool, "deferred", qid, lock=None, readonly=True) as qf:
        assert (qf.envid, qf.ret, qf.encoding) == ("env+42", DSN_RET_HDRS, "8bit")
        (rcpt,) = qf.recipients
        assert rcpt.notify == DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY
        assert rcpt.dsn_orcpt == "rfc822;Bob@Orig.example"
        assert qf.attrs["log_client_address"] == "127.0.0.1"


def test_starttls(mailsys: MakeSystem, tmp_path: Path) -> None:
    cert = smtpd_cert(tmp_path)
    required = free_port()
    ms, port = start(mailsys, {"smtpd_tls_cert_file": str(cert)},
                     extra_cf=f"127.0.0.1:{required} inet n - n - - smtpd "
                              "-o smtpd_tls_security_level=encrypt\n")
    wait_smtpd(required)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtp(port) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        assert s.starttls(context=context)[0] == 220
        s.ehlo()
        assert not s.has_extn("starttls")
        assert s.sendmail(SENDER, ["bob@mail.test.example"], b"Subject: tls\r\n\r\nsecret\r\n") == {}
    with smtp(required) as s:
        s.ehlo()
        assert s.mail(SENDER) == (530, b"5.7.0 Must issue a STARTTLS command first")
    wait_for(lambda: ms.maildir("bob"), 30, "the TLS message")
    assert b" with ESMTPS id " in ms.maildir("bob")[0].read_bytes()
    assert re.search(r"smtpd\[\d+\]: Anonymous TLS connection established from "
                     r"localhost\[127\.0\.0\.1\]: TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)",
                     ms.log())
    assert "imported after the jail" not in ms.log()


def test_jailed_smtpd_imports_everything_before_the_jail(mailsys: MakeSystem) -> None:
    """As root, smtpd runs as mail_owner and (chroot column y) inside the queue
    directory: mail still flows, and nothing is imported after the jail."""
    ms, port = start(mailsys, chroot=True)
    with smtp(port) as s:
        s.ehlo()
        assert s.sendmail(SENDER, ["bob@mail.test.example"], b"Subject: jail\r\n\r\nx\r\n") == {}
        s.mail(SENDER)
        assert s.rcpt("x@far.example")[0] == 250  # relay check, DNS-free for loopback
    wait_for(lambda: ms.maildir("bob"), 30, "delivery from the jailed smtpd")
    smtpd = [p for p in ms.processes() if (p.cmdline() or [""])[0].startswith("qmgrd: 127.")]
    assert smtpd
    if os.geteuid() == 0:
        for p in smtpd:
            assert p.uids().real != 0
            assert os.readlink(f"/proc/{p.pid}/root") == str(ms.spool)
    assert "imported after the jail" not in ms.log()


def test_a_transport_loop_to_our_own_smtpd_ends_in_a_554_at_hopcount_limit(
        mailsys: MakeSystem) -> None:
    """A transport entry that sends mail back to our own smtpd on a port other than 25
    (``loop.test smtp:[127.0.0.1]:<port>``): Postfix's smtp(8) checks for 'loops back to
    myself' on port 25 only (SMTP_MISC_FLAG_LOOP_DETECT), so the mail goes round, one
    Received: header a pass. At hopcount_limit our smtpd refuses it at the end of DATA
    (554 5.4.0, nothing queued) and the smtp client bounces it with that reply: the
    bounce comes from the client's side, not from a cleanup that accepted it."""
    port = free_port()
    ms = mailsys(main={"hopcount_limit": "5"}, master_cf=master_cf_with_smtpd(port))
    (ms.etc / "transport").write_text(f"loop.test smtp:[127.0.0.1]:{port}\n")
    ms.write_main(transport_maps=f"texthash:{ms.etc / 'transport'}")
    ms.start()
    wait_smtpd(port)
    r = ms.sendmail("-i", "-f", SENDER, "bob@loop.test",
                    data=b"Subject: round\nMessage-ID: <round@test>\n\nx\n")
    assert r.returncode == 0, r.stderr
    # pickup's Received: + 3 accepted passes = 4; the 4th pass makes 5: refused
    wait_for(lambda: re.search(
        r"to=<bob@loop\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*dsn=5\.4\.0, "
        r"status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 554 5\.4\.0 Error: too "
        r"many hops \(in reply to end of DATA command\)\)", ms.log()), 60, "the bounce")
    wait_for(lambda: any(b"<round@test>" in m for m in maildir_messages(ms, "alice")), 30,
             "the bounce notice to the sender")
    wait_for(ms.queue_empty, 30, "an empty queue")
    log_text = ms.log()
    assert log_text.count("message rejected: hopcount exceeded") == 1
    assert "mail forwarding loop" not in log_text
    assert len(re.findall(r"to=<bob@loop\.test>, .*status=sent", log_text)) == 3
