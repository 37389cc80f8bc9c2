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


def _reference(data: bytes) -> tuple[list[tuple[int, bytes, bytes]], str | None]:
    """Records of ``data`` read one byte at a time, as postfix.md §2.1 frames them, and
    the kind of framing error that ends them (None at a clean end)."""
    out: list[tuple[int, bytes, bytes]] = []
    p = 0
    while p < len(data):
        if p + 2 > len(data):
            return out, "truncated record header"
        b = data[p + 1]
        length, j, shift = b & 0x7F, p + 2, 7
        while b & 0x80:
            if shift >= 35:
                return out, "too long"
            if j >= len(data):
                return out, "truncated record length"
            b = data[j]
            length |= (b & 0x7F) << shift
            shift, j = shift + 7, j + 1
        if j + length > len(data):
            return out, "truncated record data"
        out.append((p, data[p:p + 1], data[j:j + length]))
        p = j + length
    return out, None


_SIZES = st.sampled_from([0, 1, 5, 127, 128, 300, 4093, 4094, 4095, 4096, 4097, 5000, 9000])


@given(st.lists(st.tuples(_SIZES, st.booleans()), min_size=1, max_size=6),
       st.integers(min_value=0), st.booleans())
def test_reader_matches_a_byte_at_a_time_reading(
        shape: list[tuple[int, bool]], cut: int, truncate: bool) -> None:
    """Records of every length class (one and two length bytes, around the file
    object's buffer size), a file cut anywhere (header, length bytes, payload) and a
    bad length encoding give what a byte-at-a-time reading gives, seeks included."""
    data = b"".join(b"N\xff\xff\xff\xff\xff\x01" if bad else encode(b"N", b"x" * size)
                    for size, bad in shape)
    if truncate:
        data = data[:cut % (len(data) + 1)]
    want, error = _reference(data)
    got: list[tuple[int, bytes, bytes]] = []
    rd = RecordReader(io.BytesIO(data), max_len=1 << 40)
    if error is None:
        got = [(r.offset, r.rtype, r.data) for r in rd]
    else:
        with pytest.raises(RecordError, match=error):
            for r in rd:
                got.append((r.offset, r.rtype, r.data))
    assert got == want
    for offset, rtype, payload in want[:3]:  # and again after a seek back
        rd.seek(offset)
        assert rd.read() == (offset, rtype, payload)
