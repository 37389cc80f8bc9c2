"""Issue 6: one smtpd session in-process (transports.smtpd_session with a real Policy and a
real SmtpdCleanup on a temporary spool), driven by a raw asyncio client on 127.0.0.1.

Checked: the EHLO keywords, Postfix's replies and enhanced status codes, MAIL/RCPT
parameters (SIZE, BODY, SMTPUTF8, DSN RET/ENVID/NOTIFY/ORCPT stored in the queue file),
relay control, DATA framing (dot-unstuffing, CRLF.CRLF only, long lines, size limit,
header truncation), the Received: header, error/junk/recipient limits, the timeout,
the connection count limit, queue space and write errors, and the log lines.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from master import log
from master.config import Config
from qmgrd.spool.cleanup import CleanupError
from qmgrd.spool.envelope import DSN_NOTIFY_FAILURE, DSN_NOTIFY_SUCCESS, DSN_RET_HDRS, Envelope
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from transports.smtpd import SmtpdCleanup
from transports.smtpd_policy import Policy
from transports.smtpd_session import READ_SIZE, SmtpdParams, SmtpdSession

pytestmark = pytest.mark.timeout(30)

BASE = """myhostname = mx.test.example
mydomain = test.example
mydestination = $myhostname, localhost
local_recipient_maps =
smtpd_error_sleep_time = 0
"""


class Host:
    """A SessionHost over a temporary spool (what transports.smtpd.SmtpdServer does)."""

    def __init__(self, root: Path, main: str = "") -> None:
        self.root = root
        qdir = root / "q"
        cfg = Config.from_text(BASE + f"queue_directory = {qdir}\n" + main, str(root))
        self.spool = Spool(str(qdir))
        self.spool.make_dirs()
        self.cleanup = SmtpdCleanup(cfg, self.spool)
        self.params = SmtpdParams.from_config(cfg, "smtpd", str(qdir))
        self.policy = Policy(cfg, None)
        self.tls_context = None
        self.tls_required = False
        self.clients: dict[str, int] = {}
        self.fail: CleanupError | None = None
        self.queued: list[str] = []

    def connect(self, session: SmtpdSession) -> int:
        addr = session.client.addr
        self.clients[addr] = self.clients.get(addr, 0) + 1
        return self.clients[addr]

    def disconnect(self, session: SmtpdSession) -> None:
        self.clients[session.client.addr] -= 1

    async def flow_wait(self) -> None:
        pass

    def enqueue(self, env: Envelope, content: bytes, namaddr: str,
                received: Callable[[str], list[bytes]]) -> str:
        if self.fail is not None:
            raise self.fail
        qid = self.cleanup.submit_smtp(env, content, namaddr, received)
        self.queued.append(qid)
        return qid

    def queue_file(self, qid: str) -> QueueFile:
        return QueueFile.open(self.spool, "incoming", qid, lock=None, readonly=True)

    def content(self, qid: str) -> bytes:
        with self.queue_file(qid) as qf:
            return b"\n".join(qf.iter_lines()) + b"\n"


class Client:
    """A raw SMTP client: send bytes, read whole replies (all lines of one reply)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self, timeout: float = 10) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                lines.append("<EOF>")
                break
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                break
        return "\n".join(lines)

    async def cmd(self, text: str | bytes) -> str:
        self.writer.write(text if isinstance(text, bytes) else text.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


Script = Callable[[Client], Awaitable[None]]


def run(host: Host, *scripts: Script) -> list[SmtpdSession]:
    """Serve ``host`` on a loopback port; run each script on its own connection, in
    order; wait until every session has ended. Returns the sessions."""
    sessions: list[SmtpdSession] = []

    async def main() -> None:

        def factory() -> SmtpdSession:
            s = SmtpdSession(host)
            sessions.append(s)
            return s

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for script in scripts:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                client = Client(reader, writer)
                try:
                    await script(client)
                finally:
                    await client.close()
            for _ in range(200):
                if all(s._ended for s in sessions):
                    break
                await asyncio.sleep(0.01)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    return sessions


@pytest.fixture
def host(tmp_path: Path) -> Host:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    return Host(tmp_path)


def maillog(host: Host) -> str:
    return (host.root / "maillog").read_text()


async def greet(c: Client, name: str = "client.example") -> None:
    assert (await c.reply()).startswith("220 mx.test.example ESMTP qmgrd")
    assert (await c.cmd(f"EHLO {name}")).startswith("250-mx.test.example")


async def send(c: Client, sender: str, rcpts: list[str], data: bytes,
               mail_params: str = "") -> str:
    assert (await c.cmd(f"MAIL FROM:<{sender}>{mail_params}")).startswith("250 2.1.0")
    for r in rcpts:
        assert (await c.cmd(f"RCPT TO:<{r}>")).startswith("250 2.1.5")
    assert (await c.cmd("DATA")).startswith("354 ")
    return await c.cmd(data)


# --------------------------------------------------------------------------- ESMTP
def test_ehlo_keywords_and_postfix_replies(host: Host) -> None:
    async def script(c: Client) -> None:
        assert (await c.reply()) == "220 mx.test.example ESMTP qmgrd"
        ehlo = await c.cmd("EHLO client.example")
        assert ehlo.split("\n") == [
            "250-mx.test.example", "250-PIPELINING", "250-SIZE 10240000", "250-VRFY",
            "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-DSN", "250 SMTPUTF8"]
        assert await c.cmd("HELO client.example") == "250 mx.test.example"
        assert await c.cmd("NOOP") == "250 2.0.0 Ok"
        assert await c.cmd("RSET") == "250 2.0.0 Ok"
        assert await c.cmd("VRFY bob") == "252 2.0.0 bob"
        assert await c.cmd("RCPT TO:<a@b.example>") == "503 5.5.1 Error: need MAIL command"
        assert await c.cmd("DATA") == "503 5.5.1 Error: need RCPT command"
        assert await c.cmd("EXPN x") == "502 5.5.2 Error: command not recognized"
        assert await c.cmd("AUTH PLAIN") == "503 5.5.1 Error: authentication not enabled"
        # no certificate: Postfix's starttls_cmd, not an unknown command
        assert await c.cmd("STARTTLS") == "502 5.5.1 Error: command not implemented"
        assert await c.cmd("STARTTLS now") == "501 5.5.4 Syntax: STARTTLS"
        assert await c.cmd("MAIL") == "501 5.5.4 Syntax: MAIL FROM:<address>"
        assert await c.cmd("MAIL FROM:<a@b.example>") == "250 2.1.0 Ok"
        assert await c.cmd("MAIL FROM:<a@b.example>") == "503 5.5.1 Error: nested MAIL command"
        assert await c.cmd("RCPT TO:<>") == "501 5.1.3 Bad recipient address syntax"
        assert await c.cmd("DATA") == "554 5.5.1 Error: no valid recipients"
        assert await c.cmd("QUIT") == "221 2.0.0 Bye"
        assert await c.reply() == "<EOF>"

    run(host, script)
    text = maillog(host)
    assert "connect from localhost[127.0.0.1]" in text
    assert re.search(r"disconnect from localhost\[127\.0\.0\.1\] helo=1 ehlo=1 "
                     r"starttls=0/2 auth=0/1 mail=1/3 rcpt=0/2 data=0/2 rset=1 noop=1 vrfy=1 "
                     r"quit=1 unknown=0/1 commands=7/17$", text, re.MULTILINE), text


def test_mail_parameters(host: Host) -> None:
    async def script(c: Client) -> None:
        await greet(c)
        for params, reply in [
            (" SIZE=10240001", "552 5.3.4 Message size exceeds fixed limit"),
            (" SIZE=x", "501 5.5.4 Bad message size syntax"),
            (" RET=WHAT", "501 5.5.4 Bad RET parameter syntax"),
            (" ENVID=a b", "555 5.5.4 Unsupported option: b"),
            (" ENVID=a+2", "501 5.5.4 Bad ENVID parameter syntax"),
            (" BODY=BINARYMIME", "555 5.5.4 Unsupported option: BODY=BINARYMIME"),
            (" AUTH=<>", "555 5.5.4 Unsupported option: AUTH=<>"),
        ]:
            assert await c.cmd(f"MAIL FROM:<a@b.example>{params}") == reply, params
        assert await c.cmd("MAIL FROM:<a@b.example") == "501 5.1.7 Bad sender address syntax"
        assert await c.cmd("MAIL FROM:<a (x)@b.example") == (
            "501 5.1.7 Bad sender address syntax")
        assert await c.cmd("MAIL FROM:<ü@b.example>") == (
            "553 5.6.7 Must declare SMTPUTF8 to send unicode address")
        assert await c.cmd("MAIL FROM:<ü@b.example> SMTPUTF8") == "250 2.1.0 Ok"
        assert await c.cmd("RCPT TO:<x@localhost> NOTIFY=SOMETIMES") == (
            "501 5.5.4 Error: Bad NOTIFY parameter syntax")
        assert await c.cmd("RCPT TO:<x@localhost> ORCPT=rfc822") == (
            "501 5.5.4 Error: Bad ORCPT parameter syntax")
        assert await c.cmd("RCPT TO:<x@localhost> FOO=1") == "555 5.5.4 Unsupported option: FOO=1"
        # a control character the client sent is not echoed back raw (a NUL or an ESC
        # in a reply line): it is '?', as in the log (Postfix printable())
        assert await c.cmd(b"RCPT TO:<x@localhost> FOO=a\x00b\x1b[2J\r\n") == (
            "555 5.5.4 Unsupported option: FOO=a?b?[2J")
        await c.cmd("QUIT")

    run(host, script)


def test_an_address_starting_with_a_dash_or_with_a_bare_space_is_refused(host: Host) -> None:
    """Postfix smtpd extract_addr(): ``allow_min_user = no`` (the default) refuses an
    address that starts with ``-`` (a pipe(8) command would get it in its argv, e.g.
    ``-f ${sender}``, and take it for an option), and white space outside quotes is
    illegal syntax; both logged ``Illegal address syntax`` (a fresh-eyes finding)."""
    async def script(c: Client) -> None:
        await greet(c)
        for sender in ("-oQ/tmp/evil@b.example", "-x@b.example", '"-x"@b.example',
                       "we ird@b.example"):
            assert await c.cmd(f"MAIL FROM:<{sender}>") == (
                "501 5.1.7 Bad sender address syntax"), sender
        assert await c.cmd('MAIL FROM:<"we ird"@b.example>') == "250 2.1.0 Ok"
        for rcpt in ("-x@localhost", "x y@localhost"):
            assert await c.cmd(f"RCPT TO:<{rcpt}>") == (
                "501 5.1.3 Bad recipient address syntax"), rcpt
        assert await c.cmd("RCPT TO:<a-x@localhost>") == "250 2.1.5 Ok"
        assert await c.cmd("VRFY <-x@localhost>") == "501 5.1.3 Bad recipient address syntax"
        await c.cmd("QUIT")

    run(host, script)
    warnings = [ln.split("warning: ", 1)[1] for ln in maillog(host).splitlines()
                if "warning: " in ln]
    assert warnings[0] == ("Illegal address syntax from localhost[127.0.0.1] in MAIL "
                           "command: <-oQ/tmp/evil@b.example>")
    assert len(warnings) == 7, warnings


def test_allow_min_user_lets_a_dash_through(tmp_path: Path) -> None:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    host = Host(tmp_path, "allow_min_user = yes\n")

    async def script(c: Client) -> None:
        await greet(c)
        assert await c.cmd("MAIL FROM:<-x@b.example>") == "250 2.1.0 Ok"
        assert await c.cmd("RCPT TO:<-y@localhost>") == "250 2.1.5 Ok"
        await c.cmd("QUIT")

    run(host, script)


def test_dsn_and_body_stored_in_queue_file(host: Host) -> None:
    async def script(c: Client) -> None:
        await greet(c)
        assert (await c.cmd("MAIL FROM:<alice@b.example> RET=HDRS ENVID=QQ+2Bid "
                            "BODY=8BITMIME SIZE=100")).startswith("250")
        assert (await c.cmd("RCPT TO:<bob@localhost> NOTIFY=SUCCESS,FAILURE "
                            "ORCPT=rfc822;Bob+40orig.example")).startswith("250")
        assert (await c.cmd("RCPT TO:<carol@localhost>")).startswith("250")
        await c.cmd("DATA")
        reply = await c.cmd(b"Subject: dsn\r\n\r\nbody \xc3\xa9\r\n.\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        await c.cmd("QUIT")

    run(host, script)
    (qid,) = host.queued
    with host.queue_file(qid) as qf:
        assert qf.envid == "QQ+id"
        assert qf.ret == DSN_RET_HDRS
        assert qf.encoding == "8bit"
        bob, carol = qf.recipients
        assert bob.notify == DSN_NOTIFY_SUCCESS | DSN_NOTIFY_FAILURE
        assert bob.dsn_orcpt == "rfc822;Bob@orig.example"
        assert carol.notify == 0 and carol.dsn_orcpt == "rfc822;carol@localhost"
        assert qf.attrs["log_client_address"] == "127.0.0.1"
        assert qf.attrs["log_helo_name"] == "client.example"
        assert qf.attrs["log_protocol_name"] == "ESMTP"


# --------------------------------------------------------------------------- relay
def test_relay_control(tmp_path: Path) -> None:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    outside = Host(tmp_path / "a", "mynetworks = 192.0.2.0/24\nrelay_domains = relay.example\n"
                   "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n")
    default = Host(tmp_path / "b", "mynetworks = 192.0.2.0/24\n")
    inside = Host(tmp_path / "c")

    async def script_outside(c: Client) -> None:
        await greet(c)
        assert (await c.cmd("MAIL FROM:<a@far.example>")).startswith("250")
        assert await c.cmd("RCPT TO:<x@foreign.example>") == (
            "554 5.7.1 <x@foreign.example>: Relay access denied")
        assert await c.cmd("RCPT TO:<x%foreign.example@localhost>") == (
            "554 5.7.1 <x%foreign.example@localhost>: Relay access denied")
        for ok in ("x@localhost", "x@mx.test.example", "x@relay.example",
                   "x@sub.relay.example", "postmaster"):
            assert (await c.cmd(f"RCPT TO:<{ok}>")).startswith("250 2.1.5"), ok
        await c.cmd("QUIT")

    async def script_default(c: Client) -> None:
        await greet(c)
        await c.cmd("MAIL FROM:<a@far.example>")
        assert await c.cmd("RCPT TO:<x@foreign.example>") == (
            "454 4.7.1 <x@foreign.example>: Relay access denied")
        await c.cmd("QUIT")

    async def script_inside(c: Client) -> None:
        await greet(c)
        await c.cmd("MAIL FROM:<a@far.example>")
        assert (await c.cmd("RCPT TO:<x@foreign.example>")).startswith("250 2.1.5")
        await c.cmd("QUIT")

    run(outside, script_outside)
    run(default, script_default)
    run(inside, script_inside)
    assert ("NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 5.7.1 <x@foreign.example>: "
            "Relay access denied; from=<a@far.example> to=<x@foreign.example> proto=ESMTP "
            "helo=<client.example>") in (tmp_path / "maillog").read_text()


def test_reject_line_quotes_sender_and_recipient_local_parts(tmp_path: Path) -> None:
    """Postfix >= 3.5 logs envelope addresses in external form (info_log_address_format
    = external; smtpd_check.c log_whatsup): ``from=<"a b"@far.example> to=<"x y"@...>``,
    so that a local part with a space or ``>`` cannot be misread as the field's end."""
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    outside = Host(tmp_path / "a", "mynetworks = 192.0.2.0/24\n"
                   "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n")

    async def script(c: Client) -> None:
        await greet(c)
        assert (await c.cmd('MAIL FROM:<"a b"@far.example>')).startswith("250")
        assert (await c.cmd('RCPT TO:<"x y"@foreign.example>')).startswith("554 5.7.1")
        await c.cmd("QUIT")

    run(outside, script)
    text = (tmp_path / "maillog").read_text()
    assert 'from=<"a b"@far.example> to=<"x y"@foreign.example> proto=ESMTP' in text, text


def test_recipient_restrictions_fqdn(tmp_path: Path) -> None:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    h = Host(tmp_path, "smtpd_recipient_restrictions = reject_non_fqdn_recipient, "
             "reject_unknown_recipient_domain, permit_mynetworks, reject_unauth_destination\n")

    async def script(c: Client) -> None:
        await greet(c)
        await c.cmd("MAIL FROM:<a@far.example>")
        assert await c.cmd("RCPT TO:<bob@nodots>") == (
            "504 5.5.2 <bob@nodots>: Recipient address rejected: need fully-qualified address")
        # no DNS resolver in this host: unknown domains are deferred, never accepted blind
        assert (await c.cmd("RCPT TO:<bob@unknown.invalid>")).startswith("450 4.1.2 ")
        assert (await c.cmd("RCPT TO:<bob@localhost.test.example>")).startswith("450 4.1.2")
        await c.cmd("QUIT")

    run(h, script)


def test_orcpt_with_a_control_character_is_refused_at_rcpt_not_at_end_of_data(
        host: Host) -> None:
    """An ORCPT whose xtext decodes to a NUL or a line break (``+00``, ``+0A``) is a
    501 to its RCPT, as Postfix's rcpt_cmd refuses a decoded ORCPT that is not all
    printable: it was accepted, and the whole message, every recipient's, was then
    refused at the end of DATA (``554 5.6.0 ... NUL byte in envelope data``)."""
    async def script(c: Client) -> None:
        await greet(c)
        assert (await c.cmd("MAIL FROM:<a@b.example>")).startswith("250 2.1.0")
        for bad in ("a+00b@x.example", "a+0Ab@x.example", "a+0Db@x.example", "a+7Fb"):
            assert await c.cmd(f"RCPT TO:<u@localhost> ORCPT=rfc822;{bad}") == (
                "501 5.5.4 Error: Bad ORCPT parameter syntax"), bad
        assert (await c.cmd("RCPT TO:<v@localhost> ORCPT=rfc822;v+2Bx@localhost")
                ).startswith("250 2.1.5")
        assert (await c.cmd("DATA")).startswith("354 ")
        assert (await c.cmd(b"Subject: t\r\n\r\nbody\r\n.\r\n")).startswith("250 2.0.0 Ok")
        await c.cmd("QUIT")

    run(host, script)


# --------------------------------------------------------------------------- DATA
def test_data_framing_and_received_header(tmp_path: Path) -> None:
    # the client (127.0.0.1) is in mynetworks: with no smtpd_forbid_bare_newline
    # exclusions it gets the default normalize framing (excluded clients get "no", as
    # in Postfix: test_smtpd_bare_newline)
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    host = Host(tmp_path, "smtpd_forbid_bare_newline_exclusions =\n")
    long_line = b"y" * 5000
    data = (b"Subject: frame\r\n\r\n..dot\r\nbare\n.\nstill data\r\n" + long_line +
            b"\r\nlast\r\n.\r\n")

    async def script(c: Client) -> None:
        await greet(c, "helo.example")
        reply = await send(c, "alice@far.example", ["bob@localhost"], data)
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        reply = await send(c, "alice@far.example", ["a@localhost", "b@localhost"],
                           b" starts with space\r\n.\r\n")
        assert reply.startswith("250 ")
        await c.cmd("QUIT")

    run(host, script)
    first, second = host.queued
    text = host.content(first)
    lines = text.split(b"\n")
    assert lines[0] == b"Received: from helo.example (localhost [127.0.0.1])"
    assert lines[1] == f"\tby mx.test.example (qmgrd) with ESMTP id {first}".encode()
    assert re.fullmatch(rb"\tfor <bob@localhost>; \w{3}, \d\d \w{3} \d{4} [\d:]{8} [+-]\d{4}"
                        rb"( \(\w+\))?", lines[2])
    body = text.split(b"\n\n", 1)[1]
    # a dot line ended by a bare LF is data (only CRLF.CRLF ends DATA), unstuffed
    assert body == b".dot\nbare\n\nstill data\n" + long_line + b"\nlast\n"
    second_lines = host.content(second).split(b"\n")
    assert second_lines[1] == f"\tby mx.test.example (qmgrd) with ESMTP id {second};".encode()
    # Postfix: content that starts with white space is body, not part of our header
    assert host.content(second).split(b"\n\n", 1)[1] == b" starts with space\n"
    assert f"{first}: client=localhost[127.0.0.1]" in maillog(host)


def test_large_data_in_64k_reads(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads from the client are at most READ_SIZE (64 KiB) bytes, not asyncio's 256 KiB
    (an mmap per read: see READ_SIZE); a 550 KB message sent in one write still arrives
    whole, its lines intact across the read boundaries."""
    lines = [b"line %06d " % i + b"z" * (i % 97) for i in range(9000)]
    data = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n.\r\n"
    assert len(data) > 8 * READ_SIZE
    read_sizes: list[int] = []
    connect = host.connect

    def spy(session: SmtpdSession) -> int:
        read_sizes.append(getattr(session.transport, "max_size", -1))
        return connect(session)

    monkeypatch.setattr(host, "connect", spy)

    async def script(c: Client) -> None:
        await greet(c)
        reply = await send(c, "alice@far.example", ["bob@localhost"], data)
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        await c.cmd("QUIT")

    run(host, script)
    assert read_sizes == [READ_SIZE]
    body = host.content(host.queued[0]).split(b"\n\n", 1)[1]
    assert body == b"\n".join(lines) + b"\n"


def test_message_size_limit_and_header_truncation(tmp_path: Path) -> None:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    h = Host(tmp_path, "message_size_limit = 20000\nheader_size_limit = 1000\n")
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 30
    long_header = b"X-Long: " + b"h" * 3000 + b"\r\nX-Next: kept\r\n\r\nbody\r\n"

    async def script(c: Client) -> None:
        await greet(c)
        assert await send(c, "a@far.example", ["b@localhost"], big + b".\r\n") == (
            "552 5.3.4 Error: message file too big")
        # the session goes on after the refusal
        reply = await send(c, "a@far.example", ["b@localhost"], long_header + b".\r\n")
        assert reply.startswith("250 ")
        await c.cmd("QUIT")

    run(h, script)
    (qid,) = h.queued
    text = h.content(qid)
    assert b"X-Long: " + b"h" * 992 + b"\n" in text and b"h" * 993 not in text
    assert b"X-Next: kept\n" in text
    assert f"{qid}: 1 header(s) longer than header_size_limit (1000) truncated" in (
        tmp_path / "maillog").read_text()


def test_queue_space_and_write_errors(tmp_path: Path) -> None:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    full = Host(tmp_path / "a", "queue_minfree = 1000000000000000\n")
    broken = Host(tmp_path / "b")
    broken.fail = CleanupError("4.3.0", "queue file write error: No space left on device")

    async def script_full(c: Client) -> None:
        await greet(c)
        assert await c.cmd("MAIL FROM:<a@far.example>") == (
            "452 4.3.1 Insufficient system storage")
        await c.cmd("QUIT")

    async def script_broken(c: Client) -> None:
        await greet(c)
        assert await send(c, "a@far.example", ["b@localhost"], b"x\r\n.\r\n") == (
            "451 4.3.0 Error: queue file write error")
        await c.cmd("QUIT")

    run(full, script_full)
    run(broken, script_broken)
    assert not list(full.spool.scan("incoming")) and not list(broken.spool.scan("incoming"))


# --------------------------------------------------------------------------- limits
def test_hard_error_limit_and_junk_commands(tmp_path: Path) -> None:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    h = Host(tmp_path, "smtpd_hard_error_limit = 3\nsmtpd_junk_command_limit = 2\n")

    async def errors(c: Client) -> None:
        await greet(c)
        assert (await c.cmd("BOGUS")).startswith("502")
        assert (await c.cmd("MAIL")).startswith("501")
        assert await c.cmd("RCPT TO:<x@y.example>") == "503 5.5.1 Error: need MAIL command"
        assert await c.reply() == "421 4.7.0 mx.test.example Error: too many errors"
        assert await c.reply() == "<EOF>"

    async def junk(c: Client) -> None:
        await c.reply()
        replies = [await c.cmd("NOOP") for _ in range(6)]
        assert replies == ["250 2.0.0 Ok"] * 6
        assert await c.reply() == "421 4.7.0 mx.test.example Error: too many errors"

    run(h, errors, junk)
    text = (tmp_path / "maillog").read_text()
    assert "too many errors after RCPT from localhost[127.0.0.1]" in text
    assert "too many errors after NOOP from localhost[127.0.0.1]" in text


def test_recipient_limit_and_non_smtp_command(tmp_path: Path) -> None:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    h = Host(tmp_path, "smtpd_recipient_limit = 2\n")

    async def limit(c: Client) -> None:
        await greet(c)
        await c.cmd("MAIL FROM:<a@far.example>")
        assert (await c.cmd("RCPT TO:<a@localhost>")).startswith("250")
        assert (await c.cmd("RCPT TO:<b@localhost>")).startswith("250")
        assert await c.cmd("RCPT TO:<c@localhost>") == "452 4.5.3 Error: too many recipients"
        await c.cmd("DATA")
        assert (await c.cmd(b"x\r\n.\r\n")).startswith("250")
        await c.cmd("QUIT")

    async def header(c: Client) -> None:
        await c.reply()
        assert await c.cmd("Subject: spam") == (
            "221 2.7.0 Error: I can break rules, too. Goodbye.")
        assert await c.reply() == "<EOF>"

    async def http(c: Client) -> None:  # smtpd_forbidden_commands: CONNECT GET POST
        await c.reply()
        assert await c.cmd("GET / HTTP/1.0") == (
            "221 2.7.0 Error: I can break rules, too. Goodbye.")
        assert await c.reply() == "<EOF>"

    run(h, limit, header, http)
    with h.queue_file(h.queued[0]) as qf:
        assert [r.address for r in qf.recipients] == ["a@localhost", "b@localhost"]
    text = (tmp_path / "maillog").read_text()
    assert "non-SMTP command from localhost[127.0.0.1]: SUBJECT: spam" in text
    assert "non-SMTP command from localhost[127.0.0.1]: GET / HTTP/1.0" in text


def test_timeout_and_connection_count_limit(tmp_path: Path) -> None:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    h = Host(tmp_path, "smtpd_timeout = 1s\nsmtpd_client_connection_count_limit = 1\n"
             "smtpd_client_event_limit_exceptions =\n")

    async def two(c: Client) -> None:
        assert (await c.reply()).startswith("220 ")
        reader, writer = await asyncio.open_connection(*c.writer.get_extra_info("peername"))
        second = Client(reader, writer)
        try:
            assert await second.reply() == (
                "421 4.7.0 mx.test.example Error: too many connections from 127.0.0.1")
            assert await second.reply() == "<EOF>"
        finally:
            await second.close()
        await c.cmd("EHLO x.example")
        assert await c.reply(timeout=5) == "421 4.4.2 mx.test.example Error: timeout exceeded"

    run(h, two)
    text = (tmp_path / "maillog").read_text()
    assert ("warning: Connection concurrency limit exceeded: 2 from localhost[127.0.0.1] "
            "for service smtpd") in text
    assert "timeout after EHLO from localhost[127.0.0.1]" in text


def test_too_many_hops_is_554_at_end_of_data_and_queues_nothing(host: Host) -> None:
    """Postfix cleanup counts the Received: headers, smtpd's own included; at
    hopcount_limit (50) it returns CLEANUP_STAT_HOPS ('warning: <qid>: message rejected:
    hopcount exceeded', no queue file) and smtpd replies '554 5.4.0 Error: too many hops'
    at the end of DATA; the session goes on. 48 + ours = 49 is accepted."""
    def hops(n: int) -> bytes:
        return b"".join(b"Received: from h%d.example by h%d.example; Sun, 29 Nov 2026\r\n"
                        % (i, i) for i in range(n))

    async def script(c: Client) -> None:
        await greet(c)
        for n in (50, 49):
            assert await send(c, "a@far.example", ["b@localhost"],
                              hops(n) + b"Subject: loop\r\n\r\nx\r\n.\r\n") == (
                "554 5.4.0 Error: too many hops")
        reply = await send(c, "a@far.example", ["b@localhost"],
                           hops(48) + b"Subject: fine\r\n\r\nx\r\n.\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        await c.cmd("QUIT")

    run(host, script)
    (qid,) = host.queued
    assert list(host.spool.scan("incoming")) == [qid]
    assert not list(host.spool.scan("bounce"))
    text = maillog(host)
    rejected = re.findall(r"warning: (\w+): message rejected: hopcount exceeded", text)
    assert len(rejected) == 2 and qid not in rejected
    for r in rejected:  # the id was logged with the client, as Postfix's smtpd does
        assert f"{r}: client=" in text
    assert "queue file write error" not in text
    assert "data=1/3" in text


def test_disconnect_mid_data_queues_nothing(host: Host) -> None:
    async def script(c: Client) -> None:
        await greet(c)
        await c.cmd("MAIL FROM:<a@far.example>")
        await c.cmd("RCPT TO:<b@localhost>")
        await c.cmd("DATA")
        c.writer.write(b"Subject: half\r\n\r\npartial line without end")
        await c.writer.drain()

    run(host, script)
    assert not host.queued and not list(host.spool.scan("incoming"))
    assert "lost connection after DATA (41 bytes)" in maillog(host)  # all it was sent
    # the DATA cut off counts as failed, as in Postfix's disconnect line
    assert "ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4" in maillog(host)


def test_smtpd_timeout_is_per_read_during_data(tmp_path: Path) -> None:
    """smtpd_timeout runs per read, as Postfix's: a client that keeps sending - here one
    line whose bytes come every 0.1 s for 2.5 s, with smtpd_timeout = 1s - is not cut
    off, and its message is queued whole."""
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    h = Host(tmp_path, "smtpd_timeout = 1s\n")
    line = b"x" * 25

    async def script(c: Client) -> None:
        await greet(c)
        assert (await c.cmd("MAIL FROM:<a@far.example>")).startswith("250")
        assert (await c.cmd("RCPT TO:<b@localhost>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        c.writer.write(b"Subject: slow\r\n\r\n")
        for i in range(len(line)):
            c.writer.write(line[i:i + 1])
            await c.writer.drain()
            await asyncio.sleep(0.1)
        assert (await c.cmd(b"\r\n.\r\n")).startswith("250 2.0.0 Ok: queued")

    run(h, script)
    assert len(h.queued) == 1 and h.content(h.queued[0]).endswith(b"\n" + line + b"\n")


def test_nothing_after_quit_or_hangup_is_done(tmp_path: Path) -> None:
    """Postfix's smtpd stops reading at QUIT (and at a 421 hang-up): commands the client
    pipelined after it are not executed - above all, no message is queued that the
    client never got a reply for (it would send it again: a duplicate)."""
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    h = Host(tmp_path, "smtpd_hard_error_limit = 2\n")
    tx = (b"MAIL FROM:<a@far.example>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n"
          b"Subject: after\r\n\r\nbody\r\n.\r\nNOOP\r\n")

    async def after_quit(c: Client) -> None:
        await greet(c)
        c.writer.write(b"QUIT\r\n" + tx)
        assert await c.reply() == "221 2.0.0 Bye"
        assert await c.reply() == "<EOF>"

    async def after_too_many_errors(c: Client) -> None:
        await greet(c)
        c.writer.write(b"BOGUS\r\nBOGUS\r\n" + tx)
        assert (await c.reply()).startswith("502")
        assert (await c.reply()).startswith("502")
        assert await c.reply() == "421 4.7.0 mx.test.example Error: too many errors"
        assert await c.reply() == "<EOF>"

    run(h, after_quit, after_too_many_errors)
    assert not h.queued and not list(h.spool.scan("incoming"))
    text = (tmp_path / "maillog").read_text()
    assert "disconnect from localhost[127.0.0.1] ehlo=1 quit=1 commands=2\n" in text
    assert "disconnect from localhost[127.0.0.1] ehlo=1 unknown=0/2 commands=1/3\n" in text


def test_reset_mid_data_logs_pipelined_bytes_and_failed_data(host: Host) -> None:
    """A client that pipelines its message content with DATA and then resets the
    connection: the lost-connection line counts the content it sent (Postfix: the
    bytes of message content read), and the disconnect line counts the DATA cut off
    as failed (data=0/1), also when the reset arrives before the DATA command ends."""
    content = b"Subject: cut\r\n\r\n" + b"z" * 3000  # no end of data

    async def script(c: Client) -> None:
        assert (await c.reply()).startswith("220 ")
        c.writer.write(b"EHLO x.example\r\nMAIL FROM:<a@far.example>\r\n"
                       b"RCPT TO:<b@localhost>\r\nDATA\r\n" + content)
        for _ in range(3):
            await c.reply()
        assert (await c.reply()).startswith("354 ")
        sock = c.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.writer.transport.abort()  # RST: no EOF first

    run(host, script)
    assert not host.queued
    text = maillog(host)
    assert f"lost connection after DATA ({len(content)} bytes)" in text
    assert "ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4" in text


def test_blank_command_line_is_bad_syntax(host: Host) -> None:
    """Postfix's smtpd answers a line with no command word (empty or white space only)
    ``500 5.5.2 Error: bad syntax``, not 502."""
    async def script(c: Client) -> None:
        await greet(c)
        assert await c.cmd(b"\r\n") == "500 5.5.2 Error: bad syntax"
        assert await c.cmd(b"   \r\n") == "500 5.5.2 Error: bad syntax"
        assert await c.cmd("QUIT") == "221 2.0.0 Bye"

    run(host, script)


# --------------------------------------------------------------------------- local errors
class Boom(Exception):
    """An internal error the session did not expect."""


def test_exception_before_the_greeting_is_421_and_a_hangup(tmp_path: Path) -> None:
    """An exception before the greeting (here: the client name lookup, then the host's
    connection count) once left the client without a word until smtpd_timeout, the
    session's slot taken and nothing logged. Now: a warning that names it, Postfix's
    ``421 4.3.0 <myhostname> Server local error`` and the hang-up; the session is
    over for the host (disconnect), and the next client is served."""
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    h = Host(tmp_path)
    real_lookup, real_connect = h.policy.lookup_name, h.connect
    failures = {"lookup": 1, "connect": 1}

    async def lookup_name(addr: str) -> str:
        if failures["lookup"]:
            failures["lookup"] -= 1
            raise Boom("no name today")
        return await real_lookup(addr)

    def connect(session: SmtpdSession) -> int:
        count = real_connect(session)
        if not failures["lookup"] and failures["connect"]:
            failures["connect"] -= 1
            raise Boom("no count today")
        return count

    ended: list[SmtpdSession] = []
    real_disconnect = h.disconnect

    def disconnect(session: SmtpdSession) -> None:
        ended.append(session)
        real_disconnect(session)

    h.policy.lookup_name = lookup_name  # type: ignore[method-assign]
    h.connect = connect  # type: ignore[method-assign]
    h.disconnect = disconnect  # type: ignore[method-assign]

    async def refused(c: Client) -> None:
        assert await c.reply() == "421 4.3.0 mx.test.example Server local error"
        assert await c.reply() == "<EOF>"

    async def served(c: Client) -> None:
        await greet(c)
        assert await c.cmd("QUIT") == "221 2.0.0 Bye"

    sessions = run(h, refused, refused, served)
    assert len(sessions) == 3 and all(s._ended for s in sessions)
    assert ended == sessions  # each ended for the host too (SmtpdServer: its slot freed)
    assert h.clients == {"127.0.0.1": 0}
    text = (tmp_path / "maillog").read_text()
    assert "warning: unknown[127.0.0.1]: Boom: no name today" in text
    assert "warning: unknown[127.0.0.1]: Boom: no count today" in text
    assert text.count("NOQUEUE: reject: CONNECT from unknown[127.0.0.1]: 421 4.3.0 "
                      "mx.test.example Server local error") == 2
    assert text.count("disconnect from unknown[127.0.0.1] commands=0") == 2
    assert "disconnect from localhost[127.0.0.1] ehlo=1 quit=1 commands=2" in text


class SmtpdProcess:
    """One smtpd process's SmtpdServer (not started: ``server.serve()``) on a loopback
    listener of its own, over a Host's spool, policy and cleanup; ``states`` records its
    busy/idle reports to the master. ``main``: more main.cf lines; ``ctx_kw``: more
    ServerContext arguments (a watchdog)."""

    def __init__(self, tmp_path: Path, main: str, **ctx_kw: Any) -> None:
        from master.server.skeleton import ServerContext
        from transports import smtpd

        log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
        self.h = h = Host(tmp_path)
        cfg = Config.from_text(BASE + f"queue_directory = {tmp_path / 'q'}\n" + main,
                               str(tmp_path))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.states: list[str] = []
        states = self.states

        class Ctx(ServerContext):
            def busy(self) -> None:
                states.append("busy")

            def idle(self) -> None:
                states.append("idle")

        ctx = Ctx("smtpd", cfg, str(tmp_path / "q"), [os.dup(self.listener.fileno())], 0,
                  [], **ctx_kw)
        self.server = smtpd.SmtpdServer(ctx, h.params, h.policy, h.cleanup)

    def run(self, body: Callable[[], Awaitable[None]]) -> None:
        """``body()`` while the server serves, then a stop (SIGTERM's path) and its end;
        the listener is closed after."""
        async def main() -> None:
            serving = asyncio.create_task(self.server.serve())
            try:
                await body()
            finally:
                self.server._terminate()
                await serving

        try:
            asyncio.run(main())
        finally:
            self.listener.close()


def test_smtpd_process_serves_the_next_client_after_a_local_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process (SmtpdServer, one session at a time: smtpd_process_busy_sessions = 1)
    after a session that could not be made and one that failed before its greeting:
    both clients are hung up on at once, with a warning, and the process is idle again
    at once - the next client is served without waiting for smtpd_timeout or the
    overflow delay."""
    from transports import smtpd

    proc = SmtpdProcess(tmp_path, "smtpd_process_busy_sessions = 1\n")
    h, server, port, states = proc.h, proc.server, proc.port, proc.states
    made = {"n": 0}

    def session(host: smtpd.SmtpdServer) -> SmtpdSession:
        made["n"] += 1
        if made["n"] == 1:
            raise Boom("no session today")
        return SmtpdSession(host)

    real_lookup = h.policy.lookup_name

    async def lookup_name(addr: str) -> str:
        if made["n"] == 2:
            raise Boom("no name today")
        return await real_lookup(addr)

    monkeypatch.setattr(smtpd, "SmtpdSession", session)
    h.policy.lookup_name = lookup_name  # type: ignore[method-assign]

    async def main() -> None:
        for expected in ("<EOF>", "421 4.3.0 mx.test.example Server local error"):
            c = Client(*await asyncio.open_connection("127.0.0.1", port))
            try:
                first = await c.reply()
                assert first == expected
                if first != "<EOF>":
                    assert await c.reply() == "<EOF>"
            finally:
                await c.close()
        c = Client(*await asyncio.open_connection("127.0.0.1", port))
        try:
            await greet(c)
            assert await c.cmd("QUIT") == "221 2.0.0 Bye"
        finally:
            await c.close()
        for _ in range(500):  # the last session's end reaches the server
            if not server.sessions:
                break
            await asyncio.sleep(0.01)
        assert not server.sessions and states[-1] == "idle"

    proc.run(main)
    text = (tmp_path / "maillog").read_text()
    assert "warning: cannot start a session: Boom: no session today" in text
    assert "warning: unknown[127.0.0.1]: Boom: no name today" in text


def test_smtpd_process_serves_clients_at_once_each_in_a_slot_of_its_own(
        tmp_path: Path) -> None:
    """smtpd_process_busy_sessions = 3 (SmtpdServer): three clients at once are served
    in three slots - the main thread's and two threads of their own - and each queues
    its message. Each session logs under a number that no other session has meanwhile:
    the process id in the main thread, the thread's task id in the others (pflogsumm
    pairs "connect from" with "disconnect from" by it). The process says busy at three
    sessions and idle again after; a fourth client, after them, is served in one of
    the same slots (threads are reused); a stop ends the threads."""
    import threading

    proc = SmtpdProcess(tmp_path, "smtpd_process_busy_sessions = 3\n")
    h, server, port, states = proc.h, proc.server, proc.port, proc.states
    tids: set[int] = set()
    before = set(threading.enumerate())

    async def client(i: int, hold: asyncio.Event | None) -> str:
        c = Client(*await asyncio.open_connection("127.0.0.1", port))
        try:
            await greet(c)
            reply = await send(c, "alice@client.example", [f"bob{i}@mx.test.example"],
                               f"Subject: {i}\r\n\r\nbody {i}\r\n.\r\n".encode())
            if hold is not None:
                await hold.wait()  # all three sessions open at once
            assert await c.cmd("QUIT") == "221 2.0.0 Bye"
            return reply
        finally:
            await c.close()

    async def settled() -> None:
        for _ in range(500):
            if not server.sessions:
                return
            await asyncio.sleep(0.01)

    async def main() -> None:
        hold = asyncio.Event()
        three = [asyncio.create_task(client(i, hold)) for i in range(3)]
        for _ in range(500):
            if len(server.sessions) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(server.sessions) == 3 and states == ["busy"]
        tids.update(t.native_id for t in threading.enumerate()
                    if t not in before and t.native_id is not None)
        hold.set()
        for reply in await asyncio.gather(*three):
            assert reply.startswith("250 2.0.0 Ok: queued as ")
        await settled()
        assert not server.sessions and states == ["busy", "idle"]
        assert (await client(3, None)).startswith("250 2.0.0 Ok: queued as ")
        await settled()

    proc.run(main)
    assert not [t for t in threading.enumerate() if t not in before]  # stopped, joined
    assert len(tids) == 2, tids
    text = (tmp_path / "maillog").read_text()
    ids = [int(m.group(1)) for m in re.finditer(r"smtpd\[(\d+)\]: connect from ", text)]
    assert len(ids) == 4 and set(ids) <= tids | {os.getpid()}, (ids, tids)
    assert set(ids[:3]) == tids | {os.getpid()}  # the three at once: three numbers
    for n in set(ids):
        mine = [line for line in text.splitlines() if f"smtpd[{n}]: " in line]
        sessions = ids.count(n)
        assert sum("client=" in line for line in mine) == sessions, mine
        assert sum(" disconnect from " in line for line in mine) == sessions, mine
    assert len(list(h.spool.scan("incoming"))) == 4


def test_a_wedged_session_thread_stops_the_watchdog_as_a_wedged_loop_does(
        tmp_path: Path) -> None:
    """The watchdog (async_server's keepalive, master.server.watchdog) re-arms the alarm
    while the main loop turns; a session in a thread of its own (SessionSlot) turns
    another loop. When that one stops turning - a call that never returns: an fsync on
    a hung disk, an NSS lookup that hangs - the re-arming must stop too, so that the
    kernel kills the process daemon_timeout later, as it does for a wedged main loop
    (else the slot stays taken for ever, and a retiring or orphaned process, which
    waits for its sessions, never exits). Once the thread turns again, so does the
    re-arming."""
    import threading
    import time

    from master.server.watchdog import Watchdog

    arms: list[float] = []

    class Dog(Watchdog):  # the alarm clock left alone: the re-arms are recorded
        def arm(self) -> None:
            arms.append(time.monotonic())

        def disarm(self) -> None:
            pass

    dog = Dog(1)  # re-armed every 0.25 s
    proc = SmtpdProcess(tmp_path, "smtpd_process_busy_sessions = 2\n", watchdog=dog)
    h, port = proc.h, proc.port
    wedged, release = threading.Event(), threading.Event()
    submit = h.cleanup.submit_smtp

    def hung_submit(*args: object, **kwargs: object) -> str:
        wedged.set()
        release.wait(20)  # blocks the session thread's loop
        return submit(*args, **kwargs)  # type: ignore[arg-type]

    h.cleanup.submit_smtp = hung_submit  # type: ignore[method-assign]

    async def main() -> None:
        keepalive = asyncio.create_task(dog.keepalive())
        first = Client(*await asyncio.open_connection("127.0.0.1", port))
        try:
            await greet(first)  # the main thread's slot is taken: the next is a thread's
            c = Client(*await asyncio.open_connection("127.0.0.1", port))
            await greet(c)
            sending = asyncio.create_task(send(c, "alice@client.example",
                                               ["bob@mx.test.example"], b"body\r\n.\r\n"))
            for _ in range(500):
                if wedged.is_set():
                    break
                await asyncio.sleep(0.01)
            assert wedged.is_set()
            await asyncio.sleep(1.0)  # the thread's loop is seen stopped by now
            seen = len(arms)
            await asyncio.sleep(1.0)
            stalled = arms[seen:]
            release.set()
            assert (await sending).startswith("250 2.0.0 Ok: queued as ")
            resumed = len(arms)
            await asyncio.sleep(1.0)
            assert len(arms) > resumed  # turning again: re-armed again
            assert not stalled, "the watchdog was re-armed while a session thread hung"
            await c.cmd("QUIT")
            await c.close()
        finally:
            release.set()
            await first.close()
            keepalive.cancel()

    proc.run(main)
