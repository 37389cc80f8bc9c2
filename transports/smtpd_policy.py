"""smtpd_policy — the SMTP server's access policy: relay control, restriction lists,
client identity and queue space (Postfix smtpd_check(5) facts, ours to enforce).

Summary
    ``Policy(cfg)`` is built once per smtpd process (before the jail) and answers the
    questions smtpd asks while a client talks:

    * **Networks** (``NetList``): ``mynetworks``, ``smtpd_client_event_limit_exceptions``
      and ``smtpd_forbid_bare_newline_exclusions`` (mynetworks's parent-domain style, as
      Postfix) hold ``a.b.c.d``, ``a.b.c.d/n``, ``[v6]``, ``[v6]/n`` (brackets
      optional), ``!`` before an entry excludes, and ``type:table`` entries (looked up by address).
      Host names are not supported: a warning names them once, and they never match.
    * **Domains** (``DomainList``): ``mydestination``, ``relay_domains``,
      ``virtual_alias_domains``, ``virtual_mailbox_domains``: ``name``, ``.name``
      (subdomains), ``!name``, ``type:table``; a plain ``name`` also matches its
      subdomains when the parameter is in ``parent_domain_matches_subdomains`` (by default
      relay_domains and mynetworks, not mydestination) - as Postfix's match_list.
    * **Authorized destination** (``permit_auth_destination``): an address without a
      domain, or whose domain is local, virtual or in relay_domains - unless it carries
      sender-specified routing (``@``, ``%`` or ``!`` in the local part, or a source route)
      and ``allow_untrusted_routing = no``.
    * **Restriction lists** (smtpd_delay_reject = yes: all are evaluated at RCPT time, in
      Postfix's order): ``smtpd_client_restrictions``, ``smtpd_helo_restrictions``,
      ``smtpd_sender_restrictions``, ``smtpd_relay_restrictions``,
      ``smtpd_recipient_restrictions``. In each list the first ``permit``/``reject``
      decides that list; a reject anywhere rejects. Supported: ``permit``, ``dunno``,
      ``reject`` (554 5.7.1 Access denied), ``defer`` (450 4.7.1), ``permit_mynetworks``,
      ``permit_auth_destination``, ``reject_unauth_destination`` (``$relay_domains_reject_code``
      554, ``5.7.1 <rcpt>: Relay access denied``), ``defer_unauth_destination`` (that code
      minus 100: 454 4.7.1), ``reject_non_fqdn_recipient`` / ``reject_non_fqdn_sender``
      (``$non_fqdn_reject_code`` 504 5.5.2), ``reject_unknown_recipient_domain`` /
      ``reject_unknown_sender_domain`` (``$unknown_address_reject_code`` 450 4.1.2 /
      4.1.8 when a domain has neither MX nor A/AAAA, 450 when DNS could not tell; a null
      MX, RFC 7505, as Postfix 3.0+: ``556 5.1.10`` / ``550 5.7.27 <addr>: Recipient
      (Sender) address rejected: Domain D does not accept mail (nullMX)``; skipped, as
      Postfix, for the null sender, final destinations - mydestination,
      virtual_alias_domains, virtual_mailbox_domains - and address literals, so a
      relay_domains domain is looked up too; DNS through dnspython's asyncio resolver). ``permit_sasl_authenticated``
      is accepted and never matches: smtpd offers no AUTH (no SASL). Any other name:
      ``warning: unknown smtpd restriction: "x"`` and ``451 4.3.5 Server configuration
      error``, as Postfix.
    * **Never an open relay**: as Postfix, the configuration is refused (PolicyError, the
      process exits fatal and the master throttles) unless smtpd_relay_restrictions or
      smtpd_recipient_restrictions holds one of reject_unauth_destination,
      defer_unauth_destination, reject, defer, defer_if_permit - decided by
      master.config.relayguard.open_relay_problem, which ``qmgr-master start``/``reload``
      apply first (master.config.validate), refusing such a configuration with its file
      and line before any smtpd runs.
    * **Queue space** (Postfix smtpd_check_queue / smtpd_check_size): ``queue_space(...)``
      refuses (``452 4.3.1 Insufficient system storage``) when ``queue_minfree`` is not
      below the free space of the queue file system, when 1.5 x ``message_size_limit``
      is not, or when a declared SIZE plus queue_minfree is not.
    * **Client identity** (``ClientInfo``, ``lookup_name``): the forward-confirmed name of
      the client's address (PTR, then A/AAAA must give the address back), ``unknown``
      otherwise; 127.0.0.1 and ::1 are ``localhost`` without a query (as /etc/hosts
      names them), other loopback addresses (127.0.0.2) are looked up like any;
      ``smtpd_peername_lookup = no`` skips the lookup.

Public API
    PolicyError(Exception)
    ClientInfo(addr, port, name="unknown") .rfc_addr .namaddr .family
    NetList(entries, param, parent_match=False) .match(addr) -> bool
    DomainList(entries, param, parent_match=False) .match(domain) -> bool
    LazyResolver(path="/etc/resolv.conf")   async .resolve(...) as dnspython's Resolver,
        which is made at the first lookup from the file as read when this was made
        (parsed once; a broken file: one warning, then NoResolverConfiguration)
    Policy(cfg, resolver=None)
        .is_mynetworks(addr) -> bool; .limit_exempt(addr) -> bool
        .bare_newline_exempt(addr) -> bool
        .auth_destination(rcpt) -> bool
        async .check_rcpt(client, helo, sender, rcpt) -> str | None   (None = accepted)
        async .lookup_name(addr) -> str
    queue_space(path, minfree, message_limit, size=0) -> bool   (True = enough room)
    ConnectionCounter(path) .acquire(addr, limit) -> (count, slot | None); .release(slot)
        sessions per client address across processes (byte-range locks on one file)
    domain_of(address) -> str;  is_fqdn(domain) -> bool

Logs warnings (unknown restriction, unsupported mynetworks entry - with the reason from
master.config.netlist, which Config.check also uses - unreadable table, a resolv.conf
that makes no resolver: once per process, at its first lookup); raises
PolicyError for a configuration that would make an open relay (the message of
master.config.relayguard, which the start/reload check also uses) or names a table that
cannot be opened.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import ipaddress
import os
import pwd
import struct
import threading
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from master import log
from master.config import Config
from master.config.netlist import NetworkError, is_table, parse_network
from master.config.relayguard import open_relay_problem
from qmgrd.maps import Table, TableError, TableUnavailable, open_alias_table, open_table

__all__ = [
    "ClientInfo",
    "ConnectionCounter",
    "DomainList",
    "LazyResolver",
    "NetList",
    "Policy",
    "PolicyError",
    "domain_of",
    "is_fqdn",
    "queue_space",
]

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network
_LOOKUP_LIFETIME = 10.0  # seconds for a PTR or A/AAAA/MX query
_LOCALHOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))  # /etc/hosts
_SPACE_FACTOR = 1.5      # Postfix smtpd_space_multf


class PolicyError(Exception):
    """The configuration cannot be enforced safely (the message says why)."""


@dataclass
class ClientInfo:
    """The SMTP client: address, port and (verified) name.

    ``rfc_addr`` is the address as written in Received: (``IPv6:`` prefix for IPv6),
    ``namaddr`` the ``name[addr]`` form of the log lines.
    """

    addr: str
    port: str
    name: str = "unknown"
    family: int = field(default=2)  # AF_INET; 10 = AF_INET6 (Postfix client_address_type)

    def __post_init__(self) -> None:
        if ":" in self.addr:
            self.family = 10

    @property
    def rfc_addr(self) -> str:
        return f"IPv6:{self.addr}" if ":" in self.addr else self.addr

    @property
    def namaddr(self) -> str:
        return f"{self.name}[{self.addr}]"


def domain_of(address: str) -> str:
    """The lower-case domain of ``address`` without a trailing dot ("" for none)."""
    at = address.rfind("@")
    return address[at + 1:].lower().rstrip(".") if at >= 0 else ""


def is_fqdn(domain: str) -> bool:
    """True for a fully-qualified host name (at least one dot, valid labels) or an
    address literal ``[...]``."""
    if domain.startswith("[") and domain.endswith("]"):
        return True
    labels = domain.rstrip(".").split(".")
    if len(labels) < 2:
        return False
    return all(0 < len(lb) <= 63 and lb.replace("-", "").isalnum() and lb[0] != "-"
               and lb[-1] != "-" for lb in labels)


def _open(spec: str, param: str) -> Table | None:
    try:
        return open_table(spec)
    except TableError as exc:
        raise PolicyError(f"parameter {param}: {exc}") from None


class NetList:
    """A Postfix network list (mynetworks syntax; see module docstring)."""

    def __init__(self, entries: list[str], param: str, parent_match: bool = False) -> None:
        self.items: list[tuple[bool, _Net | Table]] = []
        for raw in entries:
            neg = raw.startswith("!")
            text = raw[1:] if neg else raw
            if _is_table(text):
                table = _open(text, param)
                if table is not None:
                    self.items.append((neg, table))
                continue
            try:
                self.items.append((neg, parse_network(text)))
            except NetworkError as exc:  # Config.check refuses these: reached only unchecked
                log.warning(f"{param}: unsupported entry \"{raw}\" ({exc}): ignored")
        # answers by address string, for a list of networks only (a table's contents may
        # change): permit_mynetworks asks once per RCPT, for the session's one client
        self._known: dict[str, bool] | None = (
            None if any(isinstance(item, Table) for _, item in self.items) else {})

    def match(self, addr: str) -> bool:
        """True when ``addr`` (an IP address string) is in the list."""
        known = self._known
        if known is None:
            return self._match(addr)
        hit = known.get(addr)
        if hit is None:
            if len(known) >= 256:
                known.clear()
            hit = known[addr] = self._match(addr)
        return hit

    def _match(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for neg, item in self.items:
            if isinstance(item, Table):
                hit = item.lookup(str(ip)) is not None
            else:
                hit = ip.version == item.version and ip in item
            if hit:
                return not neg
        return False


_is_table = is_table  # master.config.netlist: one parser for smtpd and the config check


class DomainList:
    """A Postfix domain list (mydestination / relay_domains syntax)."""

    def __init__(self, entries: list[str], param: str, parent_match: bool = False) -> None:
        self.parent_match = parent_match
        self.items: list[tuple[bool, str | Table]] = []
        for raw in entries:
            neg = raw.startswith("!")
            text = raw[1:] if neg else raw
            if _is_table(text):
                table = _open(text, param)
                if table is not None:
                    self.items.append((neg, table))
            elif text:
                self.items.append((neg, text.lower().rstrip(".")))

    def match(self, domain: str) -> bool:
        """True when ``domain`` (lower case, no trailing dot) is in the list."""
        parents = domain.split(".")
        for neg, item in self.items:
            if isinstance(item, Table):
                hit = item.lookup(domain) is not None or (self.parent_match and any(
                    item.lookup(".".join(parents[i:])) is not None
                    for i in range(1, len(parents))))
            elif item.startswith("."):
                hit = domain.endswith(item)
            else:
                hit = domain == item or (self.parent_match and domain.endswith("." + item))
            if hit:
                return not neg
        return False


def queue_space(path: str, minfree: int, message_limit: int, size: int = 0) -> bool:
    """True when the file system holding ``path`` has room for mail (module docstring).
    An unreadable file system counts as having room (the write will tell)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return True
    bsize = st.f_frsize or st.f_bsize or 1
    free = st.f_bavail
    if minfree // bsize >= free:
        return False
    if message_limit and message_limit // bsize >= free / _SPACE_FACTOR:
        return False
    return not (size and minfree // bsize + size // bsize >= free)


class LocalRecipients:
    """``local_recipient_maps``: which local parts of ``mydestination`` exist (Postfix's
    smtpd_reject_unlisted_recipient for local domains). Empty = every name exists (no
    check). ``unix:passwd.byname`` (also behind ``proxy:``) looks in the passwd
    database; texthash/hash/inline tables are looked up by ``user@domain`` then
    ``user``; a table that is also in ``alias_maps`` is read in aliases(5) syntax
    (``name: value``); a bad line in a table file is a warning (file and line) and is
    skipped; a table type qmgrd cannot read (e.g. ``nis:``) is logged once and matches
    nothing. A table file that cannot be read (missing, unreadable) is logged and tried
    again at each check: while it cannot be read, a name that no other table (nor
    passwd) has is not known either way - known() returns None and the smtpd answers
    ``451 4.3.0 <rcpt>: Temporary lookup failure`` (Postfix's reject_dict_retry), not
    550 User unknown for a name that may well exist."""

    def __init__(self, entries: list[str], alias_maps: list[str] | None = None) -> None:
        self.passwd = False
        self.tables: list[Table] = []
        self.active = bool(entries)
        self.aliases = {s.strip().removeprefix("proxy:") for s in alias_maps or []}
        self.unavailable: dict[str, str] = {}   # spec -> the problem last logged
        self._lock = threading.Lock()
        for spec in entries:
            bare = spec.removeprefix("proxy:")
            if bare == "unix:passwd.byname":
                self.passwd = True
                continue
            self._open(bare)

    def _open(self, bare: str) -> None:
        try:
            # a table of alias_maps (Postfix's default has $alias_maps) is in
            # aliases(5) syntax, "name: value" (qmgrd.maps.open_alias_table)
            self.tables.append(open_alias_table(bare) if bare in self.aliases
                               else open_table(bare))
            self.unavailable.pop(bare, None)
        except TableUnavailable as exc:
            if self.unavailable.get(bare) != str(exc):
                log.warning(f"local_recipient_maps: {exc}: table lookup error")
            self.unavailable[bare] = str(exc)
        except TableError as exc:
            log.warning(f"local_recipient_maps: {exc}: table ignored")

    def known(self, address: str, delimiter: str = "") -> bool | None:
        """True when ``address`` (a local-domain recipient) exists, or no check is set;
        False when it does not; None when a table that cannot be read might have it."""
        if not self.active:
            return True
        at = address.rfind("@")
        local = (address[:at] if at >= 0 else address).lower()
        if local == "postmaster":  # RFC 5321 section 4.5.1: always accepted
            return True
        names = [address.lower(), local]
        if delimiter:
            cut = min((i for i in (local.find(c) for c in delimiter) if i > 0), default=-1)
            if cut > 0:
                names.append(local[:cut])
        if self.unavailable:
            with self._lock:  # session threads (transports.smtpd): one retries
                for bare in list(self.unavailable):  # restored since?
                    self._open(bare)
        for name in names:
            if any(t.lookup(name) is not None for t in self.tables):
                return True
        if self.passwd:
            for name in names[1:]:
                try:
                    pwd.getpwnam(name)
                    return True
                except KeyError:
                    continue
        return None if self.unavailable else False


class LazyResolver:
    """dnspython's asyncio resolver, made at the first lookup.

    ``dns.asyncresolver.Resolver()`` reads ``path`` (/etc/resolv.conf) when it is made,
    and the smtpd makes its resolver before the jail (the chroot has no resolv.conf).
    This reads the file there and then, as the Resolver would (raising
    NoResolverConfiguration when it cannot be opened, as dnspython does), and makes
    the Resolver from that text only when a session first needs DNS: a client other
    than 127.0.0.1/::1 with smtpd_peername_lookup, or reject_unknown_*_domain.
    Making it at start cost every smtpd process about 0.4 MiB of pages of its own
    (issue 8, scenario M), also the many whose sessions never ask DNS. The text is
    parsed once, at that first lookup. A file without a nameserver, or one dnspython
    cannot parse (``nameserver garbage``: its ValueError, which escaped lookup_name's
    "never raises" and ended the session; a bad ``search`` name), is "no resolver" for
    the life of the process: one warning (``warning: <path>: <reason>: no DNS
    resolver``) at that first lookup, then every lookup raises NoResolverConfiguration,
    a DNSException, at once - nothing parsed again - and the callers answer as without
    a resolver (``unknown``, DNS could not tell). Bytes that are not UTF-8 are read as
    U+FFFD (glibc reads bytes; dnspython's open() would raise). Nothing is imported at
    the first lookup (dns.asyncresolver is, at start)."""

    def __init__(self, path: str = "/etc/resolv.conf") -> None:
        try:  # os.read, not open(): no file objects made (and their pages written)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                chunks = []
                while chunk := os.read(fd, 65536):
                    chunks.append(chunk)
            finally:
                os.close(fd)
        except OSError:
            raise dns.resolver.NoResolverConfiguration(  # type: ignore[no-untyped-call]
                f"cannot open {path}") from None
        self.path = path
        # bytes that are not UTF-8 (a Latin-1 comment) are replaced, not a
        # UnicodeDecodeError that killed the smtpd at start: glibc reads bytes
        self._conf: str | None = b"".join(chunks).decode("utf-8", "replace")
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._broken: str | None = None  # why the text made no resolver (parsed once)
        self._lock = threading.Lock()

    def resolver(self) -> dns.asyncresolver.Resolver:
        """The Resolver, made now if it was not (NoResolverConfiguration: no nameserver,
        or a file dnspython cannot parse - decided at the first call, for good)."""
        if self._resolver is not None:
            return self._resolver
        with self._lock:  # session threads: the text is parsed by one of them
            return self._make()

    def _make(self) -> dns.asyncresolver.Resolver:
        if self._resolver is not None:
            return self._resolver
        if self._conf is not None:  # the first call: parse the text, once
            conf, self._conf = self._conf, None
            made = dns.asyncresolver.Resolver(configure=False)
            try:
                made.read_resolv_conf(io.StringIO(conf, newline=None))  # as open()
            except (ValueError, dns.exception.DNSException) as exc:
                # "nameserver garbage" (dnspython's ValueError), no nameserver at all,
                # a bad search/domain name
                self._broken = str(exc).rstrip(".") or type(exc).__name__
                log.warning(f"{self.path}: {self._broken}: no DNS resolver")
            else:
                self._resolver = made
                return made
        raise dns.resolver.NoResolverConfiguration(  # type: ignore[no-untyped-call]
            self._broken)

    async def resolve(self, *args: object, **kwargs: object) -> dns.resolver.Answer:
        """``dns.asyncresolver.Resolver.resolve``."""
        return await self.resolver().resolve(*args, **kwargs)  # type: ignore[arg-type]


class Policy:
    """Relay control and restriction lists for one smtpd process (module docstring).

    Raises:
        PolicyError: an open-relay configuration (neither smtpd_relay_restrictions nor
            smtpd_recipient_restrictions holds a guard: master.config.relayguard) or a
            table that cannot be opened.
    """

    def __init__(self, cfg: Config,
                 resolver: dns.asyncresolver.Resolver | LazyResolver | None = None) -> None:
        parents = set(cfg.get_list("parent_domain_matches_subdomains"))

        def nets(param: str) -> NetList:
            return NetList(cfg.get_list(param), param, param in parents)

        def domains(param: str) -> DomainList:
            return DomainList(cfg.get_list(param), param, param in parents)

        self.mynetworks = nets("mynetworks")
        self.exceptions = nets("smtpd_client_event_limit_exceptions")
        # Postfix matches it with mynetworks's parent-domain style
        self.bare_newline_exclusions = NetList(
            cfg.get_list("smtpd_forbid_bare_newline_exclusions"),
            "smtpd_forbid_bare_newline_exclusions", "mynetworks" in parents)
        self.local = domains("mydestination")
        self.final = [self.local, domains("virtual_alias_domains"),
                      domains("virtual_mailbox_domains")]
        self.relay = domains("relay_domains")
        self.allow_untrusted = cfg.get_bool("allow_untrusted_routing")
        self.percent_hack = cfg.get_bool("allow_percent_hack")
        self.bang_path = cfg.get_bool("swap_bangpath")
        self.relay_code = cfg.get_int("relay_domains_reject_code")
        self.fqdn_code = cfg.get_int("non_fqdn_reject_code")
        self.unknown_code = cfg.get_int("unknown_address_reject_code")
        self.peername_lookup = cfg.get_bool("smtpd_peername_lookup")
        self.lists = [(name, [r.lower() for r in cfg.get_list(name)]) for name in (
            "smtpd_client_restrictions", "smtpd_helo_restrictions",
            "smtpd_sender_restrictions", "smtpd_relay_restrictions",
            "smtpd_recipient_restrictions")]
        problem = open_relay_problem(cfg)  # the start/reload check's own test
        if problem is not None:
            raise PolicyError(problem)
        self.resolver = resolver
        self.local_recipients = LocalRecipients(cfg.get_list("local_recipient_maps"),
                                                cfg.get_list("alias_maps"))
        self.delimiter = cfg.get("recipient_delimiter")

    # ------------------------------------------------------------------ questions
    def is_mynetworks(self, addr: str) -> bool:
        return self.mynetworks.match(addr)

    def limit_exempt(self, addr: str) -> bool:
        """True for clients excluded from the connection count limit."""
        return self.exceptions.match(addr)

    def bare_newline_exempt(self, addr: str) -> bool:
        """True for clients in smtpd_forbid_bare_newline_exclusions (default
        $mynetworks): they get smtpd_forbid_bare_newline = no, as in Postfix."""
        return self.bare_newline_exclusions.match(addr)

    def _final(self, domain: str) -> bool:
        return not domain or any(d.match(domain) for d in self.final)

    def _routed(self, address: str) -> bool:
        local = address[: address.rfind("@")] if "@" in address else address
        return ("@" in local or (self.percent_hack and "%" in local)
                or (self.bang_path and "!" in local) or address.startswith("@"))

    def auth_destination(self, rcpt: str) -> bool:
        """Postfix permit_auth_destination: a final or relay destination, without
        untrusted sender-specified routing."""
        domain = domain_of(rcpt)
        if not (self._final(domain) or self.relay.match(domain)):
            return False
        return self.allow_untrusted or not self._routed(rcpt)

    async def _mailhost(self, domain: str) -> str:
        """Postfix's reject_unknown_mailhost() lookup of ``domain``: MX, then A, then
        AAAA, stopping at the first answer. Returns "ok" (a record), "nullmx" (the MX
        answer holds a record whose exchange is the root: RFC 7505, as Postfix's
        dns_lookup, which stops there), "notfound" (no record, or NXDOMAIN) or "retry"
        (no resolver, timeout, server failure)."""
        if self.resolver is None:
            return "retry"
        try:
            for rtype in ("MX", "A", "AAAA"):
                try:
                    answer = await self.resolver.resolve(domain, rtype,
                                                         lifetime=_LOOKUP_LIFETIME)
                except dns.resolver.NoAnswer:
                    continue
                if rtype == "MX" and any(_is_null_mx(rr) for rr in answer):
                    return "nullmx"
                return "ok"
            return "notfound"
        except dns.resolver.NXDOMAIN:
            return "notfound"
        except dns.exception.DNSException:
            return "retry"

    async def _unknown_address(self, address: str, sender: bool) -> str:
        """Postfix's reject_unknown_address() for reject_unknown_sender_domain
        (``sender``) and reject_unknown_recipient_domain: "dunno" or the reply.

        Skipped, as Postfix, for final destinations (RESOLVE_CLASS_FINAL: local,
        virtual alias, virtual mailbox; a relay_domains domain is looked up like any
        other), address literals and addresses without a domain. A domain without MX
        or A/AAAA: ``$unknown_address_reject_code`` (450) 4.1.8 (sender) / 4.1.2
        (recipient) "Domain not found"; DNS could not tell: 450 with that code; a null
        MX (Postfix 3.0+, RFC 7505 section 4.2): a fixed 550 5.7.27 for the sender,
        556 5.1.10 for the recipient, "Domain D does not accept mail (nullMX)"."""
        domain = domain_of(address)
        if not domain or self._final(domain) or domain.startswith("["):
            return "dunno"
        found = await self._mailhost(domain)
        if found == "ok":
            return "dunno"
        what, dsn = ("Sender", "4.1.8") if sender else ("Recipient", "4.1.2")
        if found == "nullmx":
            code, dsn = (550, "4.7.27") if sender else (556, "4.1.10")
            return self._reply(code, dsn, f"<{address}>: {what} address rejected: "
                               f"Domain {domain} does not accept mail (nullMX)")
        if found == "retry":
            log.warning(f"{domain}: domain lookup failed: {what.lower()} <{address}> "
                        "deferred")
            return self._reply(450, dsn, f"<{address}>: {what} address rejected: "
                               "Domain not found")
        return self._reply(self.unknown_code, dsn, f"<{address}>: {what} address "
                           "rejected: Domain not found")

    # ------------------------------------------------------------------ restrictions
    @staticmethod
    def _reply(code: int, dsn: str, text: str) -> str:
        return f"{code} {str(code)[0]}{dsn[1:]} {text}"

    async def _apply(self, name: str, client: ClientInfo, sender: str,
                     rcpt: str) -> str | None:
        """One restriction: "permit", "dunno" or a reply line (a rejection)."""
        if name in ("permit", "dunno"):
            return name
        if name == "reject":
            return self._reply(554, "5.7.1", f"<{rcpt}>: Recipient address rejected: "
                               "Access denied")
        if name in ("defer", "defer_if_permit"):
            return self._reply(450, "4.7.1", f"<{rcpt}>: Recipient address rejected: "
                               "Access denied")
        if name == "permit_mynetworks":
            return "permit" if self.is_mynetworks(client.addr) else "dunno"
        if name == "permit_sasl_authenticated":
            return "dunno"  # no SASL: nobody is ever authenticated
        if name == "permit_auth_destination":
            return "permit" if self.auth_destination(rcpt) else "dunno"
        if name in ("reject_unauth_destination", "defer_unauth_destination"):
            if self.auth_destination(rcpt):
                return "dunno"
            code = self.relay_code - (100 if name.startswith("defer") else 0)
            return self._reply(code, "5.7.1", f"<{rcpt}>: Relay access denied")
        if name == "reject_non_fqdn_recipient":
            domain = domain_of(rcpt)
            if domain and is_fqdn(domain):
                return "dunno"
            return self._reply(self.fqdn_code, "5.5.2", f"<{rcpt}>: Recipient address "
                               "rejected: need fully-qualified address")
        if name == "reject_non_fqdn_sender":
            domain = domain_of(sender)
            if not sender or (domain and is_fqdn(domain)):
                return "dunno"
            return self._reply(self.fqdn_code, "5.5.2", f"<{sender}>: Sender address "
                               "rejected: need fully-qualified address")
        if name == "reject_unknown_recipient_domain":
            return await self._unknown_address(rcpt, sender=False)
        if name == "reject_unknown_sender_domain":
            if not sender:  # the null sender is never looked up
                return "dunno"
            return await self._unknown_address(sender, sender=True)
        log.warning(f'unknown smtpd restriction: "{name}"')
        return "451 4.3.5 Server configuration error"

    async def check_rcpt(self, client: ClientInfo, helo: str, sender: str,
                         rcpt: str) -> str | None:
        """Evaluate every restriction list for one recipient; the rejection reply, or
        None when the recipient is accepted."""
        for _list_name, restrictions in self.lists:
            for name in restrictions:
                result = await self._apply(name, client, sender, rcpt)
                if result == "permit":
                    break
                if result != "dunno":
                    return result
        if rcpt and self.local.match(domain_of(rcpt)):
            known = self.local_recipients.known(rcpt, self.delimiter)
            if known is None:  # a table cannot be read: Postfix's reject_dict_retry
                return self._reply(451, "4.3.0", f"<{rcpt}>: Temporary lookup failure")
            if not known:
                return self._reply(550, "5.1.1", f"<{rcpt}>: Recipient address rejected: "
                                                "User unknown in local recipient table")
        return None

    # ------------------------------------------------------------------ client name
    async def lookup_name(self, addr: str) -> str:
        """The client's verified host name, ``localhost`` for 127.0.0.1 and ::1, else
        ``unknown`` (module docstring). Never raises."""
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return "unknown"
        if ip in _LOCALHOST:
            return "localhost"
        if not self.peername_lookup or self.resolver is None:
            return "unknown"
        try:
            ptr = await self.resolver.resolve(dns.reversename.from_address(addr), "PTR",
                                              lifetime=_LOOKUP_LIFETIME)
            name = str(ptr[0]).rstrip(".")
            rtype = "AAAA" if ip.version == 6 else "A"
            answer = await self.resolver.resolve(name, rtype, lifetime=_LOOKUP_LIFETIME)
        except dns.exception.DNSException:
            return "unknown"
        if any(ipaddress.ip_address(str(r)) == ip for r in answer):
            return name
        return "unknown"


def _is_null_mx(rr: object) -> bool:
    """True for an MX record whose exchange is the root (".", RFC 7505's null MX): a
    dnspython MX rdata, or its text form "PREF EXCHANGE"."""
    exchange = getattr(rr, "exchange", None)
    text = str(exchange) if exchange is not None else (str(rr).split() or [""])[-1]
    return text == "."


_FLOCK = struct.Struct("hhqqi")  # struct flock: l_type, l_whence, l_start, l_len, l_pid
_STRIDE = 1024                   # lock bytes per client address bucket (the count's cap)
# Buckets: 2**40 of them, from a hash keyed with the file's first _KEY_SIZE bytes (random,
# written by the first process that opens the file), so that no two client addresses
# share a count by accident and no client can pick an address that shares a victim's.
# With 65,536 buckets of an unkeyed crc32, a client that had never connected was refused
# ("too many connections") while another address of its bucket held the limit. Locks
# need no data: the offsets (up to 2**50) lie far beyond the end of the file.
_BUCKETS = 1 << 40
_KEY_SIZE = 16
_FIRST = _STRIDE                 # the key's lock and bytes come before the first bucket


class ConnectionCounter:
    """Concurrent sessions per client address across every smtpd process (Postfix asks
    its anvil(8) service; here a shared file does it, without a service).

    Each counted session holds an open-file-description lock (Linux F_OFD_SETLK) on one
    byte of ``path``: the bytes ``bucket * 1024 ...`` of the client address's bucket (a
    hash of the address keyed with the file's first 16 bytes, 2**40 buckets: no two
    clients share a count, by accident or by a choice of address). A session takes the
    first byte that no one holds; when the first ``limit`` bytes are all held, the client already has
    ``limit`` sessions. Locks vanish with the process that held them, so a crashed
    smtpd leaves no stale count. The file is opened once, before the jail; without it
    (``path`` None, no F_OFD_SETLK, or an open error: a warning) sessions are counted in
    this process only.
    """

    def __init__(self, path: str | None) -> None:
        self.fd = -1
        self._held: set[int] = set()
        self._local: dict[str, int] = {}
        self._slot_addr: dict[int, str] = {}
        self._next_local = -1
        self._mutex = threading.Lock()  # the held set and local counts, per process
        if path is None or not hasattr(fcntl, "F_OFD_SETLK"):
            return
        self._key = b""
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._key = self._read_key()
        except OSError as exc:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            log.warning(f"open {path}: {exc.strerror}: client connection counts are per "
                        "smtpd process")

    def _read_key(self) -> bytes:
        """The hash key at the start of the file; the first process to find none writes
        it (under a lock on the key's bytes, so that all agree on one)."""
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW,
                    _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, _KEY_SIZE, 0))
        try:
            key = os.pread(self.fd, _KEY_SIZE, 0)
            if len(key) < _KEY_SIZE:
                key = os.urandom(_KEY_SIZE)
                if os.pwrite(self.fd, key, 0) != _KEY_SIZE:
                    raise OSError(5, "short write of the hash key")
            return key
        finally:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK,
                        _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, _KEY_SIZE, 0))

    def _lock(self, offset: int, kind: int) -> bool:
        arg = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, arg)
        except OSError:
            return False
        return True

    def acquire(self, addr: str, limit: int) -> tuple[int, int | None]:
        """Count a new session of ``addr``: (its number among the client's sessions,
        capped at ``limit + 1``; a slot for release(), None when over the limit). Safe
        from several threads (an smtpd's session threads)."""
        with self._mutex:
            return self._acquire(addr, limit)

    def release(self, slot: int | None) -> None:
        """The session that got ``slot`` has ended (None: nothing to release)."""
        if slot is not None:
            with self._mutex:
                self._release(slot)

    def _acquire(self, addr: str, limit: int) -> tuple[int, int | None]:
        if self.fd < 0:
            count = self._local.get(addr, 0) + 1
            if count > limit:
                return count, None
            self._local[addr] = count
            slot = self._next_local
            self._next_local -= 1
            self._slot_addr[slot] = addr
            return count, slot
        digest = hashlib.blake2b(addr.encode(), digest_size=8, key=self._key).digest()
        base = _FIRST + int.from_bytes(digest, "big") % _BUCKETS * _STRIDE
        for i in range(min(limit, _STRIDE)):
            offset = base + i
            if offset not in self._held and self._lock(offset, fcntl.F_WRLCK):
                self._held.add(offset)
                return i + 1, offset
        return limit + 1, None

    def _release(self, slot: int) -> None:
        if slot < 0:
            addr = self._slot_addr.pop(slot, "")
            left = self._local.get(addr, 1) - 1
            if left > 0:
                self._local[addr] = left
            else:
                self._local.pop(addr, None)
            return
        self._held.discard(slot)
        self._lock(slot, fcntl.F_UNLCK)
