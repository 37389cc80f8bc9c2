"""transports.smtpd_tx.read_data: the DATA content as the line rules of its module
docstring say, whatever the chunking, the stream's limit and the message size limit - and
what follows the end of data stays in the stream (a pipelined command).

The reference is the line-at-a-time reader read_data replaced (one readuntil per line;
with the size of a CRLF that the stream's limit split counted as 2, not 3);
read_data now reads up to CRLF.CRLF at once where no end of data can start in what it has
already read."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transports.smtpd_tx import BARE_LF, NO, REJECT, read_data


async def _reference(reader: asyncio.StreamReader, limit: int,
                     progress: Callable[[int], None], lax: bool = False) -> bytes | None:
    """lax: smtpd_forbid_bare_newline = no (any lone dot line ends the data)."""
    parts: list[bytes] = []
    size = 0
    too_big = False
    at_start, last_cr, line_crlf = True, False, True
    while True:
        try:
            chunk = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.read(exc.consumed)
        progress(len(chunk))
        if at_start:
            if chunk == b".\r\n" and (line_crlf or lax):
                break
            if chunk == b".\n" and lax:
                break
            if chunk[:1] == b".":
                chunk = chunk[1:]
        at_start = chunk.endswith(b"\n")
        if at_start:
            line_crlf = chunk.endswith(b"\r\n") or (chunk == b"\n" and last_cr)
            size += len(chunk) + (0 if line_crlf else 1)  # a CRLF split by the limit: 2
            last_cr = False
        else:
            size += len(chunk)
            last_cr = chunk.endswith(b"\r")
        if too_big:
            continue
        if limit and size > limit:
            too_big = True
            parts = []
        else:
            parts.append(chunk)
    return None if too_big else b"".join(parts)


def _run(reader_fn: Callable[..., object], data: bytes, cuts: list[int], stream_limit: int,
         limit: int) -> tuple[object, bytes, int]:
    """(result or exception type, what is left in the stream, bytes reported)."""
    async def go() -> tuple[object, bytes, int]:
        reader = asyncio.StreamReader(limit=stream_limit)
        points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
        seen = [0]

        async def feed() -> None:
            for a, b in itertools.pairwise(points):
                reader.feed_data(data[a:b])
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.ensure_future(feed())
        try:
            out: object = await reader_fn(reader, limit, lambda n: seen.__setitem__(0, seen[0] + n))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            out = type(exc)
        await feeder
        rest = await reader.read()
        return out, rest, seen[0]

    return asyncio.run(go())


_bytes = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b".\r\n", b"\r\n.\r\n", b"a",
                                   b"bc", b"x" * 40, b"QUIT\r\n"]), max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(data=_bytes, cuts=st.lists(st.integers(0, 400), max_size=5),
       stream_limit=st.sampled_from([8, 16, 64, 2048]), limit=st.sampled_from([0, 10, 50, 300]))
def test_read_data_reads_as_the_line_rules_say(data: bytes, cuts: list[int],
                                                stream_limit: int, limit: int) -> None:
    got = _run(read_data, data, cuts, stream_limit, limit)
    want = _run(_reference, data, cuts, stream_limit, limit)
    if want[0] is asyncio.IncompleteReadError:  # the client went away: what was counted
        got, want = got[:2], want[:2]           # before EOF is not a promise
    assert got == want


@pytest.mark.parametrize(("data", "want", "rest"), [
    (b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n", b"Subject: x\r\n\r\nbody\r\n", b"QUIT\r\n"),
    (b".\r\nMAIL FROM:<a@b>\r\n", b"", b"MAIL FROM:<a@b>\r\n"),
    (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n", b""),
    (b"a\n.\r\nb\r\n.\r\n", b"a\n\r\nb\r\n", b""),  # a dot line after a bare LF is data
    (b"a\r\n.\n.\r\n", None, None),  # no CRLF.CRLF: the client went away mid-DATA
])
def test_read_data_examples(data: bytes, want: bytes | None, rest: bytes | None) -> None:
    out, left, seen = _run(read_data, data, [], 2048, 0)
    if want is None:
        assert out is asyncio.IncompleteReadError
    else:
        assert (out, left, seen) == (want, rest, len(data) - len(rest or b""))



@settings(max_examples=300, deadline=None)
@given(data=_bytes, cuts=st.lists(st.integers(0, 400), max_size=5),
       stream_limit=st.sampled_from([8, 16, 64, 2048]), limit=st.sampled_from([0, 10, 300]))
def test_reject_mode_frames_as_normalize(data: bytes, cuts: list[int], stream_limit: int,
                                         limit: int) -> None:
    """smtpd_forbid_bare_newline = reject ends the data where normalize does (the same
    bytes left in the stream); its result is normalize's, or BARE_LF when a line of the
    content ended in a bare LF."""
    def rejecting(reader: asyncio.StreamReader, lim: int,
                  progress: Callable[[int], None]) -> object:
        return read_data(reader, lim, progress, REJECT)

    got = _run(rejecting, data, cuts, stream_limit, limit)
    want = _run(read_data, data, cuts, stream_limit, limit)
    assert got[1:] == want[1:] or want[0] is asyncio.IncompleteReadError
    if got[0] is not BARE_LF:
        assert got[0] == want[0]


@settings(max_examples=400, deadline=None)
@given(data=_bytes, cuts=st.lists(st.integers(0, 400), max_size=5),
       stream_limit=st.sampled_from([8, 16, 64, 2048]), limit=st.sampled_from([0, 10, 50, 300]))
def test_no_mode_reads_as_the_line_rules_say(data: bytes, cuts: list[int],
                                             stream_limit: int, limit: int) -> None:
    """smtpd_forbid_bare_newline = no (the mode of $mynetworks clients by default): read
    up to each LF-dot at once, the same content, size verdict and rest of the stream as
    the line-at-a-time reader."""
    def no_mode(reader: asyncio.StreamReader, lim: int,
                progress: Callable[[int], None]) -> object:
        return read_data(reader, lim, progress, NO)

    def lax_reference(reader: asyncio.StreamReader, lim: int,
                      progress: Callable[[int], None]) -> object:
        return _reference(reader, lim, progress, lax=True)

    got = _run(no_mode, data, cuts, stream_limit, limit)
    want = _run(lax_reference, data, cuts, stream_limit, limit)
    if want[0] is asyncio.IncompleteReadError:
        got, want = got[:2], want[:2]
    assert got == want


@pytest.mark.parametrize(("mode", "data", "want", "rest"), [
    (REJECT, b"a\r\nb\r\n.\r\nQUIT\r\n", b"a\r\nb\r\n", b"QUIT\r\n"),
    (REJECT, b"a\n.\r\nb\r\n.\r\nQUIT\r\n", BARE_LF, b"QUIT\r\n"),  # read to the end
    (REJECT, b"\n.\r\n.\r\n", BARE_LF, b""),  # the first dot line is data
    (REJECT, b"..\n\r\n.\r\n", BARE_LF, b""),
    # no (Postfix < 3.9): any lone dot line ends the data - smuggling possible
    (NO, b"a\n.\nMAIL FROM:<x@y>\r\n", b"a\n", b"MAIL FROM:<x@y>\r\n"),
    (NO, b"a\r\n.\nQUIT\r\n", b"a\r\n", b"QUIT\r\n"),
    (NO, b"a\n.\r\nQUIT\r\n", b"a\n", b"QUIT\r\n"),
    (NO, b"a\r\n..\nb\r\n.\r\n", b"a\r\n.\nb\r\n", b""),
    (NO, b"Subject: x\r\n\r\nbody\r\n.x\r\n.\r\nQUIT\r\n", b"Subject: x\r\n\r\nbody\r\nx\r\n",
     b"QUIT\r\n"),
])
def test_read_data_modes(mode: str, data: bytes, want: object, rest: bytes) -> None:
    def reading(reader: asyncio.StreamReader, lim: int,
                progress: Callable[[int], None]) -> object:
        return read_data(reader, lim, progress, mode)

    out, left, seen = _run(reading, data, [], 2048, 0)
    assert (out, left, seen) == (want, rest, len(data) - len(rest))
