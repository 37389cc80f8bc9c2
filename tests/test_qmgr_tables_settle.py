"""The qmgr restarts for a changed transport_maps file only once the file has been
left alone for SETTLE_TIME (qmgrd.qmgr.resolve.Resolver.tables_changed): a restart in
the middle of ``cat new > transport`` would route with half a table."""

from __future__ import annotations

import os
import time
from pathlib import Path

from master.config import Config
from qmgrd.maps import SETTLE_TIME
from qmgrd.qmgr.resolve import Resolver


def resolver(tmp_path: Path) -> tuple[Resolver, Path]:
    transport = tmp_path / "transport"
    transport.write_text("a.example discard:\n")
    old = time.time() - 60
    os.utime(transport, (old, old))
    cfg = Config.from_text(f"transport_maps = texthash:{transport}\n", str(tmp_path))
    return Resolver(cfg), transport


def test_fresh_change_waits_until_settled(tmp_path: Path) -> None:
    r, transport = resolver(tmp_path)
    assert not r.tables_changed(SETTLE_TIME)
    transport.write_text("a.example discard:\nb.example")  # a rewrite under way
    now = time.time()
    os.utime(transport, (now, now))
    assert not r.tables_changed(SETTLE_TIME)  # not yet: it may be half written
    assert r.tables_changed()  # an administrator's request (qmgr-ctl flush) does not wait
    # the name Postfix's "table <name> has changed -- restarting" gives
    assert r.changed_table() == f"texthash:{transport}"
    assert r.changed_table(SETTLE_TIME) is None
    done = now - SETTLE_TIME - 1
    os.utime(transport, (done, done))
    assert r.tables_changed(SETTLE_TIME)


def test_replaced_file_waits_too(tmp_path: Path) -> None:
    r, transport = resolver(tmp_path)
    new = tmp_path / "transport.new"
    new.write_text("a.example smtp:\n")
    os.replace(new, transport)  # the editor's way: a new inode, fresh mtime
    assert not r.tables_changed(SETTLE_TIME)
    done = time.time() - SETTLE_TIME - 1
    os.utime(transport, (done, done))
    assert r.tables_changed(SETTLE_TIME)


def test_future_mtime_counts_as_settled(tmp_path: Path) -> None:
    """A modification time in the future (touch -d, cp -p, a clock stepped back) is no
    sign of a write under way: the change is acted on at once, not in an hour."""
    r, transport = resolver(tmp_path)
    transport.write_text("a.example smtp:\n")
    later = time.time() + 3600
    os.utime(transport, (later, later))
    assert r.tables_changed(SETTLE_TIME)
