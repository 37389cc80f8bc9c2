"""master.config.nexthop - the syntax of an smtp destination (relayhost, transport:nexthop).

SYNOPSIS
    from master.config.nexthop import Nexthop, NexthopError, parse_nexthop, nexthop_problem
    parse_nexthop("[mail.example]:587")  # -> [Nexthop("mail.example", 587, mx=False)]
    parse_nexthop("a.example, b.example:2525")   # a list, tried in order
    nexthop_problem("[relay.example]:99999")
        # -> 'bad port number "99999" (1-65535)'

DESCRIPTION
    The one parser of smtp destinations, shared by the smtp client (transports.smtp_dns,
    at each delivery) and the configuration check (Config.check for relayhost;
    master.config.validate for the nexthop of default_transport and relay_transport
    when that transport is an smtp service), so that what the check accepts is exactly
    what the client can use.  The forms are Postfix's (smtp(8) "SMTP DESTINATION
    SYNTAX", postfix.md 6.3; the parsing of Postfix's host_port()):

    * ``domain``, ``domain:port`` - MX lookup;
    * ``[host]``, ``[host]:port`` - no MX lookup; an IP address in brackets
      (``[192.0.2.1]``, ``[::1]``, ``[ipv6:2001:db8::1]``) needs no lookup at all;
    * ``host:`` and ``[host]:`` - the default port, as Postfix;
    * a list of those separated by commas and/or white space (Postfix >= 3.5), tried in
      order.

    Outside brackets the port is what follows the last ``:`` (so a bare IPv6 address
    is refused: it must be in brackets, as in Postfix).  A port is a decimal number
    1-65535 or a service name (smtp, submission, lmtp, else /etc/services).  A host is
    an IP address or a host name: labels of letters, digits, ``-`` and ``_`` (and
    non-ASCII letters: internationalised names) separated by single dots, an optional
    final dot.

    Errors (Postfix's host_port() and smtp client wording where there is one): ``empty
    destination``, ``missing "]"``, ``garbage after "]"``, ``malformed IPv6 address``,
    ``missing host information``, ``valid hostname or network address required``,
    ``garbage after numerical service``, ``bad port number "99999" (1-65535)``,
    ``unknown service "x"``.

PUBLIC API
    Nexthop(host, port, mx)     frozen dataclass; .literal: host is an IP address
    NexthopError(ValueError)    .reason (str), .item (the list element at fault);
                                str: ``<reason> in "<item>"``
    parse_nexthop(text, default_port=25) -> list[Nexthop]    raises NexthopError
    nexthop_problem(text) -> str | None   why ``text`` is not a valid destination (the
                                reason, plus ``in "<item>"`` for an element of a list),
                                or None
    is_ip_address(host) -> bool  an IPv4/IPv6 address literal (no brackets)

Nothing is logged here.  Looking a service name up reads /etc/services (before any
chroot in the processes that parse destinations: the master and the smtp client, which
is not chrooted; smtp, submission and lmtp need no lookup).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

__all__ = ["Nexthop", "NexthopError", "is_ip_address", "nexthop_problem", "parse_nexthop"]

_SERVICES = {"smtp": 25, "submission": 587, "lmtp": 24}
_SEPARATORS = re.compile(r"[\s,]+")
# a host name label: letters, digits, "-", "_", non-ASCII (IDN); Postfix valid_hostname
# is stricter (no "-" at a label's ends, no final dot) but the client can use these
_LABEL = r"(?:[A-Za-z0-9_-]|[^\x00-\x7f])+"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_MAX_HOSTNAME = 255


@dataclass(frozen=True)
class Nexthop:
    """One destination: ``host`` (name or IP), TCP ``port``, ``mx`` = look up MX records."""

    host: str
    port: int
    mx: bool

    @property
    def literal(self) -> bool:
        """True when ``host`` is an IP address: resolving it needs no lookup."""
        return is_ip_address(self.host)


class NexthopError(ValueError):
    """A destination that is not valid: ``reason`` and the list element ``item``."""

    def __init__(self, reason: str, item: str) -> None:
        self.reason = reason
        self.item = item
        super().__init__(f'{reason} in "{item}"')


def is_ip_address(host: str) -> bool:
    """True when ``host`` is an IPv4 or IPv6 address literal (no brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _port(text: str, item: str) -> int:
    """The port of ``text`` (a number or a service name).  Raises NexthopError."""
    if text.isascii() and text.isdigit():
        port = int(text)
        if not 0 < port < 65536:
            raise NexthopError(f'bad port number "{text}" (1-65535)', item)
        return port
    if text[:1].isdigit():
        raise NexthopError("garbage after numerical service", item)
    if text.lower() in _SERVICES:
        return _SERVICES[text.lower()]
    try:
        return socket.getservbyname(text, "tcp")
    except (OSError, UnicodeError):
        raise NexthopError(f'unknown service "{text}"', item) from None


def _parse_one(item: str, default_port: int) -> Nexthop:
    """One list element (module docstring).  Raises NexthopError."""
    if item.startswith("["):
        end = item.find("]")
        if end < 0:
            raise NexthopError('missing "]"', item)
        host, rest = item[1:end], item[end + 1:]
        if rest and not rest.startswith(":"):
            raise NexthopError('garbage after "]"', item)
        port = rest[1:]
        if host[:5].lower() == "ipv6:":
            host = host[5:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise NexthopError("malformed IPv6 address", item) from None
        mx = False
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        mx = True
    if not host:
        raise NexthopError("missing host information", item)
    if is_ip_address(host):
        mx = False
    elif len(host) > _MAX_HOSTNAME or not _HOSTNAME.fullmatch(host):
        raise NexthopError("valid hostname or network address required", item)
    return Nexthop(host, _port(port, item) if port else default_port, mx)


def parse_nexthop(text: str, default_port: int = 25) -> list[Nexthop]:
    """The destinations of ``text``, in order (module docstring); ``default_port`` for
    an element without a port.

    Raises:
        NexthopError (a ValueError): ``text`` is empty, or an element is not valid.
    """
    items = [item for item in _SEPARATORS.split(text.strip()) if item]
    if not items:
        raise NexthopError("empty destination", text)
    return [_parse_one(item, default_port) for item in items]


def nexthop_problem(text: str) -> str | None:
    """Why ``text`` is not a valid smtp destination, or None when it is.  The reason
    alone when ``text`` is one element, else ``<reason> in "<element>"``."""
    try:
        parse_nexthop(text)
    except NexthopError as exc:
        return exc.reason if exc.item == text.strip() else str(exc)
    return None
