"""Issue 6 acceptance 4: a full disk gets only 4xx replies and leaves nothing in incoming/
that could become deliverable; mail is accepted again once space is back.

* ``queue_minfree`` above the free space: every MAIL FROM gets ``452 4.3.1 Insufficient
  system storage``; after a reload with queue_minfree = 0 mail is accepted.
* A real full file system (a 3 MB tmpfs as the queue directory, root only): sessions
  that passed MAIL FROM while there was room hit ENOSPC while the queue file is written:
  ``451 4.3.0 Error: queue file write error`` (never a 5xx), and no file is left behind;
  after the tmpfs grows, mail is accepted again.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmgrd.spool.queue import Spool
from tests.harness import MailSystem, MakeSystem, free_port, wait_for
from tests.tools.smtpd_system import master_cf_with_smtpd, smtp, start, wait_smtpd

pytestmark = pytest.mark.timeout(120)

SENDER = "alice@mail.test.example"


def incoming_files(ms: MailSystem) -> list[Path]:
    return ms.queue_files("incoming")


def try_send(port: int, rcpt: str, data: bytes) -> tuple[int, bytes]:
    """One transaction; (code, text) of the reply that ended it."""
    with smtp(port) as s:
        s.ehlo()
        code, text = s.mail(SENDER)
        if code != 250:
            return code, text
        code, text = s.rcpt(rcpt)
        if code != 250:
            return code, text
        return s.data(data)


def test_queue_minfree_above_free_space(mailsys: MakeSystem) -> None:
    ms, port = start(mailsys, {"queue_minfree": str(1 << 60)})
    for i in range(10):
        assert try_send(port, "bob@mail.test.example", b"Subject: %d\r\n\r\nx\r\n" % i) == (
            452, b"4.3.1 Insufficient system storage")
    assert not incoming_files(ms) and not ms.maildir("bob")
    assert "warning: not enough free space in mail queue" in ms.log()
    # Postfix smtpd_check_size: a NOQUEUE reject line too, which pflogsumm counts
    assert re.search(r"NOQUEUE: reject: MAIL from \S+: 452 4\.3\.1 Insufficient system "
                     r"storage; from=<[^>]*> proto=E?SMTP", ms.log()), ms.log()[-2000:]
    ms.write_main(queue_minfree="0")
    r = ms.master("reload")
    assert r.returncode == 0, r.stderr
    # the old smtpd finishes and goes; its successor reads the new main.cf
    results: list[tuple[int, bytes]] = []

    def accepted() -> bool:
        results.append(try_send(port, "bob@mail.test.example", b"Subject: back\r\n\r\nok\r\n"))
        return results[-1][0] == 250

    wait_for(accepted, 30, "mail accepted after the reload", interval=0.2)
    assert all(code in (250, 452) for code, _ in results), results
    wait_for(lambda: ms.maildir("bob"), 30, "delivery")


@pytest.fixture
def tmpfs_system(mailsys: MakeSystem) -> Iterator[tuple[MailSystem, int]]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    port = free_port()
    ms = mailsys(main={"message_size_limit": "400000", "defer_transports": "smtp"},
                 master_cf=master_cf_with_smtpd(port))
    ms.spool.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0755", "tmpfs",
                        str(ms.spool)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        ms.start()
        wait_smtpd(port)
        yield ms, port
    finally:
        ms.stop(check=False)
        subprocess.run(["umount", "-l", str(ms.spool)], capture_output=True, check=False)


def test_full_file_system(tmpfs_system: tuple[MailSystem, int]) -> None:
    ms, port = tmpfs_system
    body = b"Subject: fill\r\n\r\n" + (b"z" * 998 + b"\r\n") * 380   # ~380 KB
    sessions: list[smtplib.SMTP] = []
    replies: list[tuple[int, bytes]] = []
    try:
        # nine sessions pass MAIL FROM while the 3 MB file system still has room ...
        for i in range(9):
            s = smtp(port)
            sessions.append(s)
            s.ehlo()
            assert s.mail(SENDER)[0] == 250
            assert s.rcpt(f"r{i}@far.example")[0] == 250
        # ... then their messages do not all fit
        for s in sessions:
            replies.append(s.data(body))
    finally:
        for s in sessions:
            s.close()
    codes = [code for code, _ in replies]
    assert 250 in codes and 451 in codes, replies
    assert all(code in (250, 451) for code in codes), replies
    assert all(text == b"4.3.0 Error: queue file write error" for code, text in replies
               if code == 451)
    accepted = [text.decode().rsplit(" ", 1)[1] for code, text in replies if code == 250]
    spool = Spool(str(ms.spool))
    wait_for(lambda: not incoming_files(ms) and all(
        os.path.exists(spool.path("deferred", q)) for q in accepted), 30,
        "the accepted mail in deferred/, nothing in incoming/")
    # more mail now: refused with 4xx only, and nothing half-written stays
    for _ in range(3):
        code, _text = try_send(port, "x@far.example", body)
        assert 400 <= code < 500, code
    assert not incoming_files(ms)
    r = subprocess.run(["mount", "-o", "remount,size=16m", str(ms.spool)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert try_send(port, "x@far.example", body)[0] == 250
