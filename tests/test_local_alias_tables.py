"""alias_maps tables: empty values."""

from __future__ import annotations

import os
from pathlib import Path

from test_agent_support import close_log  # noqa: F401 - autouse fixture
from test_local_alias import alias_env, inbox
from test_local_delivery import deliver

from qmgrd.maps import open_alias_table
from qmgrd.spool import statuslog


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
