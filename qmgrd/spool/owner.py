"""owner — run a block with the queue owner's effective ids (the tools and agents that
write into the queue as root).

Summary
    Files a root process writes into the queue must belong to ``mail_owner``, as Postfix's
    tools switch to it before touching the queue. :func:`as_owner` takes the effective
    gid and uid of a queue directory's owner for the duration of a ``with`` block and
    returns to root afterwards. Not root, or a directory root owns: nothing changes.

Public API
    as_owner(st: os.stat_result) -> context manager    ``st``: the queue directory's stat

Raises
    OSError from seteuid/setegid (the caller's boundary reports it). Nothing is logged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["as_owner"]


@contextmanager
def as_owner(st: os.stat_result) -> Iterator[None]:
    """As root: effective gid/uid ``st.st_gid``/``st.st_uid`` for the block (see the
    module docstring)."""
    if os.geteuid() != 0 or st.st_uid == 0:
        yield
        return
    old_gid = os.getegid()
    os.setegid(st.st_gid)
    try:  # a failed seteuid leaves the egid restored too
        os.seteuid(st.st_uid)
        try:
            yield
        finally:
            os.seteuid(0)
    finally:
        os.setegid(old_gid)
