"""Tests for qmgrd.spool.records: Postfix record framing, strict reading."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmgrd.spool import records as R
from qmgrd.spool.records import RecordError, RecordReader, encode, encode_len, size_payload


def test_length_encoding_examples() -> None:
    assert encode_len(0) == b"\x00"
    assert encode_len(127) == b"\x7f"
    assert encode_len(128) == b"\x80\x01"
    assert encode_len(300) == b"\xac\x02"
    assert encode(b"N", b"hi") == b"N\x02hi"
    with pytest.raises(ValueError):
        encode(b"NN", b"")


def test_size_payload_is_fixed_width() -> None:
    p = size_payload(75, 351, 2, 0, 69, 0)
    assert len(p) == 95
    assert p == b" ".join(b"%15d" % v for v in (75, 351, 2, 0, 69, 0))
    assert p.startswith(b" " * 13 + b"75 ")
    assert len(encode(R.REC_SIZE, p)) == R.SIZE_RECORD_LEN
    with pytest.raises(ValueError):
        size_payload(10**15, 1, 1)


def test_reader_offsets_and_eof() -> None:
    data = encode(b"C", b"x") + encode(b"N", b"a" * 200) + encode(b"E", b"")
    rd = RecordReader(io.BytesIO(data))
    recs = list(rd)
    assert [(r.offset, r.rtype, len(r.data)) for r in recs] == [
        (0, b"C", 1), (3, b"N", 200), (3 + 3 + 200, b"E", 0)]
    assert rd.tell() == len(data)
    rd.seek(3)
    rec = rd.read()
    assert rec is not None and rec.rtype == b"N"


@pytest.mark.parametrize("data,what", [
    (b"N", "truncated record header"),
    (b"N\x85", "truncated record length"),
    (b"N\x80\x80\x80\x80\x80\x01", "too long"),
    (b"N\x05abc", "truncated record data"),
])
def test_reader_rejects(data: bytes, what: str) -> None:
    with pytest.raises(RecordError, match=what):
        list(RecordReader(io.BytesIO(data)))


def test_reader_five_length_bytes_ok_but_max_len_enforced() -> None:
    data = b"N\x81\x80\x80\x80\x00" + b"z"
    assert [r.data for r in RecordReader(io.BytesIO(data))] == [b"z"]
    with pytest.raises(RecordError, match="exceeds"):
        list(RecordReader(io.BytesIO(encode(b"N", b"x" * 100)), max_len=99))


@given(st.lists(st.tuples(st.sampled_from(list(b"CTSRNLXEA")), st.binary(max_size=600))))
def test_round_trip(recs: list[tuple[int, bytes]]) -> None:
    data = b"".join(encode(bytes([t]), d) for t, d in recs)
    got = [(r.rtype[0], r.data) for r in RecordReader(io.BytesIO(data))]
    assert got == recs


@given(st.binary(max_size=300))
def test_random_bytes_only_record_error(data: bytes) -> None:
    try:
        list(RecordReader(io.BytesIO(data), max_len=1000))
    except RecordError:
        pass
