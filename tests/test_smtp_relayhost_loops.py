"""transports.smtp: a relayhost that does not resolve is a configuration problem (defer
4.3.5, never bounce), and mail that would loop back to this mail system is caught
(Postfix smtp_connect.c, smtp_addr.c, smtp_proto.c). DNS is a fake: nothing leaves the
machine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.resolver
import pytest
from test_agent_support import (
    Env,
    close_log,  # noqa: F401 - autouse fixture
    make_env,
    round_trip,
)
from test_smtp_failures import ScriptedPeer, script
from test_smtp_unit import RR, FakeDns

from qmgrd.delivery import DeliverStatus
from qmgrd.spool import statuslog
from transports import smtp_session
from transports.smtp import HostResolver, SmtpAgent


def nx_dns(table: dict[tuple[str, str], list[RR] | Exception]) -> FakeDns:
    """test_smtp_unit.FakeDns where a name not in the table does not exist (NXDOMAIN)."""
    return FakeDns(table, missing=dns.resolver.NXDOMAIN)


def deliver(env: Env, nexthop: str, fake: FakeDns, rcpt: str = "bob@example.net",
            **agent_attrs: Any) -> tuple[str, DeliverStatus, SmtpAgent]:
    qid = env.queue([rcpt])
    agent = SmtpAgent()
    agent.resolver = HostResolver(["dns"], ["ipv4"], dns_resolver=fake)
    agent.configure(env.cfg, "smtp")
    for k, v in agent_attrs.items():
        setattr(agent, k, v)
    _, reply = round_trip(agent, env.request(qid, nexthop), env.ctx())
    assert reply is not None
    return qid, reply, agent


# ------------------------------------------------------------------ relayhost lookups


@pytest.mark.parametrize("relayhost", ["[smarthost.nosuch.invalid]",
                                       "[smarthost.nosuch.invalid]:2642",
                                       "smarthost.nosuch.invalid"])
def test_a_relayhost_that_does_not_exist_defers_4_3_5(tmp_path: Path, relayhost: str) -> None:
    """Postfix smtp_connect_remote(): a hard lookup failure of the relayhost logs
    'warning: relayhost configuration problem' and defers with 4.3.5, reason kept."""
    env = make_env(tmp_path, relayhost=relayhost, smtp_host_lookup="dns")
    qid, reply, _ = deliver(env, relayhost, nx_dns({}))
    assert reply.status == 1 and reply.dsn_status == "4.3.5"
    assert statuslog.read(env.spool, "bounce", qid) == []
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert dsn.status == "4.3.5"
    assert "Host or domain name not found" in dsn.reason
    assert "name=smarthost.nosuch.invalid" in dsn.reason
    log = env.log()
    assert "warning: relayhost configuration problem" in log
    assert "status=deferred" in log and "status=bounced" not in log


def test_a_transport_nexthop_that_does_not_exist_still_bounces(tmp_path: Path) -> None:
    """Postfix has the safety net for relayhost (and the fallback relays) only: the same
    name from a transport map is bounced 5.4.4, with no warning."""
    env = make_env(tmp_path, relayhost="[other.example]", smtp_host_lookup="dns")
    qid, reply, _ = deliver(env, "[smarthost.nosuch.invalid]", nx_dns({}))
    assert reply.status == 0
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert dsn.status == "5.4.4"
    assert "configuration problem" not in env.log()


def test_a_relayhost_soft_lookup_failure_keeps_its_status(tmp_path: Path) -> None:
    """Only a hard (5.x.x) failure is turned into 4.3.5; 'try again' stays 4.4.3."""
    env = make_env(tmp_path, relayhost="[slow.example]", smtp_host_lookup="dns")
    fake = nx_dns({("slow.example", "A"): dns.resolver.LifetimeTimeout(  # type: ignore[no-untyped-call]
        timeout=1.0, errors=[])})
    _, reply, _ = deliver(env, "[slow.example]", fake)
    assert reply.status == 1 and reply.dsn_status == "4.4.3"
    assert "configuration problem" not in env.log()


# ------------------------------------------------------------------ loops back to myself

EHLO_ME = "250-MAIL.test.example\r\n250 ENHANCEDSTATUSCODES"
EHLO_PEER = "250-peer.test\r\n250 ENHANCEDSTATUSCODES"
FULL_TAIL = ["<", "250 2.1.0 Ok", "<", "250 2.1.5 Ok", "<", "354 go ahead", "<.",
             "250 2.0.0 Ok: queued as XYZ", "<", "221 2.0.0 Bye"]


@pytest.fixture
def peers() -> Iterator[list[ScriptedPeer]]:
    made: list[ScriptedPeer] = []
    yield made
    for p in made:
        p.stop()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path, smtp_helo_timeout="5s", smtp_mail_timeout="5s",
                    smtp_rcpt_timeout="5s", smtp_data_done_timeout="5s",
                    smtp_quit_timeout="5s", smtp_host_lookup="dns")


def test_ehlo_with_my_hostname_on_the_smtp_port_bounces_5_4_6(
        env: Env, peers: list[ScriptedPeer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Postfix smtp_helo(): on port 25 an EHLO reply naming our myhostname (any case)
    is a loop: warning, then 5.4.6 'mail for <nexthop> loops back to myself' for a best
    MX (every address of a [host] nexthop)."""
    peer = script(peers, tmp_path, ["220 peer.test ESMTP", "<", EHLO_ME, "!close"])
    monkeypatch.setattr(smtp_session, "SMTP_PORT", peer.port)  # this port counts as 25
    nexthop = f"[127.0.0.1]:{peer.port}"
    qid, reply, _ = deliver(env, nexthop, nx_dns({}))
    assert reply.status == 0
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert (dsn.status, dsn.reason) == ("5.4.6", f"mail for {nexthop} loops back to myself")
    assert (f"warning: host 127.0.0.1[127.0.0.1]:{peer.port} replied to HELO/EHLO with "
            "my own hostname mail.test.example") in env.log()
    assert "MAIL FROM" not in "".join(peer.received())


def test_ehlo_with_my_hostname_from_a_backup_mx_tries_the_next(
        env: Env, peers: list[ScriptedPeer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same reply from a server that is not a best MX is 4.4.6: the next MX host
    is tried (here it takes the mail)."""
    backup = script(peers, tmp_path, ["220 peer.test ESMTP", "<", EHLO_ME, "!close"])
    port = backup.port
    monkeypatch.setattr(smtp_session, "SMTP_PORT", port)
    fake = nx_dns({("example.net", "MX"): [RR(10, "mx1.example.net."),
                                            RR(20, "mx2.example.net.")],
                    ("mx1.example.net", "A"): [RR(address="127.0.0.2")],
                    ("mx2.example.net", "A"): [RR(address="127.0.0.1")]})
    # mx1 (best) refuses the connection; mx2 (backup) loops; nothing is left: deferred
    qid, reply, _ = deliver(env, f"example.net:{port}", fake)
    assert reply.status == 1
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert dsn.status == "4.4.6"
    assert dsn.reason == f"mail for example.net:{port} loops back to myself"


def test_no_loop_check_on_another_port(env: Env, peers: list[ScriptedPeer],
                                       tmp_path: Path) -> None:
    """Postfix checks only on port 25 (SMTP_MISC_FLAG_LOOP_DETECT): elsewhere the same
    server gets the mail and nothing is logged about it."""
    peer = script(peers, tmp_path, ["220 mail.test.example ESMTP", "<", EHLO_ME, *FULL_TAIL])
    qid, reply, _ = deliver(env, f"[127.0.0.1]:{peer.port}", nx_dns({}))
    assert reply.status == 0 and statuslog.read(env.spool, "bounce", qid) == []
    assert "status=sent" in env.log() and "my own hostname" not in env.log()


def test_greeting_with_my_hostname_only_warns(env: Env, peers: list[ScriptedPeer],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A greeting naming myhostname logs 'greeted me with my own hostname' and the
    delivery goes on (Postfix decides on the EHLO reply)."""
    peer = script(peers, tmp_path, ["220 mail.test.example ESMTP", "<", EHLO_PEER,
                                    *FULL_TAIL])
    monkeypatch.setattr(smtp_session, "SMTP_PORT", peer.port)
    qid, reply, _ = deliver(env, f"[127.0.0.1]:{peer.port}", nx_dns({}))
    assert reply.status == 0 and statuslog.read(env.spool, "bounce", qid) == []
    log = env.log()
    assert (f"warning: host 127.0.0.1[127.0.0.1]:{peer.port} greeted me with my own "
            "hostname mail.test.example") in log
    assert "status=sent" in log
