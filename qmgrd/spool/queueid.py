"""queueid — Postfix long queue ids: make, check, hash.

Summary
    A queue id is a queue file's name. qmgrd uses only Postfix's *long* form
    (``enable_long_queue_ids = yes``, postfix.md §1.3)::

        <seconds, base 52, >= 6 digits><microseconds, base 52, 4 digits>z<inode, base 51>

    with the alphabet ``0-9 BCDFGHJKLMNPQRSTVWXYZ bcdfghjklmnpqrstvwxyz`` (no vowels), most
    significant digit first. The inode part uses only the first 51 symbols, so the last
    ``z`` separates it. Example: (1700000000, 123456, 1234567) -> ``4SVLCh0sf8z9HdB``.

    Hash directories (``hash_queue_names``/``hash_queue_depth``) come from the microseconds
    re-encoded as 5 upper-case hex digits, exactly as Postfix does, so that Postfix's own
    tools find our files.

Public API
    ALPHABET                    the 52 symbols
    new_long_id(sec, usec, inode) -> str
    valid_id(s) -> bool         True only for a well-formed long id (use it on every
                                user-supplied id before it touches a path)
    id_usec(qid) -> int         microseconds encoded in a valid id (ValueError otherwise)
    id_time(qid) -> tuple[int, int]   (seconds, microseconds) encoded in a valid id
    hash_dir(qid, depth) -> list[str] hash directory names, one per level
    hash_dir_of_valid(qid, depth)     the same for an id already checked with valid_id

Raises ValueError for invalid input; logs nothing.
"""

from __future__ import annotations

__all__ = ["ALPHABET", "hash_dir", "hash_dir_of_valid", "id_time", "id_usec", "new_long_id",
           "valid_id"]

ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
_INODE_ALPHABET = ALPHABET[:51]
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
_SET52 = frozenset(ALPHABET)
_SET51 = frozenset(_INODE_ALPHABET)

#: bounds: seconds part 6..8 digits (52**8 seconds is far beyond any clock), inode part
#: 1..12 digits (51**12 > 2**64).
_SEC_MIN, _SEC_MAX = 6, 8
_INO_MAX = 12
MAX_ID_LEN = _SEC_MAX + 4 + 1 + _INO_MAX


def _encode(n: int, alphabet: str, width: int) -> str:
    if n < 0:
        raise ValueError(f"negative value {n}")
    base = len(alphabet)
    digits: list[str] = []
    while n:
        n, d = divmod(n, base)
        digits.append(alphabet[d])
    s = "".join(reversed(digits))
    return s.rjust(width, "0")


def _decode(s: str) -> int:
    n = 0
    for c in s:
        n = n * 52 + _VALUE[c]
    return n


def new_long_id(sec: int, usec: int, inode: int) -> str:
    """Return the long queue id for a file created at (sec, usec) with inode number inode.

    Args:
        sec: seconds since the epoch (>= 0).
        usec: microseconds, 0 <= usec < 1_000_000.
        inode: the file's inode number (>= 0).

    Raises:
        ValueError: a value is out of range.
    """
    if not 0 <= usec < 1_000_000:
        raise ValueError(f"microseconds out of range: {usec}")
    if inode < 0 or sec < 0:
        raise ValueError("negative seconds or inode")
    return (
        _encode(sec, ALPHABET, _SEC_MIN)
        + _encode(usec, ALPHABET, 4)
        + "z"
        + _encode(inode, _INODE_ALPHABET, 1)
    )


def valid_id(s: str) -> bool:
    """True when ``s`` is a well-formed Postfix long queue id (nothing else is accepted).

    Checks the alphabet of each part, the length bounds, and that the microseconds part
    is below one million. No path separator, dot or NUL can pass.
    """
    if not isinstance(s, str) or not 12 <= len(s) <= MAX_ID_LEN:
        return False
    z = s.rfind("z")
    if not _SEC_MIN + 4 <= z <= _SEC_MAX + 4:
        return False
    head, inode = s[:z], s[z + 1 :]
    if not inode or len(inode) > _INO_MAX:
        return False
    if not _SET52.issuperset(head) or not _SET51.issuperset(inode):
        return False
    return _decode(head[-4:]) < 1_000_000


def id_usec(qid: str) -> int:
    """Microseconds encoded in ``qid``.

    Raises:
        ValueError: ``qid`` is not a valid long id.
    """
    if not valid_id(qid):
        raise ValueError(f"invalid queue id: {qid!r}")
    z = qid.rfind("z")
    return _decode(qid[z - 4 : z])


def id_time(qid: str) -> tuple[int, int]:
    """(seconds, microseconds) encoded in ``qid``.

    Raises:
        ValueError: ``qid`` is not a valid long id.
    """
    usec = id_usec(qid)
    z = qid.rfind("z")
    return _decode(qid[: z - 4]), usec


def hash_dir(qid: str, depth: int) -> list[str]:
    """Hash directory names for ``qid`` at ``depth`` levels (Postfix's rule, §1.2).

    The characters are the 5 upper-case hex digits of the id's microseconds; levels past
    the fifth get ``_``.

    Raises:
        ValueError: ``qid`` is not a valid long id or depth is negative.
    """
    if depth < 0:
        raise ValueError(f"negative hash depth {depth}")
    if not valid_id(qid):
        raise ValueError(f"invalid queue id: {qid!r}")
    return hash_dir_of_valid(qid, depth)


def hash_dir_of_valid(qid: str, depth: int) -> list[str]:
    """:func:`hash_dir` for a ``qid`` the caller has checked with :func:`valid_id` and a
    ``depth`` >= 0 (a second check of the id is the larger part of the cost)."""
    z = qid.rfind("z")
    hexu = f"{_decode(qid[z - 4 : z]):05X}"
    return [hexu[i] if i < len(hexu) else "_" for i in range(depth)]
