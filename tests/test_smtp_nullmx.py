"""transports.smtp: a destination with a null MX (RFC 7505) is bounced at once, as
Postfix's smtp: dns_lookup() reports DNS_NULLMX when any MX record of the answer has the
root as its exchange, and smtp_domain_addr() makes it "dsn=5.1.0, status=bounced (Domain D
does not accept mail (nullMX))", relay=none, with no address lookup and no retry. DNS is a
fake (test_smtp_unit.FakeDns): nothing leaves the machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_agent_support import (
    close_log,  # noqa: F401 - autouse fixture
    make_env,
)
from test_smtp_relayhost_loops import deliver, nx_dns
from test_smtp_unit import RR

from qmgrd.spool import statuslog

REASON = "Domain example.net does not accept mail (nullMX)"


@pytest.mark.parametrize("mx", [
    [RR(0, ".")],                                   # RFC 7505's form
    [RR(10, ".")],                                  # any preference
    [RR(10, "mx.example.net."), RR(0, ".")],       # beside others: still null (Postfix)
], ids=["pref0", "pref10", "mixed"])
def test_null_mx_bounces_at_once(tmp_path: Path, mx: list[RR]) -> None:
    env = make_env(tmp_path, smtp_host_lookup="dns")
    fake = nx_dns({("example.net", "MX"): mx,
                   ("mx.example.net", "A"): [RR(address="127.0.0.1")]})
    qid, reply, _ = deliver(env, "example.net", fake)
    assert reply.status == 0, env.log()            # final: the qmgr does not retry
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert (dsn.status, dsn.action, dsn.reason) == ("5.1.0", "failed", REASON)
    assert statuslog.read(env.spool, "defer", qid) == []
    assert fake.queries == [("example.net", "MX")]  # no address lookup, no connection
    log = env.log()
    assert "to=<bob@example.net>, relay=none," in log
    assert f"dsn=5.1.0, status=bounced ({REASON})" in log
    assert "status=deferred" not in log
