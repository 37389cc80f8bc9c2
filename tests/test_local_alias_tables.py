"""alias_maps tables: empty values, duplicate names, and re-reading a file that is
being rewritten (qmgrd.maps.AliasMaps)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_agent_support import close_log, round_trip  # noqa: F401 - autouse fixture
from test_local_alias import alias_env, inbox
from test_local_delivery import deliver

import qmgrd.maps
from qmgrd.maps import AliasMaps, open_alias_table
from qmgrd.spool import statuslog
from transports.local import LocalAgent

NOW = 1_800_000_000.0


def write(path: Path, text: str, mtime: float) -> None:
    """Write ``text`` to ``path`` (truncate + write, as ``cat new > path``) with
    modification time ``mtime``."""
    path.write_text(text)
    os.utime(path, (mtime, mtime))


def test_empty_value_is_warned_about_and_skipped(tmp_path: Path) -> None:
    """postalias: ``name:`` with nothing after the colon is "need name:value pair"
    and skipped; the name is no alias (it bounced 5.4.6 mail forwarding loop)."""
    env = alias_env(tmp_path)
    table = tmp_path / "aliases"
    table.write_text("empty:\npostmaster: root\nspaces:   \t\ncont:\n  alice\n")
    t = open_alias_table(f"hash:{table}")
    assert t.lookup("empty") is None and t.lookup("spaces") is None
    assert (t.lookup("postmaster"), t.lookup("cont")) == ("root", "alice")
    log = env.log()
    for line in (1, 3):
        assert log.count(f"warning: {table}, line {line}: need name:value pair -- "
                         "ignoring this line") == 1
    assert log.count("need name:value pair") == 2
    qid, reply = deliver(env, ["empty@localhost"])
    assert reply.status == 0
    assert statuslog.read(env.spool, "bounce", qid) == []
    assert len(inbox(tmp_path, "empty")) == 1  # as any unaliased local name


def test_duplicate_warned_once_per_load(tmp_path: Path) -> None:
    """A duplicate name: one warning (file, line) per load of the table, the first
    entry kept - not one per lookup or delivery."""
    env = alias_env(tmp_path)
    table = tmp_path / "aliases"
    write(table, "list: alice\nother: bob\nLIST: carol\n", NOW - 100)
    agent = LocalAgent()
    agent.configure(env.cfg, "local")
    for _ in range(3):
        qid = env.queue(["list@localhost", "other@localhost", "zed@localhost"],
                        b"Subject: x\n\nhi\n")
        round_trip(agent, env.request(qid, "mail.test.example"), env.ctx("local"))
    assert len(inbox(tmp_path, "alice")) == 3 and not inbox(tmp_path, "carol")
    dup = f'warning: {table}, line 3: duplicate entry: "list"'
    assert env.log().count(dup) == 1
    maps = AliasMaps([f"hash:{table}"], clock=lambda: NOW)
    for _ in range(5):
        assert maps.lookup("list") == "alice" and maps.lookup("nobody") is None
    assert env.log().count(dup) == 2   # this second table's own load
    write(table, "list: dave\nLIST: carol\n", NOW - 10)
    for _ in range(5):
        assert maps.lookup("list") == "dave"
    assert env.log().count('duplicate entry: "list"') == 3   # one more: the new load


def test_changed_file_used_only_once_settled(tmp_path: Path) -> None:
    """A changed file modified less than the settle time ago may be half written
    (``cat big > aliases``): the previous contents stay in use until it has been
    left alone for that long."""
    env = alias_env(tmp_path)
    table = tmp_path / "aliases"
    write(table, "a: b\nbad line\n", NOW - 100)
    clock = [NOW]
    maps = AliasMaps([f"texthash:{table}"], settle=1.0, clock=lambda: clock[0])
    assert maps.lookup("a") == "b"
    write(table, "x: y\n", NOW - 0.5)   # truncated: "a" not (yet) there
    assert maps.lookup("a") == "b" and maps.lookup("x") is None
    clock[0] = NOW + 0.5   # 1 s after the last change: complete
    assert maps.lookup("a") is None and maps.lookup("x") == "y"
    # a modification time in the future (touch -d, cp -p, a clock stepped back) is no
    # sign of a write under way: read at once, not ignored until that time comes
    write(table, "a: c\n", NOW + 3600)
    assert maps.lookup("a") == "c"
    write(table, "a: d\n", NOW + 0.7)   # only just in the future (clock NOW + 0.5)
    assert maps.lookup("a") == "d"
    assert env.log().count(f"{table}, line 2: need name:value pair") == 1  # 1st load


def test_file_rewritten_while_read_keeps_previous(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that changes while it is being read (stat before and after differ) is
    not used, and the warnings of that reading are not logged; the next lookup reads
    it again."""
    env = alias_env(tmp_path)
    table = tmp_path / "aliases"
    write(table, "a: b\n", NOW - 100)
    maps = AliasMaps([f"hash:{table}"], clock=lambda: NOW)
    assert maps.lookup("a") == "b"
    write(table, "x:\n", NOW - 50)   # half written: no "a", and a bad line
    parse = qmgrd.maps._parse_aliases

    def racing(path: str, warn: Callable[[str], None]) -> dict[str, str]:
        data = parse(path, warn)
        write(table, "a: c\nx:\n", NOW - 20)   # the writer goes on meanwhile
        return data

    monkeypatch.setattr(qmgrd.maps, "_parse_aliases", racing)
    assert maps.lookup("a") == "b"
    assert "need name:value pair" not in env.log()
    monkeypatch.setattr(qmgrd.maps, "_parse_aliases", parse)
    assert maps.lookup("a") == "c"
    assert env.log().count(f"warning: {table}, line 2: need name:value pair") == 1


def test_alias_file_truncated_under_delivery(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The tester's case: ``cat big > etc/aliases`` in a loop while mail came for an
    alias near the end of the file; a lookup that read the truncated file delivered
    to a mailbox named after the alias itself."""
    monkeypatch.setattr(qmgrd.maps, "SETTLE_TIME", 3600.0, raising=False)
    env = alias_env(tmp_path)
    table = tmp_path / "aliases"
    big = "".join(f"user{i}: target{i}\n" for i in range(2000)) + "last: carol\n"
    write(table, big, time.time() - 7200)
    agent = LocalAgent()
    agent.configure(env.cfg, "local")
    for cut in (0, len(big) // 2, len(big) - 5):
        table.write_text(big[:cut])   # mtime: now, the rewrite is under way
        qid = env.queue(["last@localhost"], b"Subject: x\n\nhi\n")
        round_trip(agent, env.request(qid, "mail.test.example"), env.ctx("local"))
        assert statuslog.read(env.spool, "bounce", qid) == []
    assert len(inbox(tmp_path, "carol")) == 3
    assert not (tmp_path / "mail" / "last").exists()
