"""alias_maps: the local agent's alias expansion and the aliases(5) table format."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_agent_support import Env, close_log, make_env  # noqa: F401 - autouse fixture
from test_local_delivery import bounce_of, deliver

from qmgrd.maps import AliasMaps, TableError, open_alias_table
from qmgrd.spool import statuslog
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
    bad = tmp_path / "bad"
    bad.write_text("no colon here\n")
    with pytest.raises(TableError, match="line 1"):
        open_alias_table(f"hash:{bad}")


def test_split_targets() -> None:
    assert split_targets('alice,  bob@x "c d" , e') == ["alice", "bob@x", "c d", "e"]
    assert split_targets('|/bin/cmd -a b, alice') == ["|/bin/cmd -a b", "alice"]
    assert split_targets('"|/bin/cmd x", :include:/a') == ["|/bin/cmd x", ":include:/a"]


def test_unreadable_tables_are_logged_once_and_match_nothing(tmp_path: Path) -> None:
    env = alias_env(tmp_path)
    maps = AliasMaps(["nis:mail.aliases", f"hash:{tmp_path}/missing"])
    assert maps.lookup("postmaster") is None and maps.lookup("x") is None
    log = env.log()
    assert log.count("alias_maps: nis:mail.aliases: unsupported dictionary type") == 1
    assert log.count("missing: No such file or directory: table ignored") == 1


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


def test_remote_target_defers_after_local_ones(tmp_path: Path) -> None:
    env = alias_env(tmp_path)
    qid, _ = deliver(env, ["remote@localhost"])
    assert len(inbox(tmp_path, "alice")) == 1
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    why = "someone@elsewhere.example: alias forwarding to remote addresses is not " \
          "implemented"
    assert (dsn.status, dsn.reason) == ("4.3.0", why)


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
