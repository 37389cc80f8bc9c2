"""master.config.netlist - the syntax of one network-list entry (mynetworks and friends).

SYNOPSIS
    from master.config.netlist import parse_network, is_table, network_problem
    parse_network("192.0.2.0/24")      # -> IPv4Network('192.0.2.0/24')
    parse_network("[::1]/128")         # -> IPv6Network('::1/128')
    parse_network("192.168.1.1/24")    # raises NetworkError (host bits set)
    network_problem("!10.0.0.0/8")     # -> None (valid)

DESCRIPTION
    The one parser of network-list entries, shared by the run-time matcher
    (transports.smtpd_policy.NetList) and the configuration check (Config.check, used by
    ``qmgr-master start``/``reload`` and ``qmgr-ctl config``), so that what the check
    accepts is exactly what smtpd can match.  An entry (after an optional ``!``) is:

    * a lookup table ``type:name`` of a type in TABLE_TYPES (checked elsewhere);
    * an IPv4 or IPv6 address or ``address/prefix`` network, IPv6 optionally in
      brackets (``[::1]``, ``[2001:db8::]/32``).

    Like Postfix (cidr_match), a prefix out of range or a bad address is an error, and so
    is a network with non-null host bits: ``non-null host address bits in
    "192.168.1.1/24", perhaps you should use "192.168.1.0/24" instead``.  Host names and
    ``/file`` patterns, which Postfix can match, are not supported by qmgrd and are
    errors too (otherwise the entry would be silently ignored).

PUBLIC API
    TABLE_TYPES: tuple[str, ...]     lookup table types a network list may name
    is_table(text) -> bool           ``text`` (no ``!``) names a table of TABLE_TYPES
    parse_network(text) -> IPv4Network | IPv6Network   ``text`` without ``!``, not a
                                     table; raises NetworkError (a ValueError) whose str
                                     is the reason
    network_problem(entry) -> str | None   why ``entry`` (``!`` and tables allowed) is
                                     not valid, or None
    NetworkError(ValueError)

Nothing is logged here.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["TABLE_TYPES", "NetworkError", "is_table", "network_problem", "parse_network"]

TABLE_TYPES: tuple[str, ...] = ("texthash", "hash", "btree", "lmdb", "cdb", "inline")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_ADDRESS_CHARS = re.compile(r"[0-9.]+|[0-9A-Fa-f.%]*:[0-9A-Fa-f:.%]*")   # looks like an address, not a name
_TYPE_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_-]*:(?!:)")


class NetworkError(ValueError):
    """A network-list entry that is not valid; ``str()`` is the reason."""


def is_table(text: str) -> bool:
    """True when ``text`` (without ``!``) is ``type:name`` with a type of TABLE_TYPES."""
    return text.partition(":")[0].lower() in TABLE_TYPES


def parse_network(text: str) -> Network:
    """The network ``text`` (an address or ``address/prefix``, IPv6 optionally in
    brackets; no ``!``, not a table) stands for; a bare address is a /32 or /128.
    Raises NetworkError with the reason (bad address, prefix out of range, host bits
    set with the network to use instead, host name, unsupported table type)."""
    bracketed = "[" in text
    spec = text.replace("[", "").replace("]", "")
    addr, slash, _ = spec.partition("/")
    try:
        return ipaddress.ip_network(spec, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            net = ipaddress.ip_network(spec, strict=False)
            good = (f"[{net.network_address}]/{net.prefixlen}" if bracketed
                    else str(net))
            raise NetworkError(f'non-null host address bits in "{text}", perhaps you '
                               f'should use "{good}" instead') from None
    if _TYPE_PREFIX.match(text) and not bracketed:
        kind = text.partition(":")[0]
        raise NetworkError(f'unsupported lookup table type "{kind}" in "{text}" '
                           f'(supported: {", ".join(TABLE_TYPES)})')
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        if not _ADDRESS_CHARS.fullmatch(addr):
            raise NetworkError(f'"{text}": host names and patterns are not supported '
                               "(only addresses, networks and tables)") from None
        raise NetworkError(f'bad address in "{text}"') from None
    if slash:
        raise NetworkError(f'bad net/mask pattern "{text}": bad prefix length')
    raise NetworkError(f'bad network "{text}"')   # pragma: no cover - defensive


def network_problem(entry: str) -> str | None:
    """Why the network-list ``entry`` (``!`` negation and tables allowed) is not valid,
    or None when it is (tables are not opened here)."""
    text = entry.removeprefix("!")
    if is_table(text):
        return None
    try:
        parse_network(text)
    except NetworkError as exc:
        return str(exc)
    return None
