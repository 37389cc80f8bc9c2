"""smtp_dns — where the smtp client connects: nexthop syntax, MX and address lookups.

Summary
    Postfix's smtp nexthop forms (postfix.md §6.3) and address selection
    (smtp_addr.c, simplified):

    * ``[host]:port`` / ``[host]`` / ``[ipv6:addr]`` — no MX lookup (an IP literal needs
      no lookup at all); ``host:port`` and ``domain`` — MX lookup; a comma/space
      separated list of those is tried in order. A port may be a number or a service name.
      The syntax is master.config.nexthop's (parse_nexthop, re-exported here), the parser
      the start/reload check of relayhost uses too.
    * MX records are sorted by preference (equal preferences shuffled), then each MX
      host's A/AAAA records (IPv4 first, per ``inet_protocols``); no MX record -> the
      domain's own addresses; a null MX (RFC 7505: an MX whose exchange is ".", any
      preference; as Postfix's dns_lookup, even beside other MX records) -> 5.1.0
      "Domain D does not accept mail (nullMX)": a bounce, never retried (Postfix's
      smtp_addr.c uses 5.1.0, not RFC 7505's 5.1.10).
    * ``smtp_host_lookup``: ``dns`` (dnspython) and/or ``native`` (getaddrinfo, which reads
      /etc/hosts) for addresses, tried in order; without ``dns`` no MX lookup happens.
    * Errors: NXDOMAIN -> 5.4.4 "Host or domain name not found. Name service error for
      name=N type=T: Host not found"; a failed lookup -> 4.4.3 (", try again"); a broken
      MX host -> 4.x.x.

    dnspython, its record classes and the IDNA codec are imported at module import time
    and the resolver reads /etc/resolv.conf when HostResolver is made: before the chroot.

Public API
    Nexthop(host, port, mx) (.literal), Address(hostname, ip, port, best=True)
        (.namaddr, .relay; best: a most preferred server of its nexthop)
    parse_nexthop(text, default_port=25) -> list[Nexthop]   ValueError (master.config.nexthop)
    HostResolver(lookup=("dns",), protocols=("ipv4", "ipv6"), dns_resolver=None)
        .resolve(nexthop) -> list[Address]; .mx_hosts(domain); .addresses(host)   DnsError
    DnsError(status, reason); DnsResolverLike (Protocol for a test resolver)
Logs nothing.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - dnspython's IDNA codec, loaded before the chroot
import random
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import dns.exception
import dns.name
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.DNAME
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.NSEC
import dns.rdtypes.ANY.NSEC3
import dns.rdtypes.ANY.OPT
import dns.rdtypes.ANY.RRSIG
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.resolver

from master.config.nexthop import Nexthop, is_ip_address, parse_nexthop

__all__ = ["Address", "DnsError", "DnsResolverLike", "HostResolver", "Nexthop",
           "parse_nexthop"]

@dataclass(frozen=True)
class Address:
    """One server address to try: the name it came from, the IP, the port; ``best``:
    one of its nexthop's most preferred servers (Postfix SMTP_FEATURE_BEST_MX: every
    address of a host, the lowest-preference MX hosts' addresses), not part of equality."""

    hostname: str
    ip: str
    port: int
    best: bool = field(default=True, compare=False)

    @property
    def namaddr(self) -> str:
        """``host[ip]`` as Postfix writes it."""
        return f"{self.hostname}[{self.ip}]"

    @property
    def relay(self) -> str:
        """``host[ip]:port`` for relay= in the log."""
        return f"{self.hostname}[{self.ip}]:{self.port}"


class DnsError(Exception):
    """A name could not be resolved: ``status`` 4.x.x (try later) or 5.x.x (never)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class DnsResolverLike(Protocol):
    """The part of dns.resolver.Resolver we use (tests substitute a fake)."""

    def resolve(self, qname: str, rdtype: str, *, search: bool | None = None) -> Iterable[object]:
        ...


class HostResolver:
    """MX and address lookups for the smtp client (Postfix smtp_addr.c, simplified).

    Args:
        lookup: smtp_host_lookup methods in order: "dns" (dnspython), "native"
            (getaddrinfo). Without "dns" no MX lookup happens.
        protocols: "ipv4" and/or "ipv6" (inet_protocols; "all" = both).
        dns_resolver: a dns.resolver.Resolver (made here when None and "dns" is used).
    """

    def __init__(
        self,
        lookup: Sequence[str] = ("dns",),
        protocols: Sequence[str] = ("ipv4", "ipv6"),
        dns_resolver: DnsResolverLike | None = None,
    ) -> None:
        self.lookup = [m.lower() for m in lookup] or ["dns"]
        protos = {p.lower() for p in protocols}
        if "all" in protos or not protos:
            protos = {"ipv4", "ipv6"}
        self.rdtypes = [t for p, t in (("ipv4", "A"), ("ipv6", "AAAA")) if p in protos]
        self.families = {socket.AF_INET if t == "A" else socket.AF_INET6 for t in self.rdtypes}
        self.dns: DnsResolverLike | None = dns_resolver
        if self.dns is None and "dns" in self.lookup:
            self.dns = dns.resolver.Resolver()
        self.rng = random.Random()

    def resolve(self, nexthop: Nexthop) -> list[Address]:
        """Addresses to try for ``nexthop``, best first.

        Raises:
            DnsError: no address (5.x.x when the name does not exist, 4.x.x otherwise).
        """
        if is_ip_address(nexthop.host):
            return [Address(nexthop.host, nexthop.host, nexthop.port)]
        records = [(0, nexthop.host)]
        if nexthop.mx and "dns" in self.lookup:
            records = self._mx_records(nexthop.host)
        hosts = [host for _, host in records]
        out: list[Address] = []
        error: DnsError | None = None
        for pref, host in records:
            try:
                ips = self.addresses(host)
            except DnsError as exc:
                if len(hosts) > 1 or host != nexthop.host:
                    exc.status = "4" + exc.status[1:]  # a broken MX host: try later
                error = exc
                continue
            out.extend(Address(host, ip, nexthop.port, pref == records[0][0]) for ip in ips)
        if not out:
            raise error or DnsError("4.4.3", f"no address for {nexthop.host}")
        return out

    def mx_hosts(self, domain: str) -> list[str]:
        """MX host names of ``domain`` by preference; ``[domain]`` when it has no MX.

        Raises:
            DnsError: NXDOMAIN (5.4.4), null MX (5.1.0), lookup failure (4.4.3).
        """
        return [host for _, host in self._mx_records(domain)]

    def _mx_records(self, domain: str) -> list[tuple[int, str]]:
        """(preference, host) of ``domain``'s MX hosts, as :meth:`mx_hosts` (no MX:
        ``[(0, domain)]``)."""
        assert self.dns is not None
        try:
            answer = list(self.dns.resolve(domain, "MX", search=False))
        except dns.resolver.NXDOMAIN:
            raise _not_found(domain, "MX", hard=True) from None
        except dns.resolver.NoAnswer:
            return [(0, domain)]
        except dns.exception.DNSException:
            raise _not_found(domain, "MX", hard=False) from None
        recs: list[tuple[int, float, str]] = []
        for rr in answer:
            pref = int(getattr(rr, "preference", 0))
            exchange = str(getattr(rr, "exchange", "")).rstrip(".")
            recs.append((pref, self.rng.random(), exchange))
        if any(exchange == "" for _, _, exchange in recs):
            # Postfix dns_get_answer(): an MX record whose exchange is the root makes the
            # whole lookup DNS_NULLMX, whatever else the answer holds (RFC 7505 forbids
            # other MX records beside a null MX); smtp_domain_addr() bounces it 5.1.0
            raise DnsError("5.1.0", f"Domain {domain} does not accept mail (nullMX)")
        recs.sort()
        hosts: list[tuple[int, str]] = []
        for pref, _, host in recs:
            if host and host not in (h for _, h in hosts):
                hosts.append((pref, host))
        if not hosts:
            raise DnsError("4.4.3", f"Domain {domain} has no valid MX host")
        return hosts

    def addresses(self, host: str) -> list[str]:
        """IP addresses of ``host`` (IPv4 first), per smtp_host_lookup.

        Raises:
            DnsError: 5.4.4 when the name has no address, 4.4.3 when lookups failed.
        """
        if is_ip_address(host):
            return [host]
        error = DnsError("5.4.4", f"Host or domain name not found. Name service error for "
                                  f"name={host} type=A: Host not found")
        for method in self.lookup:
            try:
                ips = self._dns_addresses(host) if method == "dns" else self._native(host)
            except DnsError as exc:
                error = exc
                continue
            if ips:
                return ips
        raise error

    def _dns_addresses(self, host: str) -> list[str]:
        assert self.dns is not None
        ips: list[str] = []
        hard = True
        for rdtype in self.rdtypes:
            try:
                ips.extend(str(getattr(rr, "address", "")) for rr in
                           self.dns.resolve(host, rdtype, search=False))
            except dns.resolver.NXDOMAIN:
                raise _not_found(host, rdtype, hard=True) from None
            except dns.resolver.NoAnswer:
                continue
            except dns.exception.DNSException:
                hard = False
        if not ips:
            raise _not_found(host, self.rdtypes[-1] if self.rdtypes else "A", hard=hard)
        return [ip for ip in ips if ip]

    def _native(self, host: str) -> list[str]:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            hard = exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5))
            raise _not_found(host, "A", hard=hard) from None
        ips4 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET and i[0] in self.families]
        ips6 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET6 and i[0] in self.families]
        return list(dict.fromkeys(ips4 + ips6))


def _not_found(name: str, rdtype: str, hard: bool) -> DnsError:
    text = (f"Host or domain name not found. Name service error for name={name} "
            f"type={rdtype}: Host not found")
    if hard:
        return DnsError("5.4.4", text)
    return DnsError("4.4.3", text + ", try again")
