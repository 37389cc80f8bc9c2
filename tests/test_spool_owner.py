"""qmgrd.spool.owner.as_owner: the effective ids are put back, whatever fails."""

from __future__ import annotations

import os

import pytest

from qmgrd.spool import owner


def test_failed_seteuid_restores_egid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seteuid that fails after the setegid succeeded must not leave the process
    with the queue owner's group (the next file a root agent writes would get it)."""
    calls: list[tuple[str, int]] = []

    def seteuid(uid: int) -> None:
        calls.append(("seteuid", uid))
        if uid != 0:
            raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "getegid", lambda: 7)
    monkeypatch.setattr(os, "setegid", lambda gid: calls.append(("setegid", gid)))
    monkeypatch.setattr(os, "seteuid", seteuid)
    st = os.stat_result((0o40700, 0, 0, 1, 1001, 1002, 0, 0, 0, 0))
    with pytest.raises(PermissionError), owner.as_owner(st):
        pytest.fail("the block must not run")
    assert calls == [("setegid", 1002), ("seteuid", 1001), ("setegid", 7)]


def test_block_runs_with_owner_ids_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "getegid", lambda: 7)
    monkeypatch.setattr(os, "setegid", lambda gid: calls.append(("setegid", gid)))
    monkeypatch.setattr(os, "seteuid", lambda uid: calls.append(("seteuid", uid)))
    st = os.stat_result((0o40700, 0, 0, 1, 1001, 1002, 0, 0, 0, 0))
    with owner.as_owner(st):
        calls.append(("block", 0))
    assert calls == [("setegid", 1002), ("seteuid", 1001), ("block", 0), ("seteuid", 0),
                     ("setegid", 7)]
