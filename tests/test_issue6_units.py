"""Issue 6: smtpd's pure parts - transports.smtpd_policy (networks, domains, relay control,
restriction lists, queue space, client names) and the helpers of transports.smtpd_session
(xtext, header truncation)."""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.rdata
import dns.resolver
import pytest

from master.config import Config, ConfigError, load_configuration
from transports.smtpd_policy import (
    ClientInfo,
    DomainList,
    LazyResolver,
    NetList,
    Policy,
    PolicyError,
    is_fqdn,
    queue_space,
)
from transports.smtpd_tx import truncate_headers, xtext_decode


def policy(text: str = "", resolver: Any = None) -> Policy:
    cfg = Config.from_text("myhostname = mx.test.example\nmydomain = test.example\n"
                           "local_recipient_maps =\n" + text,
                           "/nonexistent")
    return Policy(cfg, resolver)


def test_netlist() -> None:
    nets = NetList(["127.0.0.0/8", "[::1]/128", "!192.0.2.7", "192.0.2.0/24",
                    "[2001:db8::]/32", "host.example"], "mynetworks")
    assert nets.match("127.1.2.3") and nets.match("::1") and nets.match("192.0.2.8")
    assert not nets.match("192.0.2.7")  # excluded before the network matches
    assert nets.match("2001:db8::5") and nets.match("::ffff:127.0.0.1")
    assert not nets.match("10.0.0.1") and not nets.match("garbage")


def test_netlist_table(tmp_path: Path) -> None:
    table = tmp_path / "clients"
    table.write_text("10.1.2.3 OK\n")
    nets = NetList([f"texthash:{table}"], "mynetworks")
    assert nets.match("10.1.2.3") and not nets.match("10.1.2.4")
    with pytest.raises(PolicyError, match="mynetworks"):
        NetList([f"texthash:{tmp_path}/missing"], "mynetworks")


def test_domainlist() -> None:
    exact = DomainList(["example.com", ".sub.example.net", "!bad.example.org",
                        "example.org"], "mydestination")
    assert exact.match("example.com") and not exact.match("a.example.com")
    assert exact.match("x.sub.example.net") and not exact.match("sub.example.net")
    assert exact.match("example.org") and not exact.match("bad.example.org")
    parent = DomainList(["example.com"], "relay_domains", parent_match=True)
    assert parent.match("a.b.example.com") and not parent.match("badexample.com")


def test_auth_destination_and_untrusted_routing() -> None:
    p = policy("mydestination = $myhostname, localhost\nrelay_domains = relay.example\n"
               "virtual_alias_domains = alias.example\n")
    for ok in ("a@mx.test.example", "a@localhost", "a@relay.example", "a@x.relay.example",
               "a@alias.example", "postmaster", "a@LOCALHOST."):
        assert p.auth_destination(ok), ok
    for bad in ("a@foreign.example", "a%foreign.example@localhost",
                "a!foreign.example@localhost", "a@foreign.example@localhost",
                "a@mx.test.example.evil.example"):
        assert not p.auth_destination(bad), bad
    assert policy("allow_untrusted_routing = yes\nmydestination = localhost\n"
                  ).auth_destination("a%b.example@localhost")


def test_never_an_open_relay() -> None:
    with pytest.raises(PolicyError, match="reject_unauth_destination"):
        policy("smtpd_relay_restrictions = permit_mynetworks\n"
               "smtpd_recipient_restrictions = permit\n")
    # the defaults (defer_unauth_destination) and Debian's usual setting are accepted
    policy()
    policy("smtpd_relay_restrictions =\n"
           "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination\n")


@pytest.mark.parametrize("relay,recipient,guarded", [
    ("permit_mynetworks, bogus_restriction", "", False),
    ("", "permit_mynetworks, REJECT_UNAUTH_DESTINATION", True),
    ("permit_mynetworks, defer", "", True),
    ("reject", "", True),
    ("permit_mynetworks", "defer_if_permit", True),
    ("permit_mynetworks, defer_unauth_destination", "", True),
    ("permit_mynetworks", "check_recipient_access texthash:/x", False),
    ("permit_mynetworks, check_relay_domains", "", False),  # unknown to smtpd: 451 4.3.5
    ("permit_mynetworks, strict", "", False),  # a restriction class: smtpd has none
])
def test_smtpd_and_the_start_check_share_the_open_relay_test(
        tmp_path: Path, relay: str, recipient: str, guarded: bool) -> None:
    """One definition: smtpd's Policy refuses exactly what qmgr-master start refuses."""
    text = (f"smtpd_restriction_classes = strict\nstrict = reject_unauth_destination\n"
            f"smtpd_relay_restrictions = {relay}\nsmtpd_recipient_restrictions = {recipient}\n")
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n" + text)
    (tmp_path / "master.cf").write_text("127.0.0.1:2525 inet n - n - - smtpd\n")
    if guarded:
        policy(text)
        load_configuration(str(tmp_path), modules=False)
        return
    with pytest.raises(PolicyError) as policy_error:
        policy(text)
    with pytest.raises(ConfigError) as config_error:
        load_configuration(str(tmp_path), modules=False)
    assert config_error.value.message == str(policy_error.value)
    assert str(policy_error.value) == (
        "in parameter smtpd_relay_restrictions or smtpd_recipient_restrictions, specify at "
        "least one working instance of: reject_unauth_destination, defer_unauth_destination, "
        "reject, defer or defer_if_permit")


def check(p: Policy, rcpt: str, addr: str = "192.0.2.9", sender: str = "s@far.example"
          ) -> str | None:
    return asyncio.run(p.check_rcpt(ClientInfo(addr, "1025"), "helo.example", sender, rcpt))


def test_restriction_lists() -> None:
    p = policy("smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, "
               "reject_unauth_destination\n"
               "smtpd_recipient_restrictions = reject_non_fqdn_recipient, "
               "reject_non_fqdn_sender\n")
    assert check(p, "x@far.example") == "554 5.7.1 <x@far.example>: Relay access denied"
    assert check(p, "x@far.example", addr="127.0.0.1") is None
    # a permit ends its own list only: the recipient restrictions still apply
    assert check(p, "x@nodot", addr="127.0.0.1") == (
        "504 5.5.2 <x@nodot>: Recipient address rejected: need fully-qualified address")
    assert check(p, "x@mx.test.example", sender="bob@nodot") == (
        "504 5.5.2 <bob@nodot>: Sender address rejected: need fully-qualified address")
    assert check(p, "x@mx.test.example", sender="") is None
    assert check(policy("relay_domains_reject_code = 550\nsmtpd_relay_restrictions = "
                        "defer_unauth_destination\n"), "x@far.example") == (
        "450 4.7.1 <x@far.example>: Relay access denied")
    assert check(policy("smtpd_client_restrictions = reject\n"), "x@localhost") == (
        "554 5.7.1 <x@localhost>: Recipient address rejected: Access denied")
    assert check(policy("smtpd_helo_restrictions = check_helo_access hash:/x\n"),
                 "x@localhost") == "451 4.3.5 Server configuration error"


class FakeResolver:
    """dnspython's resolve() for a few names; anything else is NXDOMAIN."""

    def __init__(self, records: dict[tuple[str, str], list[str]], fail: bool = False):
        self.records = records
        self.fail = fail

    async def resolve(self, name: Any, rtype: str, lifetime: float = 0) -> list[str]:
        if self.fail:
            raise dns.resolver.LifetimeTimeout(timeout=1.0, errors=[])
        key = (str(name).rstrip("."), rtype)
        if key in self.records:
            return self.records[key]
        if any(n == key[0] for n, _ in self.records):
            raise dns.resolver.NoAnswer()
        raise dns.resolver.NXDOMAIN()


def test_reject_unknown_recipient_domain() -> None:
    text = ("smtpd_recipient_restrictions = reject_unknown_recipient_domain, "
            "permit_mynetworks, reject_unauth_destination\n")
    p = policy(text, FakeResolver({("mx.example", "MX"): ["10 mail.mx.example."],
                                   ("a.example", "A"): ["192.0.2.1"]}))
    ip = "127.0.0.1"
    assert check(p, "x@mx.example", ip) is None
    assert check(p, "x@a.example", ip) is None
    assert check(p, "x@localhost", ip) is None  # a final destination: not looked up
    assert check(p, "x@nowhere.example", ip) == (
        "450 4.1.2 <x@nowhere.example>: Recipient address rejected: Domain not found")
    p5 = policy(text + "unknown_address_reject_code = 550\n", FakeResolver({}))
    assert check(p5, "x@nowhere.example", ip) == (
        "550 5.1.2 <x@nowhere.example>: Recipient address rejected: Domain not found")
    failing = policy(text + "unknown_address_reject_code = 550\n", FakeResolver({}, True))
    assert (check(failing, "x@nowhere.example", ip) or "").startswith("450 4.1.2 ")


def test_reject_unknown_recipient_domain_checks_relay_domains() -> None:
    """Postfix's reject_unknown_address skips only final destinations (local, virtual
    alias, virtual mailbox: RESOLVE_CLASS_FINAL); a relay_domains domain without MX or
    A/AAAA is rejected with $unknown_address_reject_code like any other."""
    text = ("relay_domains = relay.example, gone.example\n"
            "virtual_alias_domains = valias.example\n"
            "virtual_mailbox_domains = vmbox.example\n"
            "smtpd_recipient_restrictions = reject_unknown_recipient_domain, "
            "permit_mynetworks, reject_unauth_destination\n")
    dns_table = {("relay.example", "MX"): ["10 mx.relay.example."]}
    ip = "192.0.2.1"  # outside mynetworks: only the relay domains may pass
    p = policy(text, FakeResolver(dns_table))
    assert check(p, "x@relay.example", ip) is None
    assert check(p, "x@gone.example", ip) == (
        "450 4.1.2 <x@gone.example>: Recipient address rejected: Domain not found")
    assert check(p, "x@sub.gone.example", ip) == (  # parent_domain_matches_subdomains
        "450 4.1.2 <x@sub.gone.example>: Recipient address rejected: Domain not found")
    for final in ("localhost", "valias.example", "vmbox.example"):  # never looked up
        assert check(p, f"x@{final}", ip) is None, final
    p5 = policy(text + "unknown_address_reject_code = 550\n", FakeResolver(dns_table))
    assert check(p5, "x@gone.example", ip) == (
        "550 5.1.2 <x@gone.example>: Recipient address rejected: Domain not found")
    failing = policy(text + "unknown_address_reject_code = 550\n",
                     FakeResolver(dns_table, True))
    assert check(failing, "x@gone.example", ip) == (
        "450 4.1.2 <x@gone.example>: Recipient address rejected: Domain not found")


def test_reject_unknown_domain_null_mx() -> None:
    """Postfix 3.0+ reject_unknown_mailhost(): a domain whose MX answer holds a null MX
    (RFC 7505: exchange ".", any preference) is refused with fixed codes, whatever
    $unknown_address_reject_code says: 556 5.1.10 for a recipient, 550 5.7.27 for a
    sender; the MX lookup stops there (no A/AAAA fallback)."""
    real = dns.rdata.from_text("IN", "MX", "0 .")  # dnspython's own MX rdata
    dns_table: dict[tuple[str, str], list[Any]] = {
        ("null.example", "MX"): [real], ("null.example", "A"): ["192.0.2.1"],
        ("null10.example", "MX"): ["10 ."],
        ("ok.example", "MX"): ["10 mail.ok.example."]}
    text = ("smtpd_sender_restrictions = reject_unknown_sender_domain\n"
            "smtpd_recipient_restrictions = reject_unknown_recipient_domain, "
            "permit_mynetworks, reject_unauth_destination\n"
            "unknown_address_reject_code = 550\n")
    p = policy(text, FakeResolver(dns_table))
    ip = "127.0.0.1"
    for domain in ("null.example", "null10.example"):
        assert check(p, f"x@{domain}", ip, sender="me@ok.example") == (
            f"556 5.1.10 <x@{domain}>: Recipient address rejected: Domain {domain} "
            "does not accept mail (nullMX)")
        assert check(p, "x@ok.example", ip, sender=f"me@{domain}") == (
            f"550 5.7.27 <me@{domain}>: Sender address rejected: Domain {domain} "
            "does not accept mail (nullMX)")
    assert check(p, "x@ok.example", ip, sender="me@ok.example") is None
    assert check(p, "x@ok.example", ip, sender="") is None  # the null sender: no lookup
    assert check(p, "x@ok.example", ip, sender="me@localhost") is None  # final: no lookup


def test_reject_unknown_sender_domain() -> None:
    """Postfix reject_unknown_sender_domain: $unknown_address_reject_code 4.1.8 "Domain
    not found" without MX and A/AAAA, 450 4.1.8 when DNS could not tell."""
    text = "smtpd_sender_restrictions = reject_unknown_sender_domain\n"
    table = {("a.example", "A"): ["192.0.2.1"]}
    ip = "127.0.0.1"
    p = policy(text, FakeResolver(table))
    assert check(p, "x@localhost", ip, sender="me@a.example") is None
    assert check(p, "x@localhost", ip, sender="me@nowhere.example") == (
        "450 4.1.8 <me@nowhere.example>: Sender address rejected: Domain not found")
    p5 = policy(text + "unknown_address_reject_code = 550\n", FakeResolver(table))
    assert check(p5, "x@localhost", ip, sender="me@nowhere.example") == (
        "550 5.1.8 <me@nowhere.example>: Sender address rejected: Domain not found")
    failing = policy(text + "unknown_address_reject_code = 550\n",
                     FakeResolver(table, True))
    assert check(failing, "x@localhost", ip, sender="me@nowhere.example") == (
        "450 4.1.8 <me@nowhere.example>: Sender address rejected: Domain not found")


def test_lookup_name() -> None:
    p = policy("", FakeResolver({("9.2.0.192.in-addr.arpa", "PTR"): ["host.example."],
                                 ("host.example", "A"): ["192.0.2.9"],
                                 ("8.2.0.192.in-addr.arpa", "PTR"): ["liar.example."],
                                 ("liar.example", "A"): ["192.0.2.1"]}))
    assert asyncio.run(p.lookup_name("127.0.0.1")) == "localhost"
    assert asyncio.run(p.lookup_name("::1")) == "localhost"
    # another loopback address is looked up like any (no PTR here): not "localhost"
    assert asyncio.run(p.lookup_name("127.0.0.2")) == "unknown"
    assert asyncio.run(p.lookup_name("192.0.2.9")) == "host.example"
    assert asyncio.run(p.lookup_name("192.0.2.8")) == "unknown"  # not forward-confirmed
    assert asyncio.run(p.lookup_name("192.0.2.7")) == "unknown"
    off = policy("smtpd_peername_lookup = no\n", p.resolver)
    assert asyncio.run(off.lookup_name("192.0.2.9")) == "unknown"
    assert ClientInfo("2001:db8::1", "25", "h").rfc_addr == "IPv6:2001:db8::1"
    assert ClientInfo("192.0.2.1", "25", "h").namaddr == "h[192.0.2.1]"


def test_lazy_resolver_reads_resolv_conf_when_made(tmp_path: Path) -> None:
    """The smtpd's resolver: the file read when it is made (before the jail), dnspython's
    Resolver made at the first lookup from that text, configured as Resolver(path)."""
    conf = tmp_path / "resolv.conf"
    text = ("# comment\r\nnameserver 192.0.2.53\r\nnameserver 2001:db8::53\n"
            "search a.example b.example\noptions ndots:3 timeout:1 rotate\n")
    conf.write_text(text, newline="")
    expected = dns.asyncresolver.Resolver(str(conf))
    lazy = LazyResolver(str(conf))
    conf.unlink()  # as in the chroot: nothing is read from here on
    assert lazy._resolver is None  # not made before a lookup needs it
    made = lazy.resolver()
    assert made is lazy.resolver()
    for name in ("nameservers", "search", "domain", "ndots", "timeout", "rotate", "port",
                 "lifetime", "edns"):
        assert getattr(made, name) == getattr(expected, name), name
    with pytest.raises(dns.resolver.NoResolverConfiguration):
        LazyResolver(str(tmp_path / "missing"))  # as Resolver(): smtpd then has none
    # no nameserver: every lookup fails as DNS not answering, the answers of no resolver
    empty = tmp_path / "empty"
    empty.write_text("search a.example\n")
    text = ("smtpd_recipient_restrictions = reject_unknown_recipient_domain, "
            "permit_mynetworks, reject_unauth_destination\n")
    none, lazy_empty = policy(text, None), policy(text, LazyResolver(str(empty)))
    assert check(lazy_empty, "x@nowhere.example", "127.0.0.1") == check(
        none, "x@nowhere.example", "127.0.0.1")
    assert asyncio.run(lazy_empty.lookup_name("192.0.2.9")) == "unknown"


def test_queue_space(tmp_path: Path) -> None:
    assert queue_space(str(tmp_path), 0, 10240000)
    assert not queue_space(str(tmp_path), 1 << 60, 0)
    assert not queue_space(str(tmp_path), 0, 1 << 60)  # 1.5 x message_size_limit
    assert not queue_space(str(tmp_path), 0, 0, size=1 << 60)
    assert queue_space(str(tmp_path / "missing"), 1 << 60, 0)  # unknown: the write tells


def test_is_fqdn() -> None:
    assert is_fqdn("a.example") and is_fqdn("[192.0.2.1]") and is_fqdn("x-y.b.example.")
    assert not is_fqdn("localhost") and not is_fqdn("a..b") and not is_fqdn("-a.b")


def test_xtext_decode() -> None:
    assert xtext_decode("abc+2Bdef+3D") == "abc+def="
    assert xtext_decode("") == ""
    for bad in ("a+2", "a+ZZ", "a=b", "a b", "é"):
        assert xtext_decode(bad) is None, bad


def test_truncate_headers() -> None:
    msg = b"A: " + b"x" * 50 + b"\r\n\tcont " + b"y" * 50 + b"\r\nB: ok\r\n\r\nbody " * 1
    assert truncate_headers(msg, 1000) == (msg, 0)
    cut, n = truncate_headers(msg + b"z" * 2000, 60)
    assert n == 1
    assert cut.startswith(b"A: " + b"x" * 50 + b"\r\n\tcont y\r\nB: ok\r\n\r\nbody z")
    # the body is never touched, however long its lines
    body_only = b"not a header line\r\n" + b"q" * 5000
    assert truncate_headers(body_only, 100) == (body_only, 0)


def test_session_sets_up_what_aiosmtpd_sets_up(tmp_path: Path) -> None:
    """SmtpdSession replaces SMTP.__init__ (without its per-connection introspection):
    every attribute aiosmtpd's constructor sets must be there (guards an upgrade)."""
    from aiosmtpd.smtp import SMTP

    from transports.smtpd_session import SmtpdParams, SmtpdSession

    cfg = Config.from_text(f"queue_directory = {tmp_path}\n", str(tmp_path))

    class Host:
        params = SmtpdParams.from_config(cfg, "smtpd", str(tmp_path))
        policy = policy()
        tls_context = None
        tls_required = False

    async def make() -> tuple[set[str], set[str]]:
        plain = SMTP(object(), enable_SMTPUTF8=True, hostname="h.example")
        ours = SmtpdSession(Host())  # type: ignore[arg-type]
        return set(vars(plain)), set(vars(ours))

    plain_attrs, our_attrs = asyncio.run(make())
    assert plain_attrs - {"_call_limit_default", "_call_limit_base"} <= our_attrs


def test_connection_counter_across_processes(tmp_path: Path) -> None:
    """Two counters on one file act like two smtpd processes (each open() is its own
    lock owner); a count survives only as long as its holder."""
    from transports.smtpd_policy import ConnectionCounter

    path = str(tmp_path / "smtpd.conn")
    one, two = ConnectionCounter(path), ConnectionCounter(path)
    c1, s1 = one.acquire("192.0.2.1", 2)
    c2, s2 = two.acquire("192.0.2.1", 2)
    assert (c1, c2) == (1, 2) and s1 is not None and s2 is not None
    assert one.acquire("192.0.2.1", 2) == (3, None)
    assert one.acquire("192.0.2.2", 2)[0] == 1  # another client, its own count
    os.close(two.fd)  # the second "process" died: its session no longer counts
    three = ConnectionCounter(path)
    c3, s3 = three.acquire("192.0.2.1", 2)
    assert c3 == 2
    one.release(s1)
    assert three.acquire("192.0.2.1", 2)[0] == 1
    three.release(s3)
    local = ConnectionCounter(None)
    assert [local.acquire("a", 2)[0] for _ in range(3)] == [1, 2, 3]
    local.release(-1)
    assert local.acquire("a", 2)[0] == 2


def _rcpt(p: Any, addr: str) -> str | None:
    """The policy's verdict on ``RCPT TO:<addr>`` from 127.0.0.1 (None: accepted)."""
    return asyncio.run(p.check_rcpt(ClientInfo("127.0.0.1", "1025"), "h.example", "", addr))



def test_local_recipient_maps_reject_unknown_local_users(tmp_path: Path) -> None:
    table = tmp_path / "local"
    table.write_text("alice ok\ncarol@mx.test.example ok\n")
    base = ("mydestination = mx.test.example\nmynetworks = 127.0.0.0/8\n"
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n"
            "recipient_delimiter = +\n")
    p = policy(base + f"local_recipient_maps = texthash:{table}, proxy:unix:passwd.byname,"
               " nis:mail.aliases\n")

    rcpt = functools.partial(_rcpt, p)

    assert rcpt("alice@mx.test.example") is None
    assert rcpt("alice+list@mx.test.example") is None  # the extension is cut
    assert rcpt("carol@mx.test.example") is None  # user@domain key
    assert rcpt("root@mx.test.example") is None  # the passwd database
    assert rcpt("postmaster@mx.test.example") is None  # RFC 5321: always
    assert rcpt("nosuchuser@mx.test.example") == (
        "550 5.1.1 <nosuchuser@mx.test.example>: Recipient address rejected: "
        "User unknown in local recipient table")
    assert rcpt("anyone@elsewhere.example") is None  # not local: relay rules only
    # empty (the bundled main.cf): every local name is accepted
    assert asyncio.run(policy(base).check_rcpt(ClientInfo("127.0.0.1", "1025"), "h", "",
                                               "nosuchuser@mx.test.example")) is None


def test_local_recipient_maps_accept_alias_names(tmp_path: Path) -> None:
    """Postfix's default local_recipient_maps holds $alias_maps: its names exist, read
    in aliases(5) syntax ("name: value")."""
    aliases = tmp_path / "aliases"
    aliases.write_text("# aliases\nWebmaster: root\nteam: alice,\n  bob\n")
    base = ("mydestination = mx.test.example\nmynetworks = 127.0.0.0/8\n"
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n"
            f"alias_maps = hash:{aliases}, nis:mail.aliases\n"
            "local_recipient_maps = proxy:unix:passwd.byname $alias_maps\n")
    p = policy(base)

    rcpt = functools.partial(_rcpt, p)

    assert rcpt("webmaster@mx.test.example") is None
    assert rcpt("team@mx.test.example") is None
    assert rcpt("root@mx.test.example") is None
    assert rcpt("webmaster:@mx.test.example") is not None
    assert rcpt("alice@mx.test.example") == (
        "550 5.1.1 <alice@mx.test.example>: Recipient address rejected: "
        "User unknown in local recipient table")


def test_local_recipient_maps_bad_alias_line_keeps_the_table(tmp_path: Path) -> None:
    """One line without a colon made the whole alias table ignored: every alias name
    was then 550 User unknown after the typo (postalias skips the line, warns)."""
    aliases = tmp_path / "aliases"
    aliases.write_text("webmaster: root\nteam alice\nsales: bob\n")
    p = policy("mydestination = mx.test.example\n"
               f"alias_maps = hash:{aliases}\n"
               "local_recipient_maps = proxy:unix:passwd.byname $alias_maps\n")

    rcpt = functools.partial(_rcpt, p)

    assert rcpt("webmaster@mx.test.example") is None
    assert rcpt("sales@mx.test.example") is None
    assert rcpt("team@mx.test.example") is not None  # the bad line is no entry


def test_local_recipient_maps_unreadable_table_is_451(tmp_path: Path) -> None:
    """Postfix's smtpd: a recipient check that cannot be completed (a table lookup
    error) is 451 4.3.0 Temporary lookup failure, not 550 User unknown; passwd names
    and names of readable tables are still accepted, and the table is tried again."""
    aliases = tmp_path / "aliases"
    other = tmp_path / "other"
    other.write_text("sales: bob\n")
    p = policy("mydestination = mx.test.example\n"
               f"alias_maps = hash:{other}, hash:{aliases}\n"
               "local_recipient_maps = proxy:unix:passwd.byname $alias_maps\n")

    rcpt = functools.partial(_rcpt, p)

    assert rcpt("webmaster@mx.test.example") == (
        "451 4.3.0 <webmaster@mx.test.example>: Temporary lookup failure")
    assert rcpt("root@mx.test.example") is None
    assert rcpt("sales@mx.test.example") is None
    aliases.write_text("webmaster: root\n")
    assert rcpt("webmaster@mx.test.example") is None
    assert rcpt("nosuchuser@mx.test.example") == (
        "550 5.1.1 <nosuchuser@mx.test.example>: Recipient address rejected: "
        "User unknown in local recipient table")


def test_lazy_resolver_with_a_garbage_resolv_conf(tmp_path: Path) -> None:
    """A resolv.conf dnspython cannot parse is "no resolver", never an exception out
    of the smtpd: a nameserver line that is no address made dnspython's ValueError
    escape lookup_name ("never raises") at the first lookup; a Latin-1 comment made a
    UnicodeDecodeError at the smtpd's start."""
    garbage = tmp_path / "garbage"
    garbage.write_text("nameserver garbage\n")
    text = ("smtpd_recipient_restrictions = reject_unknown_recipient_domain, "
            "permit_mynetworks, reject_unauth_destination\nsmtpd_peername_lookup = yes\n")
    none, lazy = policy(text, None), policy(text, LazyResolver(str(garbage)))
    assert asyncio.run(lazy.lookup_name("192.0.2.9")) == "unknown"
    assert check(lazy, "x@nowhere.example", "127.0.0.1") == check(
        none, "x@nowhere.example", "127.0.0.1")
    latin1 = tmp_path / "latin1"
    latin1.write_bytes(b"# caf\xe9\nnameserver 192.0.2.53\n")
    assert [str(n) for n in LazyResolver(str(latin1)).resolver().nameservers] == [
        "192.0.2.53"]


@pytest.mark.parametrize("text", ["nameserver garbage\n", "search a.example\n",
                                  "nameserver 192.0.2.53\nsearch a..example\n"])
def test_lazy_resolver_parses_a_broken_resolv_conf_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """A resolv.conf that makes no resolver (a nameserver that is no address, none at
    all, a bad search name) is parsed at the first lookup only: from then on it is "no
    resolver" (NoResolverConfiguration) without parsing it again, and its warning is
    logged once - not at every lookup of every session."""
    from master import log

    log.setup("smtpd", str(tmp_path / "maillog"), "qmgrd")
    conf = tmp_path / "resolv.conf"
    conf.write_text(text)
    parsed: list[object] = []
    real = dns.asyncresolver.Resolver.read_resolv_conf

    def counting(self: dns.asyncresolver.Resolver, f: Any) -> None:
        parsed.append(f)
        real(self, f)

    monkeypatch.setattr(dns.asyncresolver.Resolver, "read_resolv_conf", counting)
    lazy = LazyResolver(str(conf))
    assert parsed == []  # nothing parsed before a lookup needs it
    for _ in range(3):
        with pytest.raises(dns.resolver.NoResolverConfiguration):
            lazy.resolver()
    p = policy("smtpd_recipient_restrictions = reject_unknown_recipient_domain, "
               "permit_mynetworks, reject_unauth_destination\n", lazy)
    assert asyncio.run(p.lookup_name("192.0.2.9")) == "unknown"
    assert check(p, "x@nowhere.example", "127.0.0.1") == check(
        policy("smtpd_recipient_restrictions = reject_unknown_recipient_domain, "
               "permit_mynetworks, reject_unauth_destination\n", None),
        "x@nowhere.example", "127.0.0.1")
    assert len(parsed) == 1
    warnings = [line for line in (tmp_path / "maillog").read_text().splitlines()
                if f"warning: {conf}: " in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].endswith(": no DNS resolver")
    good = tmp_path / "good"
    good.write_text("nameserver 192.0.2.53\n")
    ok = LazyResolver(str(good))
    assert ok.resolver() is ok.resolver() and len(parsed) == 2  # made once, kept
