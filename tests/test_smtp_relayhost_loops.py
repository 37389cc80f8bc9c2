"""transports.smtp: a relayhost that does not resolve is a configuration problem (defer
4.3.5, never bounce), and mail that would loop back to this mail system is caught
(Postfix smtp_connect.c, smtp_addr.c, smtp_proto.c). DNS is a fake: nothing leaves the
machine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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

from qmgrd.delivery import DeliverStatus
from qmgrd.spool import statuslog
from transports.smtp import HostResolver, SmtpAgent


@dataclass
class RR:
    preference: int = 0
    exchange: str = ""
    address: str = ""


class FakeDns:
    """A dns.resolver.Resolver stand-in: {(name, type): list | exception}; a name not in
    the table does not exist (NXDOMAIN)."""

    def __init__(self, table: dict[tuple[str, str], list[RR] | Exception]) -> None:
        self.table = table

    def resolve(self, qname: str, rdtype: str, *, search: bool | None = None) -> Iterable[RR]:
        got = self.table.get((qname, rdtype),
                             dns.resolver.NXDOMAIN())  # type: ignore[no-untyped-call]
        if isinstance(got, Exception):
            raise got
        return got


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
    qid, reply, _ = deliver(env, relayhost, FakeDns({}))
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
    qid, reply, _ = deliver(env, "[smarthost.nosuch.invalid]", FakeDns({}))
    assert reply.status == 0
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert dsn.status == "5.4.4"
    assert "configuration problem" not in env.log()


def test_a_relayhost_soft_lookup_failure_keeps_its_status(tmp_path: Path) -> None:
    """Only a hard (5.x.x) failure is turned into 4.3.5; 'try again' stays 4.4.3."""
    env = make_env(tmp_path, relayhost="[slow.example]", smtp_host_lookup="dns")
    fake = FakeDns({("slow.example", "A"): dns.resolver.LifetimeTimeout(  # type: ignore[no-untyped-call]
        timeout=1.0, errors=[])})
    _, reply, _ = deliver(env, "[slow.example]", fake)
    assert reply.status == 1 and reply.dsn_status == "4.4.3"
    assert "configuration problem" not in env.log()
