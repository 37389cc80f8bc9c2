"""local_alias — alias_maps expansion for the local(8) agent (Postfix local/alias.c).

Summary
    Before a local recipient's mailbox delivery, its local part (lower-cased) is looked
    up in ``alias_maps`` (qmgrd.maps.AliasMaps: aliases(5) ``name: value`` syntax, read
    from the source file; a bad line is a warning and skipped; a table type qmgrd
    cannot read, e.g. ``nis:``, is logged once and matches nothing): first the whole
    local part, then, with ``recipient_delimiter`` set, the name without its extension
    (``bob+news`` then ``bob``). No match: the recipient is delivered to its own
    mailbox as before. A table file that cannot be read (missing, unreadable) defers
    the recipient, ``4.3.0 alias database unavailable``, as Postfix's local(8) does:
    neither a bounce nor a delivery to the mailbox of the unexpanded name. The same
    for a target whose own lookup fails (the other targets are delivered).

    A match is split into targets at commas and white space (double quotes group, and
    a ``|command`` runs to the next comma). Each target is

    * a local name (no ``@``, or ``@`` a domain of ``mydestination``): looked up in
      ``alias_maps`` again (recursively) and, without an alias of its own, delivered to
      its mailbox in this same delivery, with ``Delivered-To: <name@domain>`` (a bare
      name gets ``@$myorigin``). A name that expands to itself (``root: root, other``)
      is delivered to its own mailbox, as Postfix does. A name already expanded higher
      up the chain (``a: b``, ``b: a``) and a mailbox already delivered to for this
      recipient are skipped (Postfix's duplicate filter). More than 100 levels of
      expansion: 5.4.6.
    * a remote address: deferred ``4.3.0 alias forwarding to remote addresses is not
      implemented`` (Postfix submits a new message through cleanup).
    * ``|command``, ``/file`` or ``:include:/file``: bounced ``5.7.1 ... is not
      implemented`` (Postfix runs them with the alias owner's rights; qmgrd never runs
      a command or writes an arbitrary file for an alias).

    The recipient gets one status for its whole expansion: deferred when any target was
    deferred (so on the retry the targets already delivered get the message again, as
    with Postfix), else bounced when any target bounced (the reason names the target),
    else the first delivery's ``delivered to maildir``/``mailbox``. An expansion that
    delivers to nothing (only skipped names) bounces ``5.4.6 mail forwarding loop``.

Public API
    AliasExpander(maps, delimiter, mydestination, myorigin)
    AliasExpander.expand(address, deliver) -> Dsn | None
        None: no alias for ``address``; ``deliver(address) -> Dsn`` delivers one local
        target to its mailbox (no alias lookup).
    split_targets(value) -> list[str]
"""

from __future__ import annotations

from collections.abc import Callable

from qmgrd.maps import AliasMaps, TableUnavailable
from transports.agent import Dsn, make_dsn

__all__ = ["AliasExpander", "split_targets"]

MAX_DEPTH = 100
UNAVAILABLE = ("4.3.0", "alias database unavailable")  # Postfix local/alias.c


def split_targets(value: str) -> list[str]:
    """The targets of an alias value: separated by commas and white space, ``"..."``
    grouping (quotes removed), a ``|command`` running to the next comma."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    command = False
    for ch in value:
        if quoted:
            if ch == '"':
                quoted = False
            else:
                cur.append(ch)
            continue
        if ch == '"':
            quoted = True
            continue
        if not cur and ch == "|":
            command = True
        if ch == "," or (ch in " \t" and not command):
            if cur:
                out.append("".join(cur).strip())
            cur, command = [], False
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur).strip())
    return [t for t in out if t]


class AliasExpander:
    """alias_maps expansion (module docstring)."""

    def __init__(self, maps: AliasMaps, delimiter: str, mydestination: list[str],
                 myorigin: str) -> None:
        self.maps = maps
        self.delimiter = delimiter
        self.mydestination = {d.lower() for d in mydestination}
        self.myorigin = myorigin

    def _find(self, local: str) -> tuple[str, str] | None:
        """(name, value) of the first alias of ``local`` (whole, then without the
        extension), None when there is none.

        Raises:
            TableUnavailable: an alias table cannot be read (AliasMaps.lookup).
        """
        names = [local]
        if self.delimiter:
            cut = min((i for i in (local.find(c) for c in self.delimiter) if i > 0),
                      default=-1)
            if cut > 0:
                names.append(local[:cut])
        for name in names:
            value = self.maps.lookup(name)
            if value is not None:
                return name, value
        return None

    def expand(self, address: str, deliver: Callable[[str], Dsn]) -> Dsn | None:
        """Expand ``address`` (a local recipient); None when it has no alias."""
        if not self.maps:
            return None
        at = address.rfind("@")
        try:
            found = self._find((address[:at] if at >= 0 else address).lower())
        except TableUnavailable:  # logged by AliasMaps
            return make_dsn(*UNAVAILABLE)
        if found is None:
            return None
        results: list[tuple[str, Dsn]] = []
        done: set[str] = set()
        self._expand(found[0], found[1], [found[0]], deliver, results, done)
        if not results:
            return make_dsn("5.4.6", f"mail forwarding loop for {address}")
        for digit in ("4", "5"):
            for target, dsn in results:
                if dsn.status.startswith(digit):
                    return make_dsn(dsn.status, f"{target}: {dsn.reason}")
        return results[0][1]

    def _expand(self, name: str, value: str, chain: list[str],
                deliver: Callable[[str], Dsn], results: list[tuple[str, Dsn]],
                done: set[str]) -> None:
        for target in split_targets(value):
            low = target.lower()
            if target.startswith("|"):
                results.append((target, make_dsn(
                    "5.7.1", "alias delivery to a command is not implemented")))
                continue
            if low.startswith(":include:"):
                results.append((target, make_dsn(
                    "5.7.1", "alias :include: files are not implemented")))
                continue
            if target.startswith("/"):
                results.append((target, make_dsn(
                    "5.7.1", "alias delivery to a file is not implemented")))
                continue
            at = target.rfind("@")
            domain = low[at + 1:] if at >= 0 else ""
            if at >= 0 and domain not in self.mydestination:
                results.append((target, make_dsn(
                    "4.3.0", "alias forwarding to remote addresses is not implemented")))
                continue
            local = low[:at] if at >= 0 else low
            address = target if at >= 0 else f"{target}@{self.myorigin}"
            try:
                sub = None if local == name else self._find(local)
            except TableUnavailable:
                results.append((address, make_dsn(*UNAVAILABLE)))
                continue
            if sub is not None and sub[0] in chain:
                continue  # being expanded higher up: Postfix's duplicate filter
            if sub is None:
                if local in done:
                    continue
                done.add(local)
                results.append((address, deliver(address)))
            elif len(chain) >= MAX_DEPTH:
                results.append((address, make_dsn(
                    "5.4.6", f"alias expansion of {chain[0]} exceeds {MAX_DEPTH} levels")))
            else:
                self._expand(sub[0], sub[1], [*chain, sub[0]], deliver, results, done)
