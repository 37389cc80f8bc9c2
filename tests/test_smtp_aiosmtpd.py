"""transports.smtp against an aiosmtpd Controller on 127.0.0.1: bytes on the wire,
per-recipient replies, SMTPUTF8, SIZE, 8BITMIME, and the log lines."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.resolver
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from harness import free_port
from test_agent_support import (
    CORPUS,
    Env,
    close_log,  # noqa: F401 - autouse fixture
    make_env,
    round_trip,
)
from test_smtp_unit import RR, FakeDns

from qmgrd.spool import statuslog
from qmgrd.spool.envelope import Recipient
from qmgrd.spool.message import QueueFile
from transports.smtp import HostResolver, SmtpAgent


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    mail_options: list[str]
    content: bytes


@dataclass
class Capture:
    """aiosmtpd handler that records every transaction and answers as told."""

    messages: list[Received] = field(default_factory=list)
    rcpt_reply: dict[str, str] = field(default_factory=dict)
    mail_reply: str = ""
    data_reply: str = ""

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.rcpt_reply.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      list(envelope.mail_options),
                                      bytes(envelope.original_content)))
        return "250 2.0.0 Ok: queued as ABC123"


class LongLineSMTP(SMTP):
    line_length_limit = 100_000


class LongLineController(Controller):
    def factory(self) -> SMTP:
        return LongLineSMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class Peer:
    capture: Capture
    port: int

    @property
    def nexthop(self) -> str:
        return f"[127.0.0.1]:{self.port}"


def start_peer(long_lines: bool = False, **kwargs: Any) -> Iterator[Peer]:
    capture = Capture()
    port = free_port()
    cls = LongLineController if long_lines else Controller
    ctl = cls(capture, hostname="127.0.0.1", port=port, decode_data=False,
              ready_timeout=10, **kwargs)
    ctl.start()
    try:
        yield Peer(capture, port)
    finally:
        ctl.stop()


@pytest.fixture
def peer() -> Iterator[Peer]:
    yield from start_peer(enable_SMTPUTF8=True)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def agent_for(env: Env) -> SmtpAgent:
    agent = SmtpAgent()
    agent.configure(env.cfg, "smtp")
    return agent


def queue_lines(env: Env, qid: str) -> list[bytes]:
    with QueueFile.open(env.spool, "active", qid, lock=None, readonly=True) as qf:
        return list(qf.iter_lines())


def original_body(name: str) -> bytes:
    """The corpus file's body with LF line ends (what must arrive unchanged)."""
    data = (CORPUS / name).read_bytes().replace(b"\r\n", b"\n")
    return data.partition(b"\n\n")[2]


CORPUS_FILES = sorted(p.name for p in CORPUS.glob("*.eml") if not p.name.startswith("10-"))


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_corpus_arrives_byte_intact(env: Env, peer: Peer, name: str) -> None:
    qid = env.queue(["bob@example.net"], (CORPUS / name).read_bytes())
    _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
    assert reply is not None and reply.status == 0, env.log()
    (got,) = peer.capture.messages
    assert got.mail_from == "alice@example.com" and got.rcpts == ["bob@example.net"]
    expected = b"".join(line + b"\r\n" for line in queue_lines(env, qid))
    if name.startswith("04-"):  # folded at 998 by default: check the unfolded text
        assert all(len(x) <= 998 for x in got.content.split(b"\r\n"))
        assert got.content.replace(b"\r\n ", b"") == expected.replace(b"\r\n ", b"")
    else:
        assert got.content == expected
    body = original_body(name)
    wire_body = got.content.replace(b"\r\n", b"\n").partition(b"\n\n")[2]
    if name.startswith("06-"):
        body += b"\n"  # the missing final newline is supplied on the wire
    if not name.startswith(("04-", "12-")):
        assert wire_body == body
    eight_bit = not expected.isascii()
    assert ("BODY=8BITMIME" in got.mail_options) == eight_bit
    assert any(o.startswith("SIZE=") for o in got.mail_options)


def test_long_line_sent_unfolded_when_limit_is_zero(tmp_path: Path) -> None:
    env = make_env(tmp_path, smtp_line_length_limit="0")
    for peer in start_peer(long_lines=True, enable_SMTPUTF8=True):
        qid = env.queue(["bob@example.net"], (CORPUS / "04-long-lines.eml").read_bytes())
        _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
        assert reply is not None and reply.status == 0
        (got,) = peer.capture.messages
        assert got.content == b"".join(x + b"\r\n" for x in queue_lines(env, qid))
        assert got.content.replace(b"\r\n", b"\n").partition(b"\n\n")[2] == original_body(
            "04-long-lines.eml")


def test_sent_log_line_and_relay(env: Env, peer: Peer) -> None:
    qid = env.queue(["bob@example.net", "carol@example.net"])
    _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
    assert reply is not None and reply.status == 0
    assert env.undone(qid) == []
    log = env.log()
    relay = f"relay=127.0.0.1[127.0.0.1]:{peer.port}"
    for rcpt in ("bob@example.net", "carol@example.net"):
        line = next(ln for ln in log.splitlines() if f"to=<{rcpt}>" in ln)
        assert relay in line
        assert "dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as ABC123)" in line
    assert len(peer.capture.messages) == 1
    assert peer.capture.messages[0].rcpts == ["bob@example.net", "carol@example.net"]


def test_per_recipient_4xx_and_5xx(env: Env, peer: Peer) -> None:
    peer.capture.rcpt_reply = {
        "soft@example.net": "450 4.2.0 <soft@example.net>: Mailbox busy",
        "hard@example.net": "550 5.1.1 <hard@example.net>: User unknown",
    }
    qid = env.queue(["ok@example.net", "soft@example.net", "hard@example.net"])
    _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
    assert reply is not None and reply.status == 1 and not reply.hop_failed
    assert env.undone(qid) == ["soft@example.net"]
    assert peer.capture.messages[0].rcpts == ["ok@example.net"]
    ((brcpt, bdsn),) = statuslog.read(env.spool, "bounce", qid)
    assert brcpt.address == "hard@example.net" and bdsn.status == "5.1.1"
    assert bdsn.reason == ("host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <hard@example.net>: "
                           "User unknown (in reply to RCPT TO command)")
    assert (bdsn.diag_type, bdsn.mta_type, bdsn.mta_mname) == ("smtp", "dns", "127.0.0.1")
    ((drcpt, ddsn),) = statuslog.read(env.spool, "defer", qid)
    assert drcpt.address == "soft@example.net" and ddsn.status == "4.2.0"
    assert "(in reply to RCPT TO command)" in ddsn.reason


def test_mail_from_rejected_bounces_all(env: Env, peer: Peer) -> None:
    peer.capture.mail_reply = "553 5.7.1 <alice@example.com>: Sender address rejected"
    qid = env.queue(["a@example.net", "b@example.net"])
    _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
    assert reply is not None and reply.status == 0
    got = statuslog.read(env.spool, "bounce", qid)
    assert [d.status for _, d in got] == ["5.7.1", "5.7.1"]
    assert all("(in reply to MAIL FROM command)" in d.reason for _, d in got)


def test_end_of_data_rejection(env: Env, peer: Peer) -> None:
    peer.capture.data_reply = "554 5.7.1 Message content rejected"
    qid = env.queue(["a@example.net"])
    round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert dsn.status == "5.7.1" and dsn.reason.endswith("(in reply to end of DATA command)")
    peer.capture.data_reply = "451 4.3.0 Error: queue file write error"
    qid2 = env.queue(["b@example.net"])
    _, reply = round_trip(agent_for(env), env.request(qid2, peer.nexthop), env.ctx())
    assert reply is not None and reply.status == 1 and not reply.hop_failed
    assert env.undone(qid2) == ["b@example.net"]


def test_smtputf8_used_when_offered(env: Env, peer: Peer) -> None:
    qid = env.queue(["jörg@example.net"], (CORPUS / "09-smtputf8.eml").read_bytes(),
                    smtputf8=1)
    _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
    assert reply is not None and reply.status == 0, env.log()
    (got,) = peer.capture.messages
    assert "SMTPUTF8" in got.mail_options and got.rcpts == ["jörg@example.net"]


def test_smtputf8_not_offered_bounces_567(env: Env) -> None:
    for peer in start_peer(enable_SMTPUTF8=False):
        qid = env.queue(["jörg@example.net"], (CORPUS / "09-smtputf8.eml").read_bytes(),
                        smtputf8=1)
        _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
        assert reply is not None and reply.status == 0
        ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
        assert dsn.status == "5.6.7"
        assert dsn.reason == ("SMTPUTF8 is required, but was not offered by host "
                              "127.0.0.1[127.0.0.1]")
        assert peer.capture.messages == []
        # an ASCII envelope with UTF-8 headers still goes through
        qid2 = env.queue(["bob@example.net"], (CORPUS / "09-smtputf8.eml").read_bytes(),
                         smtputf8=1)
        _, reply2 = round_trip(agent_for(env), env.request(qid2, peer.nexthop), env.ctx())
        assert reply2 is not None and reply2.status == 0
        assert "SMTPUTF8" not in peer.capture.messages[0].mail_options
        # a UTF-8 domain alone needs no SMTPUTF8: it goes as its A-label (Postfix)
        qid3 = env.queue(["user@b\u00fccher.example"], b"Subject: idn\r\n\r\nhi\r\n")
        _, reply3 = round_trip(agent_for(env), env.request(qid3, peer.nexthop), env.ctx())
        assert reply3 is not None and reply3.status == 0, env.log()
        assert peer.capture.messages[1].rcpts == ["user@xn--bcher-kva.example"]
        assert env.undone(qid3) == [] and not statuslog.read(env.spool, "bounce", qid3)


def test_unflagged_utf8_recipient_goes_as_it_is(env: Env) -> None:
    """A message that does not request SMTPUTF8 (an alias's forwarded copy of mail
    received without it) is sent with its addresses as they are to a server without
    SMTPUTF8, as Postfix's smtp(8) does: no 5.6.7, and the ASCII recipient of the same
    transaction is not held back by the UTF-8 one."""
    for peer in start_peer(enable_SMTPUTF8=False):
        qid = env.queue(["j\u00f6rg@example.net", "ascii@example.net"],
                        b"Subject: fwd\r\n\r\nhi\r\n")
        _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
        assert reply is not None and reply.status == 0, env.log()
        (got,) = peer.capture.messages
        assert got.rcpts == ["ascii@example.net"] and "SMTPUTF8" not in got.mail_options
        ((rcpt, dsn),) = statuslog.read(env.spool, "bounce", qid)
        assert rcpt.address == "j\u00f6rg@example.net"
        # aiosmtpd's own answer to a non-ASCII command without SMTPUTF8
        assert dsn.reason == ("host 127.0.0.1[127.0.0.1] said: 500 Error: strict ASCII "
                              "mode (in reply to RCPT TO command)")
        assert env.undone(qid) == []


def test_server_size_limit_bounces_534(env: Env) -> None:
    for peer in start_peer(enable_SMTPUTF8=True, data_size_limit=100):
        qid = env.queue(["bob@example.net"], (CORPUS / "02-multipart-attachment.eml")
                        .read_bytes())
        _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
        assert reply is not None and reply.status == 0
        ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
        assert dsn.status == "5.3.4" and "exceeds size limit 100 of server" in dsn.reason


def test_orig_rcpt_and_sender_quoting(env: Env, peer: Peer) -> None:
    qid = env.queue([Recipient("first last@example.net", "alias@example.net")],
                    sender="odd sender@example.com")
    _, reply = round_trip(agent_for(env), env.request(qid, peer.nexthop), env.ctx())
    assert reply is not None and reply.status == 0, env.log()
    (got,) = peer.capture.messages
    assert got.mail_from == '"odd sender"@example.com'
    assert got.rcpts == ['"first last"@example.net']
    assert "orig_to=<alias@example.net>" in env.log()


PREJAIL_SCRIPT = r"""
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from pathlib import Path
from test_agent_support import make_env
import transports.smtp as smtp
env = make_env(Path(sys.argv[2]))
qid = env.queue(["bob@example.net"], b"Subject: x\n\n8-bit body \xff\n")
req = env.request(qid, "[127.0.0.1]:" + sys.argv[3])
agent = smtp.SmtpAgent()
agent.configure(env.cfg, "smtp")
before = set(sys.modules)
status = agent.handle(req)
agent.handle(env.request(env.queue(["x@example.net"]), "[127.0.0.1]:1"))
print(status.status, sorted(set(sys.modules) - before))
"""


def test_no_import_after_configure(tmp_path: Path, peer: Peer) -> None:
    """Everything a delivery needs is imported before the (future) chroot."""
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", PREJAIL_SCRIPT, str(repo), str(tmp_path),
                          str(peer.port)], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "0 []", out.stdout + out.stderr
    assert len(peer.capture.messages) == 1


def test_line_break_in_address_is_never_sent(env: Env, peer: Peer) -> None:
    qid = env.queue(["placeholder@example.net", "bob@example.net"])
    req = env.request(qid, peer.nexthop)
    req.recipients[0].address = "evil@example.net>\r\nRCPT TO:<victim@example.org"
    agent = SmtpAgent()
    agent.configure(env.cfg, "smtp")
    assert agent.handle(req).status == 0
    (got,) = peer.capture.messages
    assert got.rcpts == ["bob@example.net"]
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert dsn.status == "5.1.3"


def test_mx_lookup_delivery_and_dns_failures(env: Env, peer: Peer) -> None:
    fake = FakeDns({
        ("example.test", "MX"): [RR(20, "backup.example.test."), RR(10, "mx.example.test.")],
        ("mx.example.test", "A"): [RR(address="127.0.0.1")],
        ("backup.example.test", "A"): [RR(address="127.0.0.2")],
        ("gone.test", "MX"): dns.resolver.NXDOMAIN(),  # type: ignore[no-untyped-call]
        ("flaky.test", "MX"): dns.resolver.NoNameservers(),  # type: ignore[no-untyped-call]
    })
    agent = agent_for(env)
    agent.resolver = HostResolver(dns_resolver=fake)
    qid = env.queue(["bob@example.test"])
    _, reply = round_trip(agent, env.request(qid, f"example.test:{peer.port}"), env.ctx())
    assert reply is not None and reply.status == 0, env.log()
    assert f"relay=mx.example.test[127.0.0.1]:{peer.port}" in env.log()
    qid2 = env.queue(["bob@gone.test"])
    _, reply2 = round_trip(agent, env.request(qid2, "gone.test"), env.ctx())
    assert reply2 is not None and reply2.status == 0
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid2)
    assert dsn.status == "5.4.4" and "name=gone.test type=MX" in dsn.reason
    qid3 = env.queue(["bob@flaky.test"])
    _, reply3 = round_trip(agent, env.request(qid3, "flaky.test"), env.ctx())
    assert reply3 is not None and reply3.status == 1 and reply3.hop_failed
    assert reply3.dsn_status == "4.4.3"
