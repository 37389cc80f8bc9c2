"""alias_maps: the local agent's alias expansion and the aliases(5) table format."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_agent_support import Env, close_log, make_env  # noqa: F401 - autouse fixture
from test_local_delivery import bounce_of, deliver

from qmgrd.maps import AliasMaps, TableUnavailable, open_alias_table
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import DSN_NOTIFY_SUCCESS, Recipient
from transports.local_alias import split_targets

ALIASES = """\
# comment
postmaster:    root
root: root, carol
Team: alice,
  bob@localhost, "dave"
self: self
list: alice, bob
loop-a: loop-b
loop-b: loop-a
news: alice
remote: alice, someone@elsewhere.example
pipe: "|/usr/bin/procmail -a x", alice
file: /tmp/x
inc: :include:/etc/list
"""


def alias_env(tmp_path: Path, **main: str) -> Env:
    table = tmp_path / "aliases"
    table.write_text(ALIASES)
    settings = {"mail_spool_directory": f"{tmp_path}/mail/",
                "alias_maps": f"hash:{table}, nis:mail.aliases"}
    settings.update(main)
    return make_env(tmp_path, **settings)


def inbox(tmp_path: Path, user: str) -> list[bytes]:
    new = tmp_path / "mail" / user / "new"
    return [p.read_bytes() for p in new.iterdir()] if new.exists() else []


def test_alias_file_syntax(tmp_path: Path) -> None:
    table = tmp_path / "aliases"
    table.write_text(ALIASES)
    t = open_alias_table(f"hash:{table}")
    assert t.lookup("postmaster") == "root"
    assert t.lookup("TEAM") == 'alice, bob@localhost, "dave"'
    assert t.lookup("root:") is None
    with pytest.raises(TableUnavailable, match="No such file"):
        open_alias_table(f"hash:{tmp_path}/missing")


def test_bad_alias_lines_are_warned_about_and_skipped(tmp_path: Path) -> None:
    """postalias: a line without "name:" is one warning (file, line) and is skipped;
    the other entries are kept (it made the whole table ignored)."""
    env = alias_env(tmp_path)
    bad = tmp_path / "bad"
    bad.write_text("  leading: white space\npostmaster: root\nteam alice\n"
                   '"": empty\nroot: carol\n')
    t = open_alias_table(f"hash:{bad}")
    assert (t.lookup("postmaster"), t.lookup("root")) == ("root", "carol")
    assert t.lookup("team") is None and t.lookup("leading") is None
    log = env.log()
    assert log.count(f"warning: {bad}, line 3: need name:value pair -- ignoring this "
                     "line") == 1
    assert log.count(f"warning: {bad}, line 4: need name:value pair") == 1
    assert log.count(f'warning: {bad}, line 1: logical line must not start with '
                     'whitespace: "leading: white space" -- ignoring this line') == 1
    assert "table ignored" not in log


def test_alias_typo_still_expands_postmaster(tmp_path: Path) -> None:
    """The tester's case: one typo in etc/aliases sent postmaster's mail to the
    postmaster mailbox instead of root's."""
    env = alias_env(tmp_path)
    with open(tmp_path / "aliases", "a") as f:
        f.write("team alice\n")
    _, reply = deliver(env, ["postmaster@mail.test.example"])
    assert reply.status == 0
    assert len(inbox(tmp_path, "root")) == 1
    assert not (tmp_path / "mail" / "postmaster").exists()
    assert f"{tmp_path}/aliases, line 15: need name:value pair" in env.log()


@pytest.mark.parametrize("recipient_maps", ["", "proxy:unix:passwd.byname"])
def test_missing_alias_file_defers(tmp_path: Path, recipient_maps: str) -> None:
    """Postfix's local(8): an alias table lookup error defers (4.3.0 alias database
    unavailable) - neither the unexpanded name's mailbox nor 5.1.1 unknown user."""
    env = alias_env(tmp_path, local_recipient_maps=recipient_maps)
    (tmp_path / "aliases").unlink()
    qid, _ = deliver(env, ["postmaster@mail.test.example"])
    assert statuslog.read(env.spool, "bounce", qid) == []
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert (dsn.status, dsn.reason) == ("4.3.0", "alias database unavailable")
    assert not (tmp_path / "mail").exists() or not any((tmp_path / "mail").iterdir())
    assert env.log().count("aliases: No such file or directory: alias database "
                           "unavailable") == 1


def test_unreadable_target_lookup_defers_that_target(tmp_path: Path) -> None:
    """A target's own lookup failing (the second table cannot be read; the first one
    matched the recipient) defers that target, so the recipient as a whole."""
    (tmp_path / "first").write_text("list: alice, bob\n")
    env = alias_env(tmp_path, alias_maps=f"hash:{tmp_path}/first, hash:{tmp_path}/gone")
    qid, _ = deliver(env, ["list@localhost"])
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert (dsn.status, dsn.reason) == (
        "4.3.0", "alice@mail.test.example: alias database unavailable")
    assert statuslog.read(env.spool, "bounce", qid) == []


def test_split_targets() -> None:
    assert split_targets('alice,  bob@x "c d" , e') == ["alice", "bob@x", "c d", "e"]
    assert split_targets('|/bin/cmd -a b, alice') == ["|/bin/cmd -a b", "alice"]
    assert split_targets('"|/bin/cmd x", :include:/a') == ["|/bin/cmd x", ":include:/a"]


def test_unsupported_type_is_logged_once_and_matches_nothing(tmp_path: Path) -> None:
    env = alias_env(tmp_path)
    maps = AliasMaps(["nis:mail.aliases", f"hash:{tmp_path}/aliases"])
    assert maps.lookup("postmaster") == "root" and maps.lookup("x") is None
    assert env.log().count("alias_maps: nis:mail.aliases: unsupported dictionary "
                           "type: nis: table ignored") == 1


def test_missing_file_raises_is_logged_once_and_is_tried_again(tmp_path: Path) -> None:
    env = alias_env(tmp_path)
    first = tmp_path / "first"
    first.write_text("a: b\n")
    missing = tmp_path / "missing"
    maps = AliasMaps([f"hash:{first}", f"hash:{missing}"])
    assert maps.lookup("a") == "b"  # found before the table that cannot be read
    for _ in range(2):
        with pytest.raises(TableUnavailable, match="No such file or directory"):
            maps.lookup("x")
    assert env.log().count(f"alias_maps: hash:{missing}: No such file or directory: "
                           "alias database unavailable") == 1
    missing.write_text("x: y\n")
    assert maps.lookup("x") == "y"


def test_changed_file_is_read_again(tmp_path: Path) -> None:
    table = tmp_path / "aliases"
    table.write_text("a: b\n")
    maps = AliasMaps([f"texthash:{table}"])
    assert maps.lookup("a") == "b"
    table.write_text("a: c\n")
    os.utime(table, (1, 1))
    assert maps.lookup("a") == "c"


def test_postmaster_goes_to_root_with_passwd_check(tmp_path: Path) -> None:
    """The operator's case: local_recipient_maps set, postmaster has no account."""
    env = alias_env(tmp_path, local_recipient_maps="proxy:unix:passwd.byname")
    qid, reply = deliver(env, ["postmaster@mail.test.example"])
    assert reply.status == 0
    # root: root, carol - root's own mailbox; carol has no account: unknown user
    (msg,) = inbox(tmp_path, "root")
    assert b"Delivered-To: root@mail.test.example\n" in msg
    assert not (tmp_path / "mail" / "postmaster").exists()
    assert bounce_of(env, qid) == (
        "5.1.1", 'carol@mail.test.example: unknown user: "carol"')
    (tmp_path / "aliases").write_text("postmaster: root\n")
    os.utime(tmp_path / "aliases", (1, 1))  # changed within the same clock tick
    shutil.rmtree(tmp_path / "mail" / "root")
    qid, reply = deliver(env, ["postmaster@mail.test.example"])
    assert statuslog.read(env.spool, "bounce", qid) == []
    assert len(inbox(tmp_path, "root")) == 1


def test_local_targets_recursive_and_case(tmp_path: Path) -> None:
    env = alias_env(tmp_path, recipient_delimiter="+")
    qid, reply = deliver(env, ["TEAM+x@mail.test.example", "self@localhost"])
    assert reply.status == 0
    assert statuslog.read(env.spool, "bounce", qid) == []
    assert len(inbox(tmp_path, "alice")) == 1
    (bob,) = inbox(tmp_path, "bob")
    assert b"Delivered-To: bob@localhost\n" in bob
    assert len(inbox(tmp_path, "dave")) == 1
    (me,) = inbox(tmp_path, "self")  # a name expanding to itself: its own mailbox
    assert b"Delivered-To: self@mail.test.example\n" in me  # @$myorigin
    assert not (tmp_path / "mail" / "team").exists()
    assert "status=sent (delivered to maildir)" in env.log()


def test_local_targets_success_notice_is_expanded(tmp_path: Path) -> None:
    """NOTIFY=SUCCESS on an alias, with several local targets or one: one trace entry
    2.0.0 "expanded" ``alias expanded`` (Postfix local/alias.c deliver_alias()), not
    "delivered"."""
    env = alias_env(tmp_path)
    qid, reply = deliver(env, [Recipient("list@localhost", notify=DSN_NOTIFY_SUCCESS),
                               Recipient("news@localhost", notify=DSN_NOTIFY_SUCCESS)])
    assert reply.status == 0
    assert len(inbox(tmp_path, "alice")) == 2 and len(inbox(tmp_path, "bob")) == 1
    got = {r.address: (d.status, d.action, d.reason)
           for r, d in statuslog.read(env.spool, "trace", qid)}
    assert got == {"list@localhost": ("2.0.0", "expanded", "delivery via local: alias expanded"),
                   "news@localhost": ("2.0.0", "expanded", "delivery via local: alias expanded")}
    assert "to=<list@localhost>, relay=local, " in env.log()
    assert "status=sent (delivered to maildir)" in env.log()


def test_extension_matched_whole_first(tmp_path: Path) -> None:
    env = alias_env(tmp_path, recipient_delimiter="+")
    (tmp_path / "aliases").write_text("bob+news: carol\nbob: dave\n")
    deliver(env, ["bob+news@localhost", "bob+other@localhost"])
    assert len(inbox(tmp_path, "carol")) == 1 and len(inbox(tmp_path, "dave")) == 1
    assert not (tmp_path / "mail" / "bob").exists()


def test_no_alias_delivers_to_own_mailbox(tmp_path: Path) -> None:
    env = alias_env(tmp_path)
    deliver(env, ["zed@localhost"])
    assert len(inbox(tmp_path, "zed")) == 1


def test_alias_loop_bounces(tmp_path: Path) -> None:
    env = alias_env(tmp_path)
    qid, _ = deliver(env, ["loop-a@localhost"])
    assert bounce_of(env, qid) == ("5.4.6", "mail forwarding loop for loop-a@localhost")


def test_remote_target_forwarded_after_local_ones(tmp_path: Path) -> None:
    """The remote target goes on as a new message (tests/test_local_forward.py)."""
    env = alias_env(tmp_path)
    qid, reply = deliver(env, ["remote@localhost"])
    assert reply.status == 0
    assert len(inbox(tmp_path, "alice")) == 1
    assert statuslog.read(env.spool, "defer", qid) == []
    (new,) = os.listdir(env.spool.queue_path("incoming"))
    assert f"status=sent (delivered to maildir; forwarded as {new})" in env.log()


@pytest.mark.parametrize(("rcpt", "reason"), [
    ("pipe", "|/usr/bin/procmail -a x: alias delivery to a command is not implemented"),
    ("file", "/tmp/x: alias delivery to a file is not implemented"),
    ("inc", ":include:/etc/list: alias :include: files are not implemented"),
])
def test_command_file_include_bounce(tmp_path: Path, rcpt: str, reason: str) -> None:
    env = alias_env(tmp_path)
    qid, _ = deliver(env, [f"{rcpt}@localhost"])
    assert bounce_of(env, qid) == ("5.7.1", reason)


def test_delivered_to_loop_on_a_target(tmp_path: Path) -> None:
    env = alias_env(tmp_path)
    content = b"Delivered-To: alice@mail.test.example\r\nSubject: x\r\n\r\nbody\r\n"
    qid, _ = deliver(env, ["list@localhost"], content)
    loop = "alice@mail.test.example: mail forwarding loop for alice@mail.test.example"
    assert bounce_of(env, qid) == ("5.4.6", loop)
    assert len(inbox(tmp_path, "bob")) == 1


def test_trailing_dot_target_is_local(tmp_path: Path) -> None:
    """Postfix's resolver strips one trailing dot: ``alice@localhost.`` is the local
    alice, delivered in this same delivery and merged with the other spellings (it was
    forwarded as a remote address, and alice got a second copy through the qmgr)."""
    env = alias_env(tmp_path)
    (tmp_path / "aliases").write_text(
        "caps: Alice, ALICE@LOCALHOST, alice@localhost., bob@localhost.\n")
    _, reply = deliver(env, ["caps@localhost"])
    assert reply.status == 0
    assert len(inbox(tmp_path, "alice")) == 1 and len(inbox(tmp_path, "bob")) == 1
    assert "forwarded as" not in env.log()
    assert sorted(os.listdir(env.spool.queue_path("incoming"))) == []


def test_alias_without_a_recipient_defers(tmp_path: Path) -> None:
    """A value with no address in it (only a comment): Postfix's local/alias.c warns
    ``no recipient in alias lookup result for <name>`` and defers 4.3.0 ``alias
    database unavailable`` (it was bounced 5.4.6 as a forwarding loop)."""
    env = alias_env(tmp_path)
    (tmp_path / "aliases").write_text("paren: (just a comment)\n")
    qid, reply = deliver(env, ["paren@localhost"])
    assert reply.status == 1  # deferred
    assert statuslog.read(env.spool, "bounce", qid) == []
    assert "warning: no recipient in alias lookup result for paren" in env.log()
    assert "dsn=4.3.0, status=deferred (alias database unavailable)" in env.log()
