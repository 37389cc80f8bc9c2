"""transports.smtp STARTTLS (Postfix's smtp_tls_security_level) against an aiosmtpd peer
on 127.0.0.1 with a self-signed certificate made by the openssl command: may with and
without STARTTLS offered, a failed handshake (deferred on the first attempt, then in the
clear on a second connection, as Postfix's PLAINTEXT_FALLBACK_OK_AFTER_STARTTLS_FAILURE),
encrypt, verify against smtp_tls_CAfile, and reuse of TLS sessions."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from harness import REPO, free_port, require_tool, wait_for
from test_agent_support import (
    Env,
    close_log,  # noqa: F401 - autouse fixture
    make_env,
    round_trip,
)

from master.config import ConfigError
from qmgrd.delivery import DEL_REQ_FLAG_CONN_MASK, DEL_REQ_FLAG_DEFLT, DeliverStatus
from qmgrd.spool import statuslog
from transports.smtp import SmtpAgent
from transports.smtp_tls import protocol_range

STORE = DEL_REQ_FLAG_DEFLT | DEL_REQ_FLAG_CONN_MASK


@dataclass
class Seen:
    """What the peer saw: connections (EHLO in the clear), STARTTLS commands, and per
    message its subject and whether it came over TLS."""

    connections: int = 0
    starttls: int = 0
    messages: list[tuple[str, bool]] = field(default_factory=list)
    contents: list[bytes] = field(default_factory=list)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        """An EHLO in the clear starts each connection of the client (the controller's
        own start-up check sends none)."""
        if session.ssl is None:
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        subject = re.search(rb"Subject: (\S+)", envelope.original_content or b"")
        self.messages.append((subject.group(1).decode() if subject else "",
                              session.ssl is not None))
        self.contents.append(bytes(envelope.original_content or b""))
        return "250 2.0.0 Ok: queued as TLS1"


class CountingSMTP(SMTP):
    async def smtp_STARTTLS(self, arg: str) -> None:
        self.event_handler.starttls += 1
        await super().smtp_STARTTLS(arg)


class CountingController(Controller):
    def factory(self) -> SMTP:
        return CountingSMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class Peer:
    seen: Seen
    port: int

    @property
    def nexthop(self) -> str:
        return f"[127.0.0.1]:{self.port}"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate and key in one PEM file, for 127.0.0.1."""
    openssl = require_tool("openssl")
    path = tmp_path_factory.mktemp("tls") / "peer.pem"
    r = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "2", "-subj", "/CN=peer.test", "-addext",
                        "subjectAltName=IP:127.0.0.1,DNS:peer.test", "-keyout", str(path),
                        "-out", str(path)], capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture
def peers() -> Iterator[list[Controller]]:
    made: list[Controller] = []
    yield made
    for ctl in made:
        ctl.stop()


def start_peer(peers: list[Controller], context: ssl.SSLContext | None = None,
               **kwargs: Any) -> Peer:
    seen = Seen()
    port = free_port()
    ctl = CountingController(seen, hostname="127.0.0.1", port=port, decode_data=False,
                             ready_timeout=10, tls_context=context, **kwargs)
    ctl.start()
    peers.append(ctl)
    return Peer(seen, port)


def server_context(cert: Path | None) -> ssl.SSLContext:
    """The peer's context; without a certificate every handshake fails (no shared
    cipher)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cert is not None:
        ctx.load_cert_chain(cert)
    return ctx


def deliver(env: Env, peer: Peer, subject: str = "t", *, old: bool = False,
            agent: SmtpAgent | None = None, flags: int = DEL_REQ_FLAG_DEFLT,
            ) -> tuple[str, DeliverStatus]:
    """Deliver one message to ``peer``; ``old``: a message that waited 400 s before this
    attempt (a retry from the deferred queue)."""
    qid = env.queue(["bob@example.net"], f"Subject: {subject}\n\nbody\n".encode())
    if agent is None:
        agent = SmtpAgent()
        agent.configure(env.cfg, "smtp")
    req = env.request(qid, peer.nexthop, flags=flags)
    req.active_arrival = time.time()
    if old:
        req.arrival = req.active_arrival - 400
    _, reply = round_trip(agent, req, env.ctx())
    assert reply is not None
    return qid, reply


def defer_reason(env: Env, qid: str) -> str:
    got = statuslog.read(env.spool, "defer", qid)
    assert got, "nothing deferred"
    return got[-1][1].reason


def tls_env(tmp_path: Path, level: str, **main: str) -> Env:
    return make_env(tmp_path, smtp_tls_security_level=level, smtp_tls_loglevel="1",
                    smtp_helo_timeout="5s", smtp_starttls_timeout="10s", **main)


def test_may_uses_starttls_when_offered(tmp_path: Path, cert: Path,
                                        peers: list[Controller]) -> None:
    env = tls_env(tmp_path, "may")
    p = start_peer(peers, server_context(cert))
    qid, reply = deliver(env, p, "secret")
    assert reply.status == 0, env.log()
    assert p.seen.messages == [("secret", True)]
    assert p.seen.starttls == 1
    assert env.undone(qid) == []
    assert re.search(r"test\[\d+\]: Untrusted TLS connection established to "
                     rf"127\.0\.0\.1\[127\.0\.0\.1\]:{p.port}: TLSv1\.[23] with cipher "
                     r"\S+ \(\d+/\d+ bits\)", env.log()), env.log()


def test_a_large_message_arrives_intact_over_tls(tmp_path: Path, cert: Path,
                                                 peers: list[Controller]) -> None:
    """4 MB through TLS: encrypted and sent 64 KiB at a time, the reply read through
    TLS; every byte arrives."""
    env = tls_env(tmp_path, "encrypt", smtp_data_done_timeout="30s", message_size_limit="0")
    p = start_peer(peers, server_context(cert), data_size_limit=0)
    body = b"".join(b"%07d " % i + b"x" * 70 + b"\n" for i in range(52_000))
    qid = env.queue(["bob@example.net"], b"Subject: big\n\n" + body)
    agent = SmtpAgent()
    agent.configure(env.cfg, "smtp")
    _, reply = round_trip(agent, env.request(qid, p.nexthop), env.ctx())
    assert reply is not None and reply.status == 0, env.log()
    assert p.seen.messages == [("big", True)]
    assert p.seen.contents[0].split(b"\r\n\r\n", 1)[1] == body.replace(b"\n", b"\r\n")


def test_no_tls_log_line_at_loglevel_0(tmp_path: Path, cert: Path,
                                       peers: list[Controller]) -> None:
    env = make_env(tmp_path, smtp_tls_security_level="may")
    p = start_peer(peers, server_context(cert))
    _qid, reply = deliver(env, p)
    assert reply.status == 0 and p.seen.messages == [("t", True)], env.log()
    assert "TLS connection established" not in env.log()


def test_may_without_starttls_delivers_in_the_clear(tmp_path: Path,
                                                    peers: list[Controller]) -> None:
    env = tls_env(tmp_path, "may")
    p = start_peer(peers)  # no tls_context: STARTTLS not offered
    _qid, reply = deliver(env, p, "clear")
    assert reply.status == 0, env.log()
    assert p.seen.messages == [("clear", False)] and p.seen.starttls == 0
    assert "TLS connection established" not in env.log()


def test_level_none_never_sends_starttls(tmp_path: Path, cert: Path,
                                         peers: list[Controller]) -> None:
    env = make_env(tmp_path)
    p = start_peer(peers, server_context(cert))
    _qid, reply = deliver(env, p)
    assert reply.status == 0 and p.seen.messages == [("t", False)], env.log()
    assert p.seen.starttls == 0


def test_may_handshake_failure_defers_a_first_attempt(tmp_path: Path,
                                                      peers: list[Controller]) -> None:
    """Postfix retries in the clear only mail that waited minimal_backoff_time before
    this attempt; a new message is deferred 4.7.5 and nothing goes in the clear."""
    env = tls_env(tmp_path, "may")
    p = start_peer(peers, server_context(None))
    qid, reply = deliver(env, p, "fresh")
    assert reply.status == 1 and reply.dsn_status == "4.7.5", env.log()
    assert defer_reason(env, qid) == "Cannot start TLS: handshake failure"
    assert p.seen.messages == [] and p.seen.connections == 1
    assert re.search(rf"SSL_connect error to 127\.0\.0\.1\[127\.0\.0\.1\]:{p.port}: ",
                     env.log())
    assert f"relay=127.0.0.1[127.0.0.1]:{p.port}, " in env.log()


def test_may_handshake_failure_retries_in_the_clear(tmp_path: Path,
                                                    peers: list[Controller]) -> None:
    """A retry (the message waited 400 s >= minimal_backoff_time): after the failed
    handshake the same server is tried again, in the clear, on a new connection."""
    env = tls_env(tmp_path, "may")
    p = start_peer(peers, server_context(None))
    qid, reply = deliver(env, p, "retry", old=True)
    assert reply.status == 0, env.log()
    assert p.seen.messages == [("retry", False)]
    assert p.seen.connections == 2 and p.seen.starttls == 1
    assert env.undone(qid) == []
    assert "status=sent" in env.log()


def test_encrypt_without_starttls_defers(tmp_path: Path, peers: list[Controller]) -> None:
    env = tls_env(tmp_path, "encrypt")
    p = start_peer(peers)
    qid, reply = deliver(env, p, "never", old=True)
    assert reply.status == 1 and reply.dsn_status == "4.7.4", env.log()
    assert defer_reason(env, qid) == ("TLS is required, but was not offered by host "
                                      "127.0.0.1[127.0.0.1]")
    assert p.seen.messages == []


def test_encrypt_handshake_failure_defers_even_on_a_retry(tmp_path: Path,
                                                          peers: list[Controller]) -> None:
    env = tls_env(tmp_path, "encrypt")
    p = start_peer(peers, server_context(None))
    qid, reply = deliver(env, p, "never", old=True)
    assert reply.status == 1 and reply.dsn_status == "4.7.5", env.log()
    assert defer_reason(env, qid) == "Cannot start TLS: handshake failure"
    assert p.seen.messages == [] and p.seen.connections == 1


def test_encrypt_with_starttls_delivers_encrypted(tmp_path: Path, cert: Path,
                                                  peers: list[Controller]) -> None:
    env = tls_env(tmp_path, "encrypt")
    p = start_peer(peers, server_context(cert), require_starttls=True)
    _qid, reply = deliver(env, p, "sealed")
    assert reply.status == 0, env.log()
    assert p.seen.messages == [("sealed", True)]


def test_verify_with_the_ca_file(tmp_path: Path, cert: Path,
                                 peers: list[Controller]) -> None:
    """verify: the certificate must be trusted by smtp_tls_CAfile and name the server
    (here 127.0.0.1, the [address] nexthop's host name)."""
    env = tls_env(tmp_path, "verify", smtp_tls_CAfile=str(cert))
    p = start_peer(peers, server_context(cert))
    _qid, reply = deliver(env, p, "verified")
    assert reply.status == 0, env.log()
    assert p.seen.messages == [("verified", True)]
    assert re.search(rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:"
                     rf"{p.port}: TLSv1\.[23] with cipher ", env.log()), env.log()


def test_verify_without_a_trusted_ca_defers(tmp_path: Path, cert: Path,
                                            peers: list[Controller]) -> None:
    env = tls_env(tmp_path, "verify")  # no smtp_tls_CAfile: nothing is trusted
    p = start_peer(peers, server_context(cert))
    qid, reply = deliver(env, p, "unverified", old=True)
    assert reply.status == 1 and reply.dsn_status == "4.7.5", env.log()
    assert defer_reason(env, qid) == "Server certificate not verified"
    assert p.seen.messages == []
    assert re.search(rf"certificate verification failed for 127\.0\.0\.1\[127\.0\.0\.1\]:"
                     rf"{p.port}: self.signed certificate", env.log()), env.log()


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse-yes", "reuse-no"])
def test_tls_sessions_are_reused_only_with_smtp_tls_connection_reuse(
        tmp_path: Path, cert: Path, peers: list[Controller], reuse: bool) -> None:
    """Postfix caches TLS connections only with smtp_tls_connection_reuse = yes (default
    no); a reused one is still encrypted."""
    extra = {"smtp_tls_connection_reuse": "yes"} if reuse else {}
    env = tls_env(tmp_path, "encrypt", smtp_connection_cache_time_limit="30s", **extra)
    p = start_peer(peers, server_context(cert))
    agent = SmtpAgent()
    agent.configure(env.cfg, "smtp")
    names = ["m0", "m1", "m2"] if reuse else ["n0", "n1"]
    try:
        for name in names:
            _qid, reply = deliver(env, p, name, agent=agent, flags=STORE)
            assert reply.status == 0, env.log()
        if reuse:
            assert p.seen.messages == [("m0", True), ("m1", True), ("m2", True)]
            assert p.seen.connections == 1
            assert "conn_use=3" in env.log()
        else:
            wait_for(lambda: p.seen.connections == 2, 10, "a new connection each")
            assert "conn_use=" not in env.log()
    finally:
        agent.timer(True)


def test_a_plaintext_fallback_session_serves_no_may_request(
        tmp_path: Path, peers: list[Controller]) -> None:
    """The clear session of a fallback is cached as level none: the next ``may``
    request does not reuse it (it tries TLS again, on a new connection)."""
    env = tls_env(tmp_path, "may", smtp_connection_cache_time_limit="30s")
    p = start_peer(peers, server_context(None))
    agent = SmtpAgent()
    agent.configure(env.cfg, "smtp")
    try:
        _qid, reply = deliver(env, p, "a", agent=agent, flags=STORE, old=True)
        assert reply.status == 0, env.log()
        _qid, reply = deliver(env, p, "b", agent=agent, flags=STORE, old=True)
        assert reply.status == 0, env.log()
        assert p.seen.starttls == 2 and p.seen.connections == 4
        assert "conn_use=" not in env.log()
    finally:
        agent.timer(True)


def test_protocol_range() -> None:
    assert protocol_range(">=TLSv1") == (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_3)
    assert protocol_range("!SSLv2, !SSLv3, !TLSv1, !TLSv1.1") == (
        ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
    assert protocol_range(">=TLSv1.2 <=TLSv1.2") == (ssl.TLSVersion.TLSv1_2,) * 2
    assert protocol_range("TLSv1.3") == (ssl.TLSVersion.TLSv1_3,) * 2
    with pytest.raises(ValueError, match="invalid TLS protocol name"):
        protocol_range(">=TLSv9")
    with pytest.raises(ValueError, match="no TLS protocol version left"):
        protocol_range("<=SSLv3")


def test_a_bad_protocols_value_means_no_tls_engine(tmp_path: Path, cert: Path,
                                                   peers: list[Controller]) -> None:
    """The context cannot be made: a warning; encrypt defers with Postfix's 'TLS engine
    is unavailable', may goes on in the clear."""
    env = tls_env(tmp_path, "encrypt", smtp_tls_mandatory_protocols=">=TLSv9")
    p = start_peer(peers, server_context(cert))
    qid, reply = deliver(env, p)
    assert reply.status == 1 and reply.dsn_status == "4.7.5", env.log()
    assert defer_reason(env, qid) == "TLS is required, but our TLS engine is unavailable"
    assert "warning: TLS library problem: invalid TLS protocol name 'TLSv9'" in env.log()
    env2 = tls_env(tmp_path / "may", "may", smtp_tls_CAfile=str(tmp_path / "missing.pem"))
    _qid, reply = deliver(env2, p, "clear")
    assert reply.status == 0 and p.seen.messages == [("clear", False)], env2.log()



def test_system_delivers_over_verified_tls(mailsys: Any, cert: Path,
                                           peers: list[Controller]) -> None:
    """A whole mail system (as root: the smtp agent runs chrooted as mail_owner, with
    Debian's chroot y on its master.cf line): the CA file is read before the jail, and
    the handshake works inside it."""
    p = start_peer(peers, server_context(cert), require_starttls=True)
    master_cf = (REPO / "etc" / "master.cf").read_text()
    master_cf, n = re.subn(r"(?m)^(smtp\s+unix\s+-\s+-\s+)n(\s)", r"\1y\2", master_cf)
    assert n == 1
    ms = mailsys(main={"smtp_tls_security_level": "verify", "smtp_tls_CAfile": str(cert),
                       "smtp_tls_loglevel": "1"}, master_cf=master_cf)
    table = ms.etc / "transport"
    table.write_text(f"tls.example smtp:{p.nexthop}\n")
    ms.write_main(transport_maps=f"texthash:{table}")
    ms.start()
    r = ms.sendmail("bob@tls.example", data=b"Subject: jailed\n\nbody\n")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: p.seen.messages, 60, "the message at the peer")
    assert p.seen.messages == [("jailed", True)]
    wait_for(lambda: "status=sent" in ms.log(), 30, "the delivery logged")
    if os.geteuid() == 0:  # the agent that delivered (idle, max_idle away), in its jail
        roots = [os.readlink(f"/proc/{c.pid}/root") for c in ms.children("smtp")]
        assert roots == [str(ms.spool)]
    assert "imported after the jail" not in ms.log()
    assert re.search(r"smtp\[\d+\]: Verified TLS connection established to "
                     rf"127\.0\.0\.1\[127\.0\.0\.1\]:{p.port}: TLSv1\.[23] ", ms.log())
    ms.stop()


def test_an_unknown_level_stops_the_agent(tmp_path: Path) -> None:
    """A typo of the level is no licence to send in the clear: the agent does not start
    (Postfix's smtp exits fatal; qmgr-master start and reload refuse it first)."""
    env = make_env(tmp_path, smtp_tls_security_level="encrpyt")
    with pytest.raises(ConfigError, match='invalid TLS security level "encrpyt"'):
        SmtpAgent().configure(env.cfg, "smtp")
