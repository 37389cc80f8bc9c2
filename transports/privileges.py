"""privileges — run a block with another user's effective ids (Postfix set_eugid()).

Summary
    The delivery agents that run as root (local, pipe) never touch a user's files with
    root's rights: :func:`privileges` switches the effective gid, the supplementary
    groups (that gid only) and the effective uid for the duration of a ``with`` block,
    and back to root after it, as Postfix's set_eugid() does.  The switch back cannot
    be undone by the block: the real and saved uid stay 0.

Public API
    privileges(rights: tuple[int, int] | None) -> context manager
        rights = (uid, gid); None: nothing changes (not root: nothing to switch)
    Dropped(rights)                   root gives up its effective ids for ``rights``
                                      (mail_owner) for good, as Postfix's daemons after
                                      their init; ``.root()``: a block as root again

Raises / logs
    OSError when the switch fails (nothing changed); ``fatal: cannot restore root
    privileges: ...`` (exit 1) when switching back fails - the process cannot go on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from master import log

__all__ = ["Dropped", "privileges"]


@contextmanager
def privileges(rights: tuple[int, int] | None) -> Iterator[None]:
    """Run the block with effective uid/gid ``rights`` and that gid as the only
    supplementary group (Postfix set_eugid); None: unchanged.  Raises OSError when
    the switch fails; a failure to switch back to root is fatal (logged, exit 1)."""
    if rights is None:
        yield
        return
    uid, gid = rights
    old_gid, old_groups = os.getegid(), os.getgroups()
    try:
        _switch(uid, gid)
    except OSError:
        _restore(old_gid, old_groups)
        raise
    try:
        yield
    finally:
        _restore(old_gid, old_groups)


def _restore(gid: int, groups: list[int]) -> None:
    try:
        os.seteuid(0)
        os.setegid(gid)
        os.setgroups(groups)
    except OSError as exc:
        log.fatal(f"cannot restore root privileges: {exc}")


def _switch(uid: int, gid: int) -> None:
    """Effective gid, the only supplementary group and effective uid (set_eugid)."""
    os.setgroups([gid])
    os.setegid(gid)
    os.seteuid(uid)


class Dropped:
    """Root's effective ids given up for ``rights`` = (uid, gid), the real and saved uid
    staying 0 (Postfix's daemons call set_eugid(var_owner_uid, var_owner_gid) after
    their init). Raises OSError when the switch fails (nothing changed)."""

    def __init__(self, rights: tuple[int, int]) -> None:
        self.rights = rights
        self._root = (os.getegid(), os.getgroups())
        _switch(*rights)

    @contextmanager
    def root(self) -> Iterator[None]:
        """The block with root's effective ids, ``rights`` again after it; a failure
        to switch back is fatal (logged, exit 1): the process must not go on as root."""
        os.seteuid(0)
        os.setegid(self._root[0])
        os.setgroups(self._root[1])
        try:
            yield
        finally:
            try:
                _switch(*self.rights)
            except OSError as exc:
                log.fatal(f"cannot drop root privileges: {exc}")
