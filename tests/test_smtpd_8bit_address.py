"""smtpd refuses an envelope address whose bytes are not valid UTF-8 (as Postfix does).

One in-process session (the tests/test_issue6_session harness, loopback only): such an
address in MAIL FROM gets ``553 5.1.7``, in RCPT TO and VRFY ``553 5.1.3``, with the bad
bytes shown escaped; the rejects are logged as ``NOQUEUE: reject:`` lines; nothing is
queued; valid UTF-8 with SMTPUTF8 is still accepted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from master import log
from tests.test_issue6_session import Client, Host, greet, maillog, run

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    return Host(tmp_path)


def test_malformed_utf8_recipient_and_sender_are_refused(host: Host) -> None:
    async def script(c: Client) -> None:
        await greet(c)
        assert await c.cmd("MAIL FROM:<x@b.example> SMTPUTF8") == "250 2.1.0 Ok"
        reply = await c.cmd(b"RCPT TO:<\xff\xfe@localhost>\r\n")
        assert reply == ("553 5.1.3 <\\xff\\xfe@localhost>: malformed UTF-8 in recipient "
                         "address")
        reply = await c.cmd(b"RCPT TO:<a/\xff@localhost>\r\n")
        assert reply.startswith("553 5.1.3 <a/\\xff@localhost>: malformed UTF-8")
        # a valid UTF-8 recipient is still fine; DATA then carries only that one
        assert await c.cmd("RCPT TO:<j\u00f6rg@localhost>") == "250 2.1.5 Ok"
        assert await c.cmd("RSET") == "250 2.0.0 Ok"
        reply = await c.cmd(b"MAIL FROM:<s\xc3@b.example> SMTPUTF8\r\n")
        assert reply == "553 5.1.7 <s\\xc3@b.example>: malformed UTF-8 in sender address"
        # no transaction was started
        assert await c.cmd("RCPT TO:<bob@localhost>") == "503 5.5.1 Error: need MAIL command"
        reply = await c.cmd(b"MAIL FROM:<s@b.example>\r\n")
        assert reply == "250 2.1.0 Ok"
        # without SMTPUTF8 the malformed address is still refused as malformed
        reply = await c.cmd(b"RCPT TO:<\xe9@localhost>\r\n")
        assert reply.startswith("553 5.1.3 <\\xe9@localhost>: malformed UTF-8")
        assert (await c.cmd(b"VRFY <\xff@localhost>\r\n")).startswith("553 5.1.3 ")
        assert await c.cmd("QUIT") == "221 2.0.0 Bye"

    run(host, script)
    assert host.queued == []
    text = maillog(host)
    assert ("NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 553 5.1.3 "
            "<\\xff\\xfe@localhost>: malformed UTF-8 in recipient address; "
            "from=<x@b.example> to=<\\xff\\xfe@localhost> proto=ESMTP "
            "helo=<client.example>") in text
    assert ("NOQUEUE: reject: MAIL from localhost[127.0.0.1]: 553 5.1.7 "
            "<s\\xc3@b.example>: malformed UTF-8 in sender address; "
            "from=<s\\xc3@b.example> proto=ESMTP helo=<client.example>") in text
