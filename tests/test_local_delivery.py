"""transports.local: Maildir and mbox delivery, mailbox names, loops, limits, locks."""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import re
import resource
import signal
from pathlib import Path

import pytest
from test_agent_support import (
    CORPUS,
    SIMPLE,
    Env,
    close_log,  # noqa: F401 - autouse fixture
    make_env,
    round_trip,
)

from master.config import ConfigError
from master.config.validate import check_default_privs
from qmgrd.delivery import DeliverStatus
from qmgrd.spool import statuslog
from qmgrd.spool.message import QueueFile
from transports.local import LocalAgent, check_mailbox_name, mailbox_name


def deliver(env: Env, rcpts: list[str], content: bytes = SIMPLE,
            sender: str = "alice@example.com") -> tuple[str, DeliverStatus]:
    qid = env.queue(rcpts, content, sender=sender)
    agent = LocalAgent()
    agent.configure(env.cfg, "local")
    _, reply = round_trip(agent, env.request(qid, "mail.test.example"), env.ctx("local"))
    assert reply is not None
    return qid, reply


def content_lines(env: Env, qid: str) -> list[bytes]:
    with QueueFile.open(env.spool, "active", qid, lock=None, readonly=True) as qf:
        return list(qf.iter_lines())


def bounce_of(env: Env, qid: str) -> tuple[str, str]:
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    return dsn.status, dsn.reason


ROOT = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody")


def spool(tmp_path: Path) -> Path:
    """The mail spool directory as the agent makes it (mode 1777 as root)."""
    path = tmp_path / "mail"
    path.mkdir()
    path.chmod(0o1777)
    return path


def owned(path: Path) -> Path:
    """``path`` given to the user the agent delivers with for a name without an
    account (default_privs, nobody) when the test runs as root."""
    if ROOT:
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    return path


@pytest.fixture
def maildir_env(tmp_path: Path) -> Env:
    return make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail/")


@pytest.fixture
def mbox_env(tmp_path: Path) -> Env:
    return make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail")


def test_mailbox_name() -> None:
    assert mailbox_name("Bob@Example.NET") == "bob"
    assert mailbox_name("bob+lists@example.net", "+") == "bob"
    assert mailbox_name("bob-x+y@example.net", "+-") == "bob"
    assert mailbox_name("+only@example.net", "+") == "+only"
    assert mailbox_name("a@b@example.net") == "a@b"
    assert mailbox_name("postmaster") == "postmaster"
    assert check_mailbox_name("bob") == ""
    assert check_mailbox_name("") == 'unknown user: ""'
    for bad in ("../x", "a/b", ".hidden", "nul\0x", "x" * 256, "tab\tx"):
        assert check_mailbox_name(bad).startswith("invalid mailbox name"), bad


def test_maildir_delivery(maildir_env: Env, tmp_path: Path) -> None:
    qid, reply = deliver(maildir_env, ["Bob@example.net", "carol@example.net"])
    assert reply.status == 0 and not reply.hop_failed
    assert maildir_env.undone(qid) == []
    for user, rcpt in (("bob", "Bob@example.net"), ("carol", "carol@example.net")):
        base = tmp_path / "mail" / user
        assert sorted(p.name for p in base.iterdir()) == ["cur", "new", "tmp"]
        assert list((base / "tmp").iterdir()) == []
        (msg,) = list((base / "new").iterdir())
        # Postfix's new/ name: <sec>.V<dev>I<inode>M<usec>.<host>, hexadecimal
        m = re.fullmatch(r"\d+\.V([0-9a-f]+)I([0-9a-f]+)M\d{1,6}\.mail\.test\.example",
                         msg.name)
        assert m, msg.name
        st = os.stat(msg)
        assert (int(m.group(1), 16), int(m.group(2), 16)) == (st.st_dev, st.st_ino)
        assert os.stat(msg).st_mode & 0o777 == 0o600
        data = msg.read_bytes()
        assert data.startswith(b"Return-Path: <alice@example.com>\nDelivered-To: "
                               + rcpt.encode() + b"\n")
        assert data.endswith(b"\n\nhello\nworld\n") and b"\r" not in data
    lines = [ln for ln in maildir_env.log().splitlines() if "status=sent" in ln]
    assert len(lines) == 2
    assert all("relay=local" in ln and "(delivered to maildir)" in ln for ln in lines)


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.eml")
                                        if not p.name.startswith("10-")))
def test_corpus_into_maildir_byte_intact(maildir_env: Env, tmp_path: Path, name: str) -> None:
    qid, reply = deliver(maildir_env, ["bob@example.net"], (CORPUS / name).read_bytes())
    assert reply.status == 0
    (msg,) = list((tmp_path / "mail" / "bob" / "new").iterdir())
    expected = b"".join(x + b"\n" for x in content_lines(maildir_env, qid))
    assert msg.read_bytes() == (b"Return-Path: <alice@example.com>\n"
                                b"Delivered-To: bob@example.net\n" + expected)
    original = (CORPUS / name).read_bytes().replace(b"\r\n", b"\n")
    body = original.partition(b"\n\n")[2]
    if body and not body.endswith(b"\n"):
        body += b"\n"
    assert msg.read_bytes().endswith(body)


def test_mbox_delivery_appends_with_from_quoting(mbox_env: Env, tmp_path: Path) -> None:
    content = b"Subject: one\r\n\r\nFrom the start\r\nnot From here\r\n>From kept\r\n"
    _, r1 = deliver(mbox_env, ["bob@example.net"], content)
    _, r2 = deliver(mbox_env, ["bob@example.net"], SIMPLE, sender="")
    assert r1.status == 0 and r2.status == 0
    mbox = tmp_path / "mail" / "bob"
    assert os.stat(mbox).st_mode & 0o777 == 0o600
    assert not (tmp_path / "mail" / "bob.lock").exists()
    text = mbox.read_bytes()
    first, second = text.split(b"\n\nFrom MAILER-DAEMON  ")
    assert re.match(rb"From alice@example\.com  \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n",
                    first)
    assert b"\n>From the start\nnot From here\n>From kept\n" in first + b"\n"
    assert b"Return-Path: <>\nDelivered-To: bob@example.net\n" in second
    assert text.endswith(b"\nhello\nworld\n\n")
    assert "(delivered to mailbox)" in mbox_env.log()


def test_recipient_delimiter(tmp_path: Path) -> None:
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail/", recipient_delimiter="+")
    _, reply = deliver(env, ["bob+news@example.net"])
    assert reply.status == 0
    (msg,) = list((tmp_path / "mail" / "bob" / "new").iterdir())
    assert b"Delivered-To: bob+news@example.net\n" in msg.read_bytes()


@pytest.mark.parametrize(("rcpt", "reason"), [
    ("../etc@example.net", 'invalid mailbox name: "../etc"'),
    (".profile@example.net", 'invalid mailbox name: ".profile"'),
    ("a/b@example.net", 'invalid mailbox name: "a/b"'),
    ("x" * 300 + "@example.net", "invalid mailbox name: "),
])
def test_invalid_local_parts_bounce(maildir_env: Env, tmp_path: Path, rcpt: str,
                                    reason: str) -> None:
    qid, reply = deliver(maildir_env, [rcpt])
    assert reply.status == 0
    status, text = bounce_of(maildir_env, qid)
    assert status == "5.1.1" and text.startswith(reason)
    assert not (tmp_path / "mail").exists() or list((tmp_path / "mail").iterdir()) == []


def test_empty_and_nul_local_part(maildir_env: Env) -> None:
    qid = maildir_env.queue(["placeholder@example.net", "other@example.net"])
    req = maildir_env.request(qid)
    req.recipients[0].address = "@example.net"
    req.recipients[1].address = "nul\0byte@example.net"
    agent = LocalAgent()
    agent.configure(maildir_env.cfg, "local")
    status = agent.handle(req)
    assert status.status == 0
    got = [d.reason for _, d in statuslog.read(maildir_env.spool, "bounce", qid)]
    assert got[0] == 'unknown user: ""'
    assert got[1].startswith("invalid mailbox name")


def test_delivered_to_loop_bounces(maildir_env: Env, tmp_path: Path) -> None:
    content = (b"Delivered-To: other@example.net\r\nDelivered-To:\r\n BOB@example.net\r\n"
               b"Subject: loop\r\n\r\nbody\r\n")
    qid, reply = deliver(maildir_env, ["bob@example.net", "carol@example.net"], content)
    assert reply.status == 0
    assert bounce_of(maildir_env, qid) == ("5.4.6", "mail forwarding loop for bob@example.net")
    assert not (tmp_path / "mail" / "bob").exists()
    assert len(list((tmp_path / "mail" / "carol" / "new").iterdir())) == 1


def test_passwd_check_when_local_recipient_maps_set(tmp_path: Path) -> None:
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail/",
                   local_recipient_maps="proxy:unix:passwd.byname")
    qid, reply = deliver(env, ["no-such-user-qmgrd@example.net"])
    assert reply.status == 0
    assert bounce_of(env, qid) == ("5.1.1", 'unknown user: "no-such-user-qmgrd"')
    if os.geteuid() == 0:
        _, reply2 = deliver(env, ["root@example.net"])
        assert reply2.status == 0
        assert len(list((tmp_path / "mail" / "root" / "new").iterdir())) == 1


def test_mailbox_size_limit(tmp_path: Path) -> None:
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail",
                   mailbox_size_limit="300", message_size_limit="200")
    _, r1 = deliver(env, ["bob@example.net"])
    assert r1.status == 0
    size = os.path.getsize(tmp_path / "mail" / "bob")
    qid, r2 = deliver(env, ["bob@example.net"])
    assert r2.status == 0
    status, reason = bounce_of(env, qid)
    assert status == "5.2.2" and "File too large" in reason
    assert os.path.getsize(tmp_path / "mail" / "bob") == size


def test_mailbox_size_limit_maildir(tmp_path: Path) -> None:
    """Postfix: mailbox_size_limit is "the maximal size of any local(8) individual
    mailbox or maildir file" (set_file_limit): a message bigger than it bounces 5.2.2
    from a Maildir too, and leaves no file in tmp/ or new/. The message fits
    message_size_limit (equal, as validation allows), the file with Return-Path: and
    Delivered-To: does not."""
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail/",
                   mailbox_size_limit="600", message_size_limit="600")
    _, r1 = deliver(env, ["alice@example.net"])
    assert r1.status == 0
    qid, r2 = deliver(env, ["bob@example.net"], SIMPLE + b"y" * 400 + b"\r\n")
    assert r2.status == 0
    status, reason = bounce_of(env, qid)
    assert status == "5.2.2" and "File too large" in reason
    assert not list((tmp_path / "mail" / "bob" / "new").iterdir())
    assert not list((tmp_path / "mail" / "bob" / "tmp").iterdir())


def test_write_error_truncates_mbox_back(tmp_path: Path) -> None:
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail",
                   mailbox_size_limit="0")
    mbox = spool(tmp_path) / "bob"
    mbox.write_bytes(b"x" * 20000)
    owned(mbox)
    qid = env.queue(["bob@example.net"], SIMPLE + b"y" * 5000 + b"\r\n")
    agent = LocalAgent()
    agent.configure(env.cfg, "local")
    req = env.request(qid)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20100, old[1]))
    try:
        status = agent.handle(req)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert status.status == 0
    assert mbox.read_bytes() == b"x" * 20000
    assert bounce_of(env, qid)[0] == "5.2.2"


def test_mailbox_is_a_directory_defers(mbox_env: Env, tmp_path: Path) -> None:
    (spool(tmp_path) / "bob").mkdir()
    qid, reply = deliver(mbox_env, ["bob@example.net"])
    assert reply.status == 1 and not reply.hop_failed
    ((_, dsn),) = statuslog.read(mbox_env.spool, "defer", qid)
    assert dsn.status == "4.2.0" and "cannot open mailbox" in dsn.reason


def test_stale_dotlock_is_removed(tmp_path: Path) -> None:
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail",
                   mailbox_delivery_lock="dotlock", stale_lock_time="60s",
                   deliver_lock_attempts="2", deliver_lock_delay="0s")
    lock = spool(tmp_path) / "bob.lock"
    lock.write_text("")
    owned(lock)  # sticky spool: only the delivery user can remove its stale lock
    os.utime(lock, (1, 1))
    _, reply = deliver(env, ["bob@example.net"])
    assert reply.status == 0 and not lock.exists()
    lock.write_text("")  # fresh: held by someone else
    qid, reply2 = deliver(env, ["bob@example.net"])
    assert reply2.status == 1 and lock.exists()
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert dsn.reason.startswith("unable to create lock file")


def test_locked_mailbox_defers(tmp_path: Path) -> None:
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail",
                   mailbox_delivery_lock="flock", deliver_lock_attempts="1")
    mbox = spool(tmp_path) / "bob"
    mbox.write_bytes(b"")
    owned(mbox)
    with open(mbox, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        qid, reply = deliver(env, ["bob@example.net"])
    assert reply.status == 1
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert dsn.reason.startswith("unable to lock for exclusive access")
    assert mbox.read_bytes() == b""


# --------------------------------------------------------------- privileges and symlinks

def test_maildir_through_a_symlink_is_refused(maildir_env: Env, tmp_path: Path) -> None:
    """var/mail/evil -> /etc must not make root (or anyone) create /etc/{tmp,new,cur}."""
    target = tmp_path / "target"
    target.mkdir()
    (spool(tmp_path) / "evil").symlink_to(target)
    qid, reply = deliver(maildir_env, ["evil@example.net"])
    assert reply.status == 0
    status, reason = bounce_of(maildir_env, qid)
    assert status == "5.2.0"
    assert reason == f"create maildir {tmp_path}/mail/evil: {tmp_path}/mail/evil is a symbolic link"
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("sub", ["tmp", "new", "cur"])
def test_maildir_subdirectory_symlink_is_refused(maildir_env: Env, tmp_path: Path,
                                                 sub: str) -> None:
    target = tmp_path / "target"
    target.mkdir()
    base = spool(tmp_path) / "bob"
    base.mkdir()
    owned(base)
    (base / sub).symlink_to(target)
    qid, reply = deliver(maildir_env, ["bob@example.net"])
    assert reply.status == 0
    assert bounce_of(maildir_env, qid) == (
        "5.2.0", f"create maildir {base}: {base}/{sub} is a symbolic link")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("dangling", [False, True])
def test_mbox_symlink_is_refused(mbox_env: Env, tmp_path: Path, dangling: bool) -> None:
    """Postfix safe_open(): "file is a symbolic link", bounced with 5.2.0 (mbox_dsn)."""
    target = tmp_path / "target"
    if not dangling:
        target.write_bytes(b"keep\n")
    (spool(tmp_path) / "evil").symlink_to(target)
    qid, reply = deliver(mbox_env, ["evil@example.net"])
    assert reply.status == 0
    reason = (f"cannot update mailbox {tmp_path}/mail/evil for user evil. "
              "file is a symbolic link")
    assert bounce_of(mbox_env, qid) == ("5.2.0", reason)
    if dangling:
        assert not target.exists()
    else:
        assert target.read_bytes() == b"keep\n"


@pytest.mark.skipif(not ROOT, reason="privileges are switched only by root")
@pytest.mark.parametrize("layout", ["maildir", "mbox"])
def test_delivery_rights(tmp_path: Path, layout: str) -> None:
    """The account's uid/gid for a system account; default_privs (nobody) for a name
    without an account and for root; never root. The spool is made mode 1777."""
    daemon = pwd.getpwnam("daemon")
    slash = "/" if layout == "maildir" else ""
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail{slash}")
    groups = os.getgroups()
    _, reply = deliver(env, ["daemon@example.net", "bob@example.net", "root@example.net"])
    assert reply.status == 0
    assert (os.geteuid(), os.getegid(), os.getgroups()) == (0, 0, groups)
    mail = tmp_path / "mail"
    assert os.stat(mail).st_mode & 0o7777 == 0o1777
    for name, account in (("daemon", daemon), ("bob", NOBODY), ("root", NOBODY)):
        paths = [mail / name]
        if layout == "maildir":
            paths += [mail / name / "new", *(mail / name / "new").iterdir()]
            assert len(paths) == 3
        for path in paths:
            st = os.stat(path)
            assert (st.st_uid, st.st_gid) == (account.pw_uid, account.pw_gid), path


@pytest.mark.skipif(not ROOT, reason="default_privs is used only by root")
@pytest.mark.parametrize(("value", "why"), [
    ("no-such-user-qmgrd", "unknown user name value: no-such-user-qmgrd"),
    ("root", "user root has privileged user ID"),
])
def test_bad_default_privs(tmp_path: Path, value: str, why: str) -> None:
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail/", default_privs=value)
    with pytest.raises(ConfigError) as info:
        LocalAgent().configure(env.cfg, "local")
    assert str(info.value) == f"{tmp_path}/etc/main.cf, line 10: parameter default_privs: {why}"
    with pytest.raises(ConfigError) as info2:
        check_default_privs(env.cfg, euid=0)
    assert str(info2.value) == str(info.value)
    check_default_privs(env.cfg, euid=1000)  # not root: not used, not checked


# --------------------------------------------------------------- mailbox ownership

DAEMON = pwd.getpwnam("daemon")
OWNER_WARNING = ('warning: specify "strict_mailbox_ownership = no" to ignore mailbox '
                 "ownership mismatch")


def planted(path: Path, directory: bool) -> Path:
    """``path`` made beforehand by another local user (daemon), open to everyone: the
    trap in a world-writable spool."""
    if directory:
        path.mkdir()
    else:
        path.write_bytes(b"")
    os.chown(path, DAEMON.pw_uid, DAEMON.pw_gid)
    path.chmod(0o777 if directory else 0o666)
    return path


@pytest.mark.skipif(not ROOT, reason="a file of another user is made only by root")
@pytest.mark.parametrize("sub", ["", "tmp", "new", "cur"])
def test_maildir_not_owned_by_recipient_defers(maildir_env: Env, tmp_path: Path,
                                               sub: str) -> None:
    base = spool(tmp_path) / "bob"
    if sub:
        base.mkdir()
        owned(base)
    trap = planted(base / sub if sub else base, directory=True)
    qid, reply = deliver(maildir_env, ["bob@example.net"])
    assert reply.status == 1 and not reply.hop_failed
    ((_, dsn),) = statuslog.read(maildir_env.spool, "defer", qid)
    shown = f"{base}/{sub}" if sub else str(base)
    assert (dsn.status, dsn.reason) == (
        "4.2.0", f"create maildir {base}: {shown} is not owned by recipient")
    assert list(trap.iterdir()) == []
    assert OWNER_WARNING in maildir_env.log()


@pytest.mark.skipif(not ROOT, reason="a file of another user is made only by root")
def test_strict_mailbox_ownership_no_maildir(tmp_path: Path) -> None:
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail/",
                   strict_mailbox_ownership="no")
    planted(spool(tmp_path) / "bob", directory=True)
    _, reply = deliver(env, ["bob@example.net"])
    assert reply.status == 0


@pytest.mark.skipif(not ROOT, reason="privileges are switched only by root")
def test_default_privs_names_share_the_owner_check(maildir_env: Env, tmp_path: Path) -> None:
    """Names without an account all deliver as default_privs (nobody), as in Postfix: an
    existing Maildir owned by nobody passes the check for any such name."""
    base = spool(tmp_path) / "bob"
    for path in (base, base / "tmp", base / "new", base / "cur"):
        path.mkdir()
        owned(path)
    _, reply = deliver(maildir_env, ["bob@example.net", "carol@example.net"])
    assert reply.status == 0
    assert len(list((base / "new").iterdir())) == 1
    assert os.stat(tmp_path / "mail" / "carol").st_uid == NOBODY.pw_uid


@pytest.mark.skipif(not ROOT, reason="another user's file can be made only by root")
@pytest.mark.parametrize("strict", ["yes", "no"])
def test_mbox_of_another_owner_defers(tmp_path: Path, strict: str) -> None:
    """Postfix strict_mailbox_ownership: in the 1777 spool a user may make bob's
    mailbox beforehand (mode 0666, their own) to read bob's mail: deferred 4.2.0."""
    daemon = pwd.getpwnam("daemon")
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail",
                   strict_mailbox_ownership=strict)
    mbox = spool(tmp_path) / "bob"  # bob: no account, delivered as nobody
    mbox.write_bytes(b"")
    os.chown(mbox, daemon.pw_uid, daemon.pw_gid)
    mbox.chmod(0o666)
    qid, reply = deliver(env, ["bob@example.net"])
    if strict == "no":
        assert reply.status == 0 and mbox.read_bytes().startswith(b"From ")
        return
    assert reply.status == 1 and mbox.read_bytes() == b""
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    # Postfix's wording: mailbox.c prepends "cannot update mailbox ... for user ...".
    reason = (f"cannot update mailbox {mbox} for user bob. "
              f"destination {mbox} is not owned by recipient")
    assert (dsn.status, dsn.reason) == ("4.2.0", reason)
    assert OWNER_WARNING in env.log()


def test_stale_dotlock_that_cannot_be_removed_is_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale lock the delivery user may not remove (another user's, in a sticky
    spool): every attempt but the last is followed by deliver_lock_delay, as for a live
    lock, instead of all attempts being spent at once; then a deferral."""
    from transports import local as local_module

    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail",
                   mailbox_delivery_lock="dotlock", stale_lock_time="60s",
                   deliver_lock_attempts="3", deliver_lock_delay="1s")
    lock = spool(tmp_path) / "bob.lock"
    lock.write_text("")
    os.utime(lock, (1, 1))

    def refused(name: str, dir_fd: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    sleeps: list[float] = []
    monkeypatch.setattr(local_module, "_unlink", refused)
    monkeypatch.setattr(local_module.time, "sleep", sleeps.append)
    qid, reply = deliver(env, ["bob@example.net"])
    assert reply.status == 1 and lock.exists()
    assert sleeps == [1, 1]
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert dsn.reason.startswith("unable to create lock file")


# --------------------------------------------------------------- spools not world-writable

def _mail_gid() -> int:
    """Debian's group mail (8 when there is none)."""
    try:
        return grp.getgrnam("mail").gr_gid
    except KeyError:
        return 8


MAIL_GID = _mail_gid()


def system_spool(tmp_path: Path, mode: int) -> Path:
    """A mail spool made by the system, not by the agent: root:mail, ``mode``."""
    path = tmp_path / "mail"
    path.mkdir()
    os.chown(path, 0, MAIL_GID)
    path.chmod(mode)
    return path


@pytest.mark.skipif(not ROOT, reason="privileges are switched only by root")
@pytest.mark.parametrize("mode", [0o2775, 0o755], ids=["2775", "0755"])
def test_mbox_in_a_spool_not_world_writable(tmp_path: Path, mode: int) -> None:
    """Debian's /var/mail (root:mail 2775) and a root-only 0755 one: Postfix
    deliver_mailbox_file() locks and creates the mbox with the recipient's uid and the
    spool's gid (group-writable) or as root (then fchown to the recipient), and writes
    with the recipient's rights; an existing mbox is used (daemon:mail 0660)."""
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail",
                   mailbox_delivery_lock="fcntl, dotlock")
    mail = system_spool(tmp_path, mode)
    existing = mail / "daemon"
    existing.write_bytes(b"")
    os.chown(existing, DAEMON.pw_uid, MAIL_GID)
    existing.chmod(0o660)
    groups = os.getgroups()
    _, reply = deliver(env, ["daemon@example.net", "bob@example.net"])
    assert reply.status == 0 and not reply.hop_failed
    assert (os.geteuid(), os.getegid(), os.getgroups()) == (0, 0, groups)
    assert sorted(p.name for p in mail.iterdir()) == ["bob", "daemon"]  # locks removed
    st = os.stat(existing)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (DAEMON.pw_uid, MAIL_GID, 0o660)
    assert existing.read_bytes().startswith(b"From alice@example.com  ")
    new = os.stat(mail / "bob")  # no account: default_privs (nobody)
    gid = MAIL_GID if mode & 0o020 else NOBODY.pw_gid
    assert (new.st_uid, new.st_gid, new.st_mode & 0o7777) == (NOBODY.pw_uid, gid, 0o600)
    assert (mail / "bob").read_bytes().startswith(b"From alice@example.com  ")


@pytest.mark.skipif(not ROOT, reason="privileges are switched only by root")
@pytest.mark.parametrize("mode", [0o2775, 0o755], ids=["2775", "0755"])
def test_mbox_checks_in_a_spool_not_world_writable(tmp_path: Path, mode: int) -> None:
    """Created with more rights than the recipient's, the mbox keeps every check: a
    symlink bounces, another user's mbox defers, and nothing is written through them."""
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail")
    mail = system_spool(tmp_path, mode)
    target = tmp_path / "target"
    target.write_bytes(b"keep\n")
    (mail / "evil").symlink_to(target)
    (mail / "dangling").symlink_to(tmp_path / "nowhere")
    foreign = planted(mail / "bob", directory=False)  # 0666: openable by anyone
    qid, reply = deliver(env, ["evil@example.net", "dangling@example.net",
                               "bob@example.net"])
    assert reply.status == 1 and not reply.hop_failed
    assert target.read_bytes() == b"keep\n" and not (tmp_path / "nowhere").exists()
    assert foreign.read_bytes() == b""
    bounced = [dsn for _, dsn in statuslog.read(env.spool, "bounce", qid)]
    assert sorted((dsn.status, dsn.reason) for dsn in bounced) == [
        ("5.2.0", (f"cannot update mailbox {mail}/{name} for user {name}. "
                   "file is a symbolic link")) for name in ("dangling", "evil")]
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert (dsn.status, dsn.reason) == (
        "4.2.0", (f"cannot update mailbox {foreign} for user bob. "
                  f"destination {foreign} is not owned by recipient"))
    assert sorted(p.name for p in mail.iterdir()) == ["bob", "dangling", "evil"]
