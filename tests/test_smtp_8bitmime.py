"""transports.smtp and a server that does not offer 8BITMIME (RFC 6152): 8-bit body
parts go quoted-printable (Postfix's MIME downgrade, disable_mime_output_conversion = no),
7-bit mail and mail to an 8BITMIME server go unchanged; transports.smtp_mime's
conversion on its own."""

from __future__ import annotations

import binascii
import email
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from harness import free_port
from test_agent_support import (
    CORPUS,
    Env,
    close_log,  # noqa: F401 - autouse fixture
    make_env,
    round_trip,
)
from test_smtp_aiosmtpd import Capture, Peer, agent_for, queue_lines

from qmgrd.spool import statuslog
from transports.smtp_mime import MimeError, downgrade


class NoEightBit(Capture):
    """An aiosmtpd handler whose EHLO reply lacks 8BITMIME (``helo``: EHLO refused with
    502, so the client says HELO)."""

    def __init__(self, helo: bool = False) -> None:
        super().__init__()
        self.helo = helo

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        if self.helo:
            return ["502 5.5.1 EHLO not implemented"]
        session.host_name = hostname
        return [r for r in responses if "8BITMIME" not in r.upper()]


def start(handler: Capture) -> Iterator[Peer]:
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, decode_data=False,
                     ready_timeout=10)
    ctl.start()
    try:
        yield Peer(handler, port)
    finally:
        ctl.stop()


@pytest.fixture(params=["no-8bitmime", "helo"])
def seven(request: pytest.FixtureRequest) -> Iterator[Peer]:
    """A server that does not take 8-bit data: EHLO without 8BITMIME, or HELO only."""
    yield from start(NoEightBit(helo=request.param == "helo"))


@pytest.fixture
def eight() -> Iterator[Peer]:
    yield from start(Capture())


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def deliver(env: Env, peer: Peer, content: bytes) -> tuple[str, bytes, list[str]]:
    """Queue ``content``, deliver it to ``peer``; (queue id, bytes received, MAIL
    options)."""
    qid = env.queue(["bob@example.net"], content)
    _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
    assert reply is not None and reply.status == 0, env.log()
    (got,) = peer.capture.messages
    return qid, got.content, got.mail_options


def sent(env: Env, qid: str) -> bytes:
    """The queued message as it goes out unchanged (CRLF line ends)."""
    return b"".join(line + b"\r\n" for line in queue_lines(env, qid))


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data.replace(b"\r\n", b"\n"))


def leaves(msg: Message) -> list[Message]:
    return [p for p in msg.walk() if not p.is_multipart()]


def body_bytes(part: Message) -> bytes:
    """A leaf's decoded body with LF line ends."""
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data.replace(b"\r\n", b"\n")


def headers_except_cte(msg: Message) -> list[tuple[str, str]]:
    return [(k, str(v)) for k, v in msg.items() if k.lower() != "content-transfer-encoding"]


MULTIPART = b"""From: a@example.com\r
To: b@example.net\r
Subject: parts\r
MIME-Version: 1.0\r
Content-Type: multipart/mixed; boundary="XYZ"\r
Content-Transfer-Encoding: 8bit\r
\r
preamble\r
--XYZ\r
Content-Type: text/plain; charset=utf-8\r
Content-Transfer-Encoding: 8bit\r
\r
Gr\xc3\xbc\xc3\x9fe = 100%  \r
.a dot line \xc3\xa9\r
--XYZ\r
Content-Type: text/plain; charset=us-ascii\r
\r
plain 7-bit part, kept as it is   \r
--XYZ\r
Content-Type: message/rfc822\r
Content-Transfer-Encoding: 8bit\r
\r
From: c@example.org\r
Subject: inner\r
MIME-Version: 1.0\r
Content-Type: text/plain; charset=iso-8859-1\r
\r
caf\xe9 cr\xe8me\r
--XYZ\r
Content-Type: application/octet-stream\r
Content-Transfer-Encoding: base64\r
\r
AAECAwQF\r
--XYZ--\r
"""


# ---------------------------------------------------------------------- on the wire


def test_8bit_corpus_message_arrives_quoted_printable(env: Env, seven: Peer) -> None:
    """03-utf8-8bit.eml to a server without 8BITMIME: 7-bit on the wire, no BODY=, the
    same headers (CTE aside) and the same text once decoded; nothing new logged."""
    qid, got, opts = deliver(env, seven, (CORPUS / "03-utf8-8bit.eml").read_bytes())
    assert got.isascii()
    assert not any(o.upper().startswith("BODY=") for o in opts)
    assert all(len(line) <= 78 for line in got.split(b"\r\n"))
    orig, wire = parse(sent(env, qid)), parse(got)
    assert wire["Content-Transfer-Encoding"] == "quoted-printable"
    assert headers_except_cte(wire) == headers_except_cte(orig)
    assert body_bytes(wire) == body_bytes(orig)
    assert body_bytes(wire).decode("utf-8") == body_bytes(orig).decode("utf-8")
    assert "quoted-printable" not in env.log() and "8BITMIME" not in env.log()


def test_multipart_only_8bit_parts_change(env: Env, seven: Peer) -> None:
    """Each 8-bit leaf goes quoted-printable (the one inside message/rfc822 too), the
    8bit containers say 7bit; the 7-bit and base64 parts are unchanged byte for byte."""
    qid, got, _ = deliver(env, seven, MULTIPART)
    assert got.isascii()
    orig, wire = parse(sent(env, qid)), parse(got)
    assert wire["Content-Transfer-Encoding"] == "7bit"
    assert headers_except_cte(wire) == headers_except_cte(orig)
    o_leaves, w_leaves = leaves(orig), leaves(wire)
    assert [p.get_content_type() for p in w_leaves] == [p.get_content_type()
                                                         for p in o_leaves]
    assert [p.get("Content-Transfer-Encoding") for p in w_leaves] == [
        "quoted-printable", None, "quoted-printable", "base64"]
    for o, w in zip(o_leaves, w_leaves, strict=True):
        assert body_bytes(w) == body_bytes(o)
    inner = wire.get_payload()[2]
    assert inner["Content-Transfer-Encoding"] == "7bit"
    for unchanged in ((b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
                       b"plain 7-bit part, kept as it is   \r\n--XYZ\r\n"),
                      b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n--XYZ--\r\n",
                      b"preamble\r\n--XYZ\r\n"):
        assert unchanged in got
    assert b"\r\n.a dot line =C3=A9\r\n" in got  # dot-stuffing round-trips


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.eml")
                                        if p.name[:2] in ("01", "02", "05", "07", "08",
                                                          "11", "12")))
def test_7bit_corpus_unchanged(env: Env, seven: Peer, name: str) -> None:
    """7-bit mail to a server without 8BITMIME: byte for byte what was queued."""
    qid, got, _ = deliver(env, seven, (CORPUS / name).read_bytes())
    assert got == sent(env, qid)


def test_8bit_headers_only_unchanged(env: Env, seven: Peer) -> None:
    """8-bit headers and a 7-bit body: nothing to convert (headers never are), sent as
    queued, as Postfix does."""
    content = (b"From: J\xc3\xb6rg <a@example.com>\r\nTo: b@example.net\r\n"
               b"Subject: caf\xc3\xa9\r\n\r\nascii body\r\n")
    qid, got, _ = deliver(env, seven, content)
    assert got == sent(env, qid)


@pytest.mark.parametrize("content", [(CORPUS / "03-utf8-8bit.eml").read_bytes(), MULTIPART],
                         ids=["corpus-03", "multipart"])
def test_8bitmime_server_gets_8bit_unchanged(env: Env, eight: Peer, content: bytes) -> None:
    qid, got, opts = deliver(env, eight, content)
    assert got == sent(env, qid) and "BODY=8BITMIME" in opts


def test_conversion_disabled_sends_as_is(tmp_path: Path, seven: Peer) -> None:
    """disable_mime_output_conversion = yes: the 8-bit message goes as it is (Postfix
    delivers it anyway), without BODY=."""
    env = make_env(tmp_path, disable_mime_output_conversion="yes")
    qid, got, opts = deliver(env, seven, (CORPUS / "03-utf8-8bit.eml").read_bytes())
    assert got == sent(env, qid) and not got.isascii()
    assert not any(o.upper().startswith("BODY=") for o in opts)


def test_nesting_over_limit_bounces(tmp_path: Path, seven: Peer) -> None:
    """Deeper than mime_nesting_limit: 5.6.0 MIME nesting exceeds safety limit (Postfix
    smtp_mime_fail()), nothing sent."""
    env = make_env(tmp_path, mime_nesting_limit="2")
    content = (b"From: a@example.com\r\nTo: b@example.net\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary=A\r\n\r\n--A\r\n"
               b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
               b"Content-Type: multipart/mixed; boundary=C\r\n\r\n--C\r\n"
               b"Content-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9\r\n"
               b"--C--\r\n--B--\r\n--A--\r\n")
    qid = env.queue(["bob@example.net"], content)
    _, reply = round_trip(agent_for(env), env.request(qid, seven.nexthop), env.ctx())
    assert reply is not None
    assert seven.capture.messages == []
    ((rcpt, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert rcpt.address == "bob@example.net"
    assert (dsn.status, dsn.reason) == ("5.6.0", "MIME nesting exceeds safety limit")


# ---------------------------------------------------------------------- smtp_mime


def test_downgrade_round_trips_awkward_bytes() -> None:
    """A stray CR, "=", trailing white space, a long line, NUL: each decodes back."""
    body = [b"a\rb \xc3\xa9=", b"trailing \t", b"x" * 200 + b"\xff", b"\x00nul \xe9", b""]
    lines = [b"MIME-Version: 1.0", b"Content-Type: text/plain; charset=latin1", b"", *body]
    out = downgrade(lines)
    assert all(line.isascii() and len(line) <= 76 for line in out)
    msg = parse(b"\n".join(out) + b"\n")
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert binascii.a2b_qp(msg.get_payload()) == b"\n".join(body) + b"\n"
    assert out[:2] == lines[:2]


def test_downgrade_keeps_headers_byte_for_byte() -> None:
    """Headers as they were: spacing after the colon, folding, 8-bit bytes, a stray CR
    (which the email parser alone would take for a line end)."""
    headers = [b"Received: from a (a [192.0.2.1])", b"        by b with ESMTP id X;",
               b"  Mon, 1 Jan 2026 00:00:00 +0000", b"Subject: =?utf-8?q?caf=C3=A9?=  ",
               b"X-Long: " + b"w " * 600, b"X-Empty:", b"X-Tab:\tv", b"X-CR: a\rb",
               b"X-8bit: J\xc3\xb6rg", b"MIME-Version: 1.0",
               b"Content-Type: text/plain;", b"\tcharset=utf-8"]
    out = downgrade([*headers, b"", b"caf\xc3\xa9\rx"])
    assert out == [*headers, b"Content-Transfer-Encoding: quoted-printable", b"",
                   b"caf=C3=A9=0Dx"]


def test_downgrade_keeps_7bit_and_adds_mime_version() -> None:
    ascii_msg = [b"Subject: x", b"", b"plain", b""]
    assert downgrade(ascii_msg) is ascii_msg
    out = downgrade([b"Subject: x", b"", b"caf\xe9"])
    assert out == [b"Subject: x", b"Content-Transfer-Encoding: quoted-printable",
                   b"MIME-Version: 1.0", b"", b"caf=E9"]


def test_downgrade_leaves_broken_encoded_parts() -> None:
    """8-bit bytes in a part that says base64 or quoted-printable: left as they are."""
    lines = [b"MIME-Version: 1.0", b"Content-Transfer-Encoding: base64", b"", b"\xff\xfe"]
    assert downgrade(lines) is lines


def test_downgrade_nesting_limit() -> None:
    nested = [b"MIME-Version: 1.0", b"Content-Type: message/rfc822", b"",
              b"Content-Type: message/rfc822", b"", b"Subject: in", b"", b"\xe9"]
    with pytest.raises(MimeError) as err:
        downgrade(nested, nesting_limit=1)
    assert (err.value.status, err.value.text) == ("5.6.0",
                                                  "MIME nesting exceeds safety limit")
    assert downgrade(nested, nesting_limit=2)[-1] == b"=E9"
    assert downgrade(nested, nesting_limit=0)[-1] == b"=E9"
