"""resolve — map a recipient address to (transport, nexthop), as trivial-rewrite(8) does.

Summary
    The qmgr resolves every recipient before it is scheduled (postfix.md §6.2). qmgrd does
    this in-process (no rewrite service round trip per recipient):

    1. Domain class: a recipient without a domain, or whose domain is in
       ``mydestination``, is *local*: ``local_transport`` (``local:$myhostname``).
       A domain in ``relay_domains`` is *relay*: ``relay_transport``. Anything else is
       *default*: ``default_transport``. For relay/default the nexthop is ``relayhost``
       when set, else the recipient domain.
    2. ``name:dest`` in a transport setting: a non-empty dest replaces the nexthop.
    3. ``transport_maps`` override: keys tried ``user+ext@domain``, ``user@domain``,
       ``domain``, then ``.parent`` domains, then ``*``. A value ``transport:nexthop``; an
       empty transport keeps the current one; an empty nexthop with a new transport resets
       the nexthop to the recipient domain.
    4. Bad syntax -> transport ``error`` with nexthop ``5.1.3 bad address syntax``;
       ``allow_min_user = no`` rejects a local part starting with ``-``.

Public API
    Resolved(transport, nexthop, address, local: bool)
    Resolver(cfg).resolve(address) -> Resolved
    Resolver.tables_changed(settle=0.0) -> bool (the qmgr restarts itself to re-read
        changed maps; ``settle``: seconds the file must have been left alone)
Raises:
    maps.TableError from the constructor when a transport map cannot be opened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from master.config import Config
from qmgrd.maps import Table, open_tables

__all__ = ["Resolved", "Resolver"]


@dataclass(frozen=True)
class Resolved:
    """The routing decision for one recipient."""

    transport: str
    nexthop: str
    address: str
    local: bool = False


def _split_transport(value: str) -> tuple[str, str]:
    name, _, dest = value.partition(":")
    return name.strip(), dest.strip()


class Resolver:
    """Recipient routing per main.cf (see module docstring)."""

    def __init__(self, cfg: Config):
        self.myhostname = cfg.get("myhostname").lower()
        self.mydestination = {d.lower() for d in cfg.get_list("mydestination")}
        self.relay_domains = {d.lower() for d in cfg.get_list("relay_domains")}
        self.local_transport = cfg.get("local_transport")
        self.default_transport = cfg.get("default_transport")
        self.relay_transport = cfg.get("relay_transport")
        self.relayhost = cfg.get("relayhost").strip()
        self.delimiter = cfg.get("recipient_delimiter")
        self.allow_min_user = cfg.get_bool("allow_min_user")
        self.transport_maps: list[Table] = open_tables(cfg.get_list("transport_maps"))

    def tables_changed(self, settle: float = 0.0) -> bool:
        """True when a transport map file changed since it was read and was then left
        alone for ``settle`` seconds. The qmgr's own periodic check passes
        qmgrd.maps.SETTLE_TIME: it restarts to read the file, and a restart while
        ``cat new > transport`` is under way would route with half a table until the
        next change (Postfix's qmgr never sees that: postmap builds the .db). An
        administrator's request (``qmgr-ctl flush``: the edit is done) passes 0."""
        return self.changed_table(settle) is not None

    def changed_table(self, settle: float = 0.0) -> str | None:
        """The ``type:name`` of the first transport map that changed as
        :meth:`tables_changed` says, or None (Postfix logs it: ``table <name> has
        changed -- restarting``)."""
        now = time.time()
        for t in self.transport_maps:
            if t.changed() and (settle <= 0 or t.settled(settle, now)):
                return t.spec
        return None

    def is_local_domain(self, domain: str) -> bool:
        """True for ``mydestination`` domains (and no domain at all)."""
        return not domain or domain.lower() in self.mydestination

    def _map_lookup(self, address: str, local: str, domain: str) -> str | None:
        if not self.transport_maps:
            return None
        keys: list[str] = [address]
        if self.delimiter:
            for ch in self.delimiter:
                if ch in local:
                    keys.append(local.split(ch, 1)[0] + "@" + domain)
                    break
        keys.append(domain)
        parts = domain.split(".")
        keys += ["." + ".".join(parts[i:]) for i in range(1, len(parts))]
        keys.append("*")
        for key in keys:
            for table in self.transport_maps:
                value = table.lookup(key)
                if value is not None:
                    return value
        return None

    def resolve(self, address: str) -> Resolved:
        """Resolve one recipient address (the envelope form, without brackets)."""
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        domain = domain.lower().rstrip(".")
        bad = (
            not address
            or (at and not domain)
            or (at and not local)
            or any(c in address for c in "\r\n\0<>")
            or (not self.allow_min_user and local.startswith("-"))
        )
        if bad:
            return Resolved("error", "5.1.3 bad address syntax", address)
        full = f"{local}@{domain}" if domain else f"{local}@{self.myhostname}"
        if self.is_local_domain(domain):
            transport, dest = _split_transport(self.local_transport)
            nexthop = dest or domain or self.myhostname
            is_local = True
        else:
            is_local = False
            if domain in self.relay_domains:
                transport, dest = _split_transport(self.relay_transport)
            else:
                transport, dest = _split_transport(self.default_transport)
            nexthop = dest or self.relayhost or domain
        override = self._map_lookup(full.lower(), local.lower(), domain or self.myhostname)
        if override is not None and override.strip() not in ("", ":"):
            new_t, sep, new_n = override.strip().partition(":")
            if new_t:
                transport = new_t
                nexthop = new_n or domain or self.myhostname
            elif sep and new_n:
                nexthop = new_n
        return Resolved(transport, nexthop, full, is_local)
