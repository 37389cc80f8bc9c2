"""Unit tests for transports.smtp: nexthop syntax, DNS ordering, content, replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dns.resolver
import pytest

from transports.smtp import (
    Address,
    DnsError,
    HostResolver,
    Nexthop,
    Reply,
    build_content,
    parse_nexthop,
    xtext,
)


def test_parse_nexthop_forms() -> None:
    assert parse_nexthop("[mx.example.com]:2525") == [Nexthop("mx.example.com", 2525, False)]
    assert parse_nexthop("[mx.example.com]") == [Nexthop("mx.example.com", 25, False)]
    assert parse_nexthop("example.com") == [Nexthop("example.com", 25, True)]
    assert parse_nexthop("example.com:587") == [Nexthop("example.com", 587, True)]
    assert parse_nexthop("example.com:submission") == [Nexthop("example.com", 587, True)]
    assert parse_nexthop("[127.0.0.1]:26") == [Nexthop("127.0.0.1", 26, False)]
    assert parse_nexthop("[ipv6:2001:db8::1]:25") == [Nexthop("2001:db8::1", 25, False)]
    assert parse_nexthop("192.0.2.1") == [Nexthop("192.0.2.1", 25, False)]
    assert parse_nexthop("[a.example], b.example:26") == [
        Nexthop("a.example", 25, False), Nexthop("b.example", 26, True)]
    # Postfix's host_port(): "host:" and "[host]:" take the default port; an IPv6
    # address in brackets with or without "ipv6:"; a list separated by white space
    assert parse_nexthop("[x.example]:") == [Nexthop("x.example", 25, False)]
    assert parse_nexthop("x.example:", 24) == [Nexthop("x.example", 24, True)]
    assert parse_nexthop("[::1]:2525") == [Nexthop("::1", 2525, False)]
    assert parse_nexthop(" a.example\tb.example:smtp ") == [
        Nexthop("a.example", 25, True), Nexthop("b.example", 25, True)]
    assert parse_nexthop("[b\u00fccher.example]") == [Nexthop("b\u00fccher.example", 25, False)]


@pytest.mark.parametrize("bad", ["", " , ", "[host", "[host]x", "host:0", "host:99999",
                                 "host:nosuchservice", "[]", "a/b", "[x]:65536",
                                 "host:25x", ":25", "x]", "[[x]]", "[ipv6:nonsense]",
                                 "2001:db8::1", "ex!mple.com", "a..example",
                                 "a.example, [b.example]:99999"])
def test_parse_nexthop_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_nexthop(bad)


@dataclass
class RR:
    preference: int = 0
    exchange: str = ""
    address: str = ""


class FakeDns:
    """A dns.resolver.Resolver stand-in: {(name, type): list | exception}; a query not
    in the table raises ``missing()`` (NoAnswer; NXDOMAIN: the name does not exist)."""

    def __init__(self, table: dict[tuple[str, str], list[RR] | Exception],
                 missing: Callable[[], Exception] = dns.resolver.NoAnswer) -> None:
        self.table = table
        self.missing = missing
        self.queries: list[tuple[str, str]] = []

    def resolve(self, qname: str, rdtype: str, *, search: bool | None = None) -> Iterable[RR]:
        self.queries.append((qname, rdtype))
        got = self.table.get((qname, rdtype))
        if got is None:
            got = self.missing()
        if isinstance(got, Exception):
            raise got
        return got


def test_mx_sorted_by_preference_then_addresses() -> None:
    fake = FakeDns({
        ("example.com", "MX"): [RR(20, "mx2.example.com."), RR(10, "mx1.example.com.")],
        ("mx1.example.com", "A"): [RR(address="192.0.2.1")],
        ("mx1.example.com", "AAAA"): [RR(address="2001:db8::1")],
        ("mx2.example.com", "A"): [RR(address="192.0.2.2")],
    })
    res = HostResolver(dns_resolver=fake)
    got = res.resolve(Nexthop("example.com", 25, True))
    assert got == [Address("mx1.example.com", "192.0.2.1", 25),
                   Address("mx1.example.com", "2001:db8::1", 25),
                   Address("mx2.example.com", "192.0.2.2", 25)]
    assert got[0].relay == "mx1.example.com[192.0.2.1]:25"


def test_no_mx_uses_domain_address_and_ipv4_only() -> None:
    fake = FakeDns({("example.org", "A"): [RR(address="192.0.2.9")],
                    ("example.org", "AAAA"): [RR(address="2001:db8::9")]})
    res = HostResolver(protocols=["ipv4"], dns_resolver=fake)
    assert res.resolve(Nexthop("example.org", 25, True)) == [
        Address("example.org", "192.0.2.9", 25)]
    assert ("example.org", "AAAA") not in fake.queries


def test_bracketed_host_skips_mx() -> None:
    fake = FakeDns({("relay.example", "A"): [RR(address="192.0.2.5")]})
    res = HostResolver(dns_resolver=fake)
    assert res.resolve(Nexthop("relay.example", 2525, False)) == [
        Address("relay.example", "192.0.2.5", 2525)]
    assert all(t != "MX" for _, t in fake.queries)


def test_ip_literal_needs_no_lookup() -> None:
    fake = FakeDns({})
    assert HostResolver(dns_resolver=fake).resolve(Nexthop("127.0.0.1", 26, False)) == [
        Address("127.0.0.1", "127.0.0.1", 26)]
    assert fake.queries == []


def test_dns_errors() -> None:
    fake = FakeDns({
        ("nx.example", "MX"): dns.resolver.NXDOMAIN(),  # type: ignore[no-untyped-call]
        ("slow.example", "MX"): dns.resolver.LifetimeTimeout(timeout=1.0, errors=[]),  # type: ignore[no-untyped-call]
        ("null.example", "MX"): [RR(0, ".")],
        ("badmx.example", "MX"): [RR(10, "gone.example.")],
        ("gone.example", "A"): dns.resolver.NXDOMAIN(),  # type: ignore[no-untyped-call]
        ("gone.example", "AAAA"): dns.resolver.NXDOMAIN(),  # type: ignore[no-untyped-call]
    })
    res = HostResolver(dns_resolver=fake)
    with pytest.raises(DnsError) as e1:
        res.resolve(Nexthop("nx.example", 25, True))
    assert e1.value.status == "5.4.4" and "name=nx.example type=MX" in e1.value.reason
    with pytest.raises(DnsError) as e2:
        res.resolve(Nexthop("slow.example", 25, True))
    assert e2.value.status == "4.4.3" and e2.value.reason.endswith("try again")
    with pytest.raises(DnsError) as e3:
        res.resolve(Nexthop("null.example", 25, True))
    assert e3.value.status == "5.1.0" and "nullMX" in e3.value.reason
    with pytest.raises(DnsError) as e4:  # an MX host without address: try later
        res.resolve(Nexthop("badmx.example", 25, True))
    assert e4.value.status[0] == "4"


def test_native_lookup_of_localhost() -> None:
    res = HostResolver(lookup=["native"], protocols=["ipv4"])
    assert "127.0.0.1" in res.addresses("localhost")


def test_build_content_crlf_and_dot_stuffing() -> None:
    assert build_content([b"a", b".b", b"", b"..c", b"."], 998) == (
        b"a\r\n..b\r\n\r\n...c\r\n..\r\n")
    assert build_content([], 998) == b""
    assert build_content([b"x\x00\xff\ry"], 998) == b"x\x00\xff\ry\r\n"


def test_build_content_folds_long_lines() -> None:
    line = b"".join(bytes([65 + i % 26]) for i in range(2500))
    out = build_content([line], 998)
    parts = out.split(b"\r\n")
    assert parts[-1] == b""
    assert all(len(p) <= 998 for p in parts)
    assert all(p.startswith(b" ") for p in parts[1:-1])
    assert b"".join(p[1:] if i else p for i, p in enumerate(parts[:-1])) == line
    assert build_content([line], 0) == line + b"\r\n"


def test_xtext() -> None:
    assert xtext("rfc822;a+b=c@example.com") == "rfc822;a+2Bb+3Dc@example.com"
    assert xtext("sp ace") == "sp+20ace"
    assert xtext("é") == "+C3+A9"


def test_reply_text_and_dsn() -> None:
    r = Reply(550, ["5.1.1 first", "5.1.1 second"])
    assert r.text == "550-5.1.1 first 550 5.1.1 second"
    assert r.dsn == "5.1.1"
    assert Reply(250, ["Ok"]).dsn == "2.0.0"
    assert Reply(451, ["5.1.1 class mismatch"]).dsn == "4.0.0"
    assert Reply(250, [""]).text == "250"
