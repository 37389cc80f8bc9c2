"""guard — what qmgr-ctl checks before it changes the queue: the queue ids the user gave
and the caller's right to change the queue.

Summary
    Queue ids are validated with qmgrd.spool.queueid.valid_id before any path is built
    (``../../etc/passwd``, NUL or newline never get near the file system); ``-`` reads
    more ids from standard input (whitespace separated; mailq's ``*``/``!``/``#`` markers
    are stripped). Only root and the owner of ``active/`` (mail_owner) may change the
    queue; as root the work runs with the owner's *effective* ids (postsuper also runs as
    mail_owner). Postfix's postsuper makes the same checks.

    These checks live apart from qmgrd.ctl.admin (the work, which loads asyncio for the
    qmgr-control client) so that a refused command exits without loading it, and so that
    qmgrd.ctl.common can load the work after the check and before the ids change.

Public API
    NotPrivileged(Exception); BadIds(ValueError)
    parse_ids(args: Iterable[str], stdin: IO[str] | None) -> list[str]     BadIds
    split_ids(args, stdin) -> (valid ids, invalid ones escaped for display)   BadIds
        (only for more than a million ids on standard input)
    owner_stat(spool: Spool, what: str) -> os.stat_result      NotPrivileged, OSError
    privileged(spool, what) -> ContextManager[None]     owner_stat, then as_owner for the
                                                        block; NotPrivileged, OSError

Logs nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING

from qmgrd.spool.owner import as_owner
from qmgrd.spool.queueid import valid_id

if TYPE_CHECKING:
    from qmgrd.spool.queue import Spool

__all__ = ["BadIds", "NotPrivileged", "owner_stat", "parse_ids", "privileged", "split_ids"]

_MAX_STDIN_IDS = 1_000_000


class NotPrivileged(Exception):
    """The caller is neither root nor the queue's owner."""


class BadIds(ValueError):
    """Some queue ids given by the user are not valid ids (nothing was done)."""


def owner_stat(spool: Spool, what: str) -> os.stat_result:
    """The stat of ``active/`` when the caller may change the queue (root or its owner).

    Raises:
        NotPrivileged: neither root nor the owner of the queue (``what`` begins the text).
        OSError: the queue directory cannot be examined.
    """
    st = os.stat(spool.queue_path("active"))
    euid = os.geteuid()
    if euid != 0 and euid != st.st_uid:
        raise NotPrivileged(f"{what}: permission denied: only root and the mail queue "
                            f"owner (mail_owner, uid {st.st_uid}) may change the queue")
    return st


@contextlib.contextmanager
def privileged(spool: Spool, what: str) -> Iterator[None]:
    """Run the block as the queue's owner (see module docstring).

    Raises:
        NotPrivileged: neither root nor the owner of the queue.
        OSError: the queue directory cannot be examined.
    """
    with as_owner(owner_stat(spool, what)):
        yield


def split_ids(args: Iterable[str], stdin: IO[str] | None) -> tuple[list[str], list[str]]:
    """The queue ids of ``args`` (``-``: read more from ``stdin``): (the valid ones,
    deduplicated; the invalid ones, each as an escaped ASCII literal of at most 40
    bytes, for a warning) - postsuper warns about an invalid id and does the rest.

    Raises:
        BadIds: more than a million ids on standard input.
    """
    ids: list[str] = []
    for arg in args:
        if arg == "-" and stdin is not None:
            raw = getattr(stdin, "buffer", None)
            text = (raw.read().decode("utf-8", "surrogateescape") if raw is not None
                    else stdin.read())
            for n, token in enumerate(text.split()):
                if n >= _MAX_STDIN_IDS:
                    raise BadIds("too many queue ids on standard input")
                ids.append(token.rstrip("*!#"))
        else:
            ids.append(arg)
    bad = [_escaped(i) for i in ids if not valid_id(i)]
    return list(dict.fromkeys(i for i in ids if valid_id(i))), bad


def parse_ids(args: Iterable[str], stdin: IO[str] | None) -> list[str]:
    """The queue ids of ``args`` (``-``: read more from ``stdin``), deduplicated.

    Raises:
        BadIds: one or more are not valid queue ids (the first five in the text, each as
            an escaped ASCII literal of at most 40 bytes).
    """
    ids, bad = split_ids(args, stdin)
    if bad:
        shown = ", ".join(bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise BadIds(f"invalid queue id: {shown}{more}")
    return ids


def _escaped(text: str, limit: int = 40) -> str:
    """``text`` as an ASCII Python bytes literal without its ``b`` (control characters,
    escape sequences and bytes above 127 as ``\\xNN``: what was typed, byte by byte),
    at most ``limit`` bytes of it, "..." when cut."""
    raw = text.encode("utf-8", "surrogateescape")
    shown = repr(raw[:limit])[1:]
    return shown + ("..." if len(raw) > limit else "")
