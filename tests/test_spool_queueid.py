"""Tests for qmgrd.spool.queueid: Postfix long queue ids and hash directories."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmgrd.spool.queueid import ALPHABET, hash_dir, id_time, id_usec, new_long_id, valid_id


def test_reference_example() -> None:
    # postfix.md §1.3: (1700000000, 123456, 1234567) -> 4SVLCh0sf8z9HdB, hash dir "1".
    qid = new_long_id(1700000000, 123456, 1234567)
    assert qid == "4SVLCh0sf8z9HdB"
    assert valid_id(qid)
    assert hash_dir(qid, 1) == ["1"]
    assert hash_dir(qid, 3) == ["1", "E", "2"]
    assert hash_dir(qid, 7) == ["1", "E", "2", "4", "0", "_", "_"]
    assert id_time(qid) == (1700000000, 123456)


def test_alphabet_has_no_vowels_and_inode_never_z() -> None:
    assert len(ALPHABET) == 52 and not set("aeiouAEIOU") & set(ALPHABET)
    assert "z" not in new_long_id(1, 2, 51**5 - 1)[11:]


@pytest.mark.parametrize("bad", [
    "", "../etc/passwd", "4SVLCh0sf8z9HdB/", "4SVLCh0sf8z9HdB\0", "4SVLCh0sf8", "4SVLCh0sf8z",
    "4SVLCh0sf8zA", "4SVLCh0sf8zz", "4SVLCh 0sf8z9HdB", "4SVLCh0sf8z9HdB.x", "1E24012D687",
    "4SVLCh0sfaz9HdB", "zzzzzzzzzzz9HdB", "x" * 300, "4SVLChzzzzz9HdB",
])
def test_valid_id_rejects(bad: str) -> None:
    assert not valid_id(bad)
    with pytest.raises(ValueError):
        hash_dir(bad, 1)


def test_new_long_id_range_checks() -> None:
    with pytest.raises(ValueError):
        new_long_id(1, 1_000_000, 1)
    with pytest.raises(ValueError):
        new_long_id(-1, 0, 1)


@given(st.integers(0, 52**7), st.integers(0, 999_999), st.integers(0, 2**64 - 1))
def test_round_trip(sec: int, usec: int, inode: int) -> None:
    qid = new_long_id(sec, usec, inode)
    assert valid_id(qid)
    assert id_time(qid) == (sec, usec)
    assert id_usec(qid) == usec
    assert hash_dir(qid, 2) == list(f"{usec:05X}"[:2])
