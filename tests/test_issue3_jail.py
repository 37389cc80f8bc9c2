"""Issue 3 acceptance: privilege separation and the chrooted qmgr (run as root).

The bundled master.cf (the harness copies etc/master.cf) runs the qmgr chrooted to
queue_directory as mail_owner.  The chrooted qmgr must still do all of the pipeline --
every corpus message delivered (Maildir and SMTP), a bounce notice to a local sender, a
deferral retried after ``qmgr-ctl flush`` -- with one and the same qmgr process, and the
log must show no sign of a module or file looked up after the chroot.  Unprivileged
services (unpriv ``-``) run as mail_owner with its group only; ``unpriv n`` (local) as root.
"""

from __future__ import annotations

import os
import pwd
import re
import uuid
from typing import TYPE_CHECKING

import psutil
import pytest

from master.config import Config, load_master_cf
from tests.harness import (
    CORPUS,
    LogCursor,
    MailSystem,
    MakeSystem,
    maildir_messages,
    service_of,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Peers

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot and setuid need root"),
]

CORPUS_FILES = sorted(p.name for p in CORPUS.glob("*.eml"))
LOOP_FILE = "10-many-received.eml"  # over hopcount_limit: bounced 5.4.0 by cleanup
SENDER = "alice@mail.test.example"  # local: $myhostname is in mydestination
# what must never appear in the log of a jailed system (lazy imports, lookups outside)
BAD_LOG = ("fatal", "Traceback", "ImportError", "ModuleNotFoundError", "No such file",
           "Permission denied")


def mail_owner(ms: MailSystem) -> pwd.struct_passwd:
    return pwd.getpwnam(ms.params.get("mail_owner", "postfix"))


def bad_log_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(b in line for b in BAD_LOG)]


def test_bundled_master_cf_chroots_the_qmgr(mailsys: MakeSystem) -> None:
    ms = mailsys()
    cfg = Config.load(str(ms.etc))
    services = {(s.name, s.type): s for s in load_master_cf(str(ms.etc / "master.cf"), cfg)}
    qmgr = [s for (name, _), s in services.items() if name == "qmgr"]
    assert len(qmgr) == 1
    assert qmgr[0].chroot, "etc/master.cf: the qmgr line must have chroot y"
    assert qmgr[0].unpriv, "etc/master.cf: the qmgr must run unprivileged"


def test_chrooted_qmgr_does_the_whole_pipeline(mailsys: MakeSystem, peers: Peers) -> None:
    cap = peers.capture()
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{cap.port}"})
    ms.start()
    qmgr_pid = ms.children("qmgr")[0].pid
    cursor = LogCursor(ms)

    # 1. every corpus message, to a Maildir and over SMTP
    for name in CORPUS_FILES:
        data = (CORPUS / name).read_bytes()
        user = "u" + name[:2]
        r = ms.sendmail("-i", "-f", SENDER, f"{user}@localhost", f"{user}@remote.example",
                        data=data)
        assert r.returncode == 0, r.stderr
    expected = [f for f in CORPUS_FILES if f != LOOP_FILE]

    def corpus_done() -> bool:
        got = {r for _, rcpts, _ in cap.messages() for r in rcpts}
        return all(ms.maildir("u" + f[:2]) and f"u{f[:2]}@remote.example" in got
                   for f in expected)

    wait_for(corpus_done, 40, "every corpus message in its Maildir and at the capture server")
    for f in expected:
        assert len(ms.maildir("u" + f[:2])) == 1, f
    assert not ms.maildir("u" + LOOP_FILE[:2])

    # 2. bounce notices to the local sender: the looping message (5.4.0) and a 550
    cap.set_mode("reject:bad@remote.example")
    mid = f"<bounce-{uuid.uuid4().hex}@test.example>"
    r = ms.sendmail("-i", "-f", SENDER, "bad@remote.example",
                    data=f"Subject: bounce me\nMessage-ID: {mid}\n\nno\n".encode())
    assert r.returncode == 0, r.stderr

    def notices() -> list[bytes]:
        return maildir_messages(ms, "alice")

    wait_for(lambda: any(b"550 5.1.1" in n and mid.encode() in n for n in notices()), 30,
             "the bounce notice for bad@remote.example")
    wait_for(lambda: any(b"too many hops" in n for n in notices()), 30,
             "the 5.4.0 notice for the looping message")

    # 3. a deferral, delivered after qmgr-ctl flush
    cap.set_mode("defer")
    r = ms.sendmail("-i", "-f", SENDER, "later@remote.example",
                    data=b"Subject: later\n\nretry me\n")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(ms.queue_files("deferred")) == 1, 30, "the message in deferred/")
    assert re.search(r"to=<later@remote\.example>.*status=deferred", ms.log())
    cap.set_mode("accept")
    assert ms.ctl("flush").returncode == 0
    wait_for(lambda: any("later@remote.example" in rcpts for _, rcpts, _ in cap.messages())
             and ms.queue_empty(), 20, "delivery of the deferred message after flush")

    # the same jailed qmgr did all of it
    assert [p.pid for p in ms.children("qmgr")] == [qmgr_pid]
    assert {pid for pid, _ in cursor.by("qmgr")} == {qmgr_pid}
    assert bad_log_lines(ms.log()) == []
    root = os.readlink(f"/proc/{qmgr_pid}/root")
    assert root == os.path.realpath(ms.spool), f"qmgr root is {root}, not the queue"
    owner = mail_owner(ms)
    uids = psutil.Process(qmgr_pid).uids()
    assert (uids.real, uids.effective, uids.saved) == (owner.pw_uid,) * 3, uids


def test_services_run_with_their_master_cf_privileges(mailsys: MakeSystem, peers: Peers) -> None:
    cap = peers.capture("reject:bad@remote.example")
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{cap.port}"})
    ms.start()
    r = ms.sendmail("-i", "-f", SENDER, "bob@localhost", "carol@remote.example",
                    "bad@remote.example", data=b"Subject: privileges\n\nhello\n")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: ms.maildir("bob") and ms.maildir("alice") and cap.messages(), 30,
             "local and smtp delivery and a bounce notice")
    cfg = Config.load(str(ms.etc))
    unpriv = {s.name: s.unpriv for s in load_master_cf(str(ms.etc / "master.cf"), cfg)}
    owner = mail_owner(ms)
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...], list[int]]] = {}
    for p in psutil.Process(ms.master_pid).children():
        service = service_of(p)
        if service is None or service not in unpriv:
            continue
        try:
            seen[service] = (tuple(p.uids()), tuple(p.gids()), sorted(set(p.gids()) | {
                int(g) for g in _groups(p.pid)}))
        except psutil.NoSuchProcess:
            continue
    for service in ("qmgr", "pickup", "smtp", "local", "bounce"):
        assert service in seen, f"no {service} process to look at: {sorted(seen)}"
    for service, (uids, gids, groups) in seen.items():
        if unpriv[service]:
            assert uids == (owner.pw_uid,) * 3, (service, uids)
            assert gids == (owner.pw_gid,) * 3, (service, gids)
            assert groups == [owner.pw_gid], (service, "supplementary groups", groups)
        elif service in ("local", "pipe"):  # as Postfix's: mail_owner's effective ids
            # after their init, real and saved uid root (root again to deliver)
            assert uids == (0, owner.pw_uid, 0), (service, "unpriv n, dropped", uids)
        else:
            assert uids[1] == 0, (service, "unpriv n runs as root", uids)
    assert bad_log_lines(ms.log()) == []


def _groups(pid: int) -> list[str]:
    """The supplementary group ids of a process (/proc/PID/status ``Groups:``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Groups:"):
                return line.split()[1:]
    return []
