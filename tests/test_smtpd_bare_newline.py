"""smtpd_forbid_bare_newline, its _exclusions and _reject_code: the SMTP smuggling
defence of Postfix >= 3.9 (postconf(5); the replies and log lines as Postfix 3.7.11's
smtpd, which has the 3.9 code, gives them).

* normalize (the default; ``yes`` is its compatibility alias): a line ending in a bare
  <LF> is taken as if it ended in <CR><LF>; only <CR><LF>.<CR><LF> ends the data, so
  ``<LF>.<CR><LF>`` is data and what follows it is no second message.
* reject: the same framing; DATA content with a bare <LF> is read to its end, nothing is
  queued, ``550 5.5.2 <myhostname> Error: bare <LF> received`` (the session goes on); a
  command line ending in a bare <LF> is not executed: that reply, and the hang-up
  (Postfix's smtpd reads no more commands). Logged as ``NOQUEUE: reject: <where> from
  <client>: bare <LF> received; ...``. A 521 reject code hangs up after DATA too.
* clients in smtpd_forbid_bare_newline_exclusions ($mynetworks) are not rejected.
* no (Postfix < 3.9): a lone dot line ends the data whatever its line ends.
(An unknown value stopping start and reload: tests/test_config_validate.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_issue6_session import Client, Host, greet, maillog, run, send

from master import log

pytestmark = pytest.mark.timeout(30)

REJECT_550 = "550 5.5.2 mx.test.example Error: bare <LF> received"
# 127.0.0.1 is not in mynetworks here, so not excluded (the default exclusions are
# $mynetworks); b@localhost is local, so relay control lets the mail in
NOT_EXCLUDED = "mynetworks = 192.0.2.0/24\n"
REJECT = "smtpd_forbid_bare_newline = reject\n" + NOT_EXCLUDED
# the smuggling sequence: a second message behind <LF>.<CR><LF>
SMUGGLE = (b"Subject: one\r\n\r\nfirst\n.\r\nMAIL FROM:<evil@far.example>\r\n"
           b"RCPT TO:<c@localhost>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")


def make_host(tmp_path: Path, main: str) -> Host:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    return Host(tmp_path, main)


def test_reject_refuses_content_with_a_bare_lf_and_queues_nothing(tmp_path: Path) -> None:
    host = make_host(tmp_path, REJECT)

    async def script(c: Client) -> None:
        await greet(c)
        # the reply comes after the real end of data: <LF>.<CR><LF> did not end it, and
        # the smuggled commands are content, rejected with the rest
        assert await send(c, "a@far.example", ["b@localhost"], SMUGGLE) == REJECT_550
        # the session goes on: a clean message is taken
        reply = await send(c, "a@far.example", ["b@localhost"],
                           b"Subject: clean\r\n\r\nfine\r\n.\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        assert await c.cmd("QUIT") == "221 2.0.0 Bye"

    run(host, script)
    (qid,) = host.queued
    assert list(host.spool.scan("incoming")) == [qid]
    assert b"Subject: clean" in host.content(qid)
    text = maillog(host)
    assert re.search(r"NOQUEUE: reject: END-OF-MESSAGE from \S+\[127\.0\.0\.1\]: bare <LF> "
                     r"received; from=<a@far\.example> to=<b@localhost> proto=ESMTP "
                     r"helo=<client\.example>\n", text), text
    assert "ehlo=1 mail=2 rcpt=2 data=1/2 quit=1 commands=7/8" in text
    assert "evil@far.example" not in text


def test_reject_refuses_a_command_line_with_a_bare_lf_and_hangs_up(tmp_path: Path) -> None:
    host = make_host(tmp_path, REJECT)

    async def first(c: Client) -> None:
        assert (await c.reply()).startswith("220 ")
        # not executed, and neither is what was pipelined after it
        assert await c.cmd(b"EHLO client.example\nMAIL FROM:<a@far.example>\r\n") == REJECT_550
        assert await c.reply() == "<EOF>"

    async def second(c: Client) -> None:
        await greet(c)
        assert (await c.cmd("MAIL FROM:<a@far.example>")).startswith("250 ")
        assert await c.cmd(b"RCPT TO:<b@localhost>\n") == REJECT_550
        assert await c.reply() == "<EOF>"

    run(host, first, second)
    assert not host.queued
    text = maillog(host)
    assert re.search(r"NOQUEUE: reject: CONNECT from \S+\[127\.0\.0\.1\]: bare <LF> "
                     r"received; proto=SMTP\n", text), text
    assert re.search(r"NOQUEUE: reject: MAIL from \S+\[127\.0\.0\.1\]: bare <LF> received; "
                     r"from=<a@far\.example> proto=ESMTP helo=<client\.example>\n", text), text
    disconnects = re.findall(r"disconnect from \S+ (.*)", text)
    assert disconnects == ["commands=0/0", "ehlo=1 mail=1 commands=2"]  # as Postfix's
    assert "lost connection" not in text


def test_reject_takes_an_overlong_crlf_command_line_as_too_long(tmp_path: Path) -> None:
    """A command line over line_length_limit that ends in CRLF is read in two pieces
    (up to the LF, CR included; then the LF alone): not a bare LF. It gets the usual
    ``500 5.5.2 Error: command line too long`` and the session goes on, as in normalize
    mode (it was rejected as a bare <LF> and the session ended)."""
    host = make_host(tmp_path, REJECT)

    async def script(c: Client) -> None:
        await greet(c)
        for length in (2050, 5000):
            reply = await c.cmd(b"NOOP " + b"a" * length + b"\r\n")
            assert "bare <LF>" not in reply and reply.startswith("500 5.5.2 "), reply
        assert await c.cmd("NOOP") == "250 2.0.0 Ok"
        assert await c.cmd("QUIT") == "221 2.0.0 Bye"

    run(host, script)
    assert "bare <LF>" not in maillog(host)


def test_excluded_clients_get_no(tmp_path: Path) -> None:
    """127.0.0.1 is in the default mynetworks, hence in the default exclusions: as
    Postfix's smtpd does, it gets ``no`` - not rejected, and a bare-LF dot line ends the
    data (what local programs that write LF alone rely on): the second message behind
    <LF>.<CR><LF> is a message of its own."""
    host = make_host(tmp_path, "smtpd_forbid_bare_newline = reject\n")

    async def script(c: Client) -> None:
        assert (await c.reply()).startswith("220 ")
        assert (await c.cmd(b"EHLO client.example\n")).startswith("250-")
        reply = await send(c, "a@far.example", ["b@localhost"], SMUGGLE)
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        for expected in ("250 2.1.0 Ok", "250 2.1.5 Ok", "354 ", "250 2.0.0 Ok: queued as "):
            assert (await c.reply()).startswith(expected)
        assert await c.cmd("QUIT") == "221 2.0.0 Bye"

    run(host, script)
    first, second = (host.content(q) for q in host.queued)
    assert b"\nfirst\n" in first and b"MAIL FROM" not in first
    assert b"Subject: smuggled\n" in second
    assert "bare <LF>" not in maillog(host)


@pytest.mark.parametrize("main", [NOT_EXCLUDED, "smtpd_forbid_bare_newline = yes\n" + NOT_EXCLUDED,
                                  "smtpd_forbid_bare_newline = Normalize\n" + NOT_EXCLUDED])
def test_normalize_and_its_alias_yes_take_bare_lf_and_no_smuggling(tmp_path: Path,
                                                                   main: str) -> None:
    """normalize (the default; also ``yes``, Postfix's compatibility alias, and in any
    case) takes a bare LF as CRLF, and ``<LF>.<CR><LF>`` is data: one message, whose
    body holds the would-be second one."""
    host = make_host(tmp_path, main)

    async def script(c: Client) -> None:
        assert (await c.reply()).startswith("220 ")
        assert (await c.cmd(b"EHLO client.example\n")).startswith("250-")
        reply = await send(c, "a@far.example", ["b@localhost"], SMUGGLE)
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        assert await c.cmd("NOOP") == "250 2.0.0 Ok"

    run(host, script)
    (qid,) = host.queued
    assert b"\nfirst\n\nMAIL FROM:<evil@far.example>\nRCPT TO:<c@localhost>\nDATA\n" \
           b"Subject: smuggled\n" in host.content(qid)
    assert "bare <LF>" not in maillog(host)


def test_reject_code_is_honoured_and_521_hangs_up(tmp_path: Path) -> None:
    host = make_host(tmp_path, REJECT + "smtpd_forbid_bare_newline_reject_code = 521\n")

    async def script(c: Client) -> None:
        await greet(c)
        assert await send(c, "a@far.example", ["b@localhost"], b"a\nb\r\n.\r\n") == (
            "521 5.5.2 mx.test.example Error: bare <LF> received")
        assert await c.reply() == "<EOF>"

    run(host, script)
    assert not host.queued
    assert "ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4" in maillog(host)


def test_no_lets_a_bare_lf_dot_line_end_the_data(tmp_path: Path) -> None:
    """``no``, Postfix < 3.9: <LF>.<LF> ends the data and what follows is commands - the
    behaviour that makes SMTP smuggling possible (documented with the parameter)."""
    host = make_host(tmp_path, "smtpd_forbid_bare_newline = no\n")

    async def script(c: Client) -> None:
        await greet(c)
        reply = await send(c, "a@far.example", ["b@localhost"], b"Subject: one\n\nfirst\n.\n")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        assert await c.cmd("NOOP") == "250 2.0.0 Ok"

    run(host, script)
    (qid,) = host.queued
    content = host.content(qid)
    assert b"\nSubject: one\n" in content and content.endswith(b"\n\nfirst\n")
