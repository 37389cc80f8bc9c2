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
    * a remote address (``@`` a domain not in ``mydestination``): collected (each
      address once, any case); after the expansion all of them are sent on as ONE new
      message through cleanup (transports.local_forward: same sender, Delivered-To:
      the recipient), unless the recipient is deferred (then nothing is forwarded: the
      retry expands everything again, as Postfix's forward_finish() cancels the copy).
    * ``|command``, ``/file`` or ``:include:/file``: bounced ``5.7.1 ... is not
      implemented`` (Postfix runs them with the alias owner's rights; qmgrd never runs
      a command or writes an arbitrary file for an alias).

    The recipient gets one status for its whole expansion: deferred when any target was
    deferred (so on the retry the targets already delivered get the message again, as
    with Postfix), or when the forwarded copy could not be queued (``4.3.0 unable to
    forward message: ...``); else bounced when any target bounced (the reason names the
    target; the remote targets are still forwarded, as Postfix's are); else the first
    delivery's ``delivered to maildir``/``mailbox``, followed by ``; forwarded as
    <qid>`` when remote targets were forwarded too, or only ``forwarded as <qid>``
    (dsn 2.0.0, action relayed) when there was no local delivery. An expansion that
    delivers to nothing and forwards nothing (only skipped names) bounces ``5.4.6 mail
    forwarding loop``.

    DSN (RFC 3461 section 6.2.7.3, RFC 3464 action "expanded"; Postfix local/alias.c,
    deliver_alias()): a successful expansion - into any number of addresses, one
    included - is reported with action ``expanded`` (the maillog text stays the
    delivery's / forwarding's); the agent (transports.local) takes SUCCESS off the
    NOTIFY of what the alias expands to (the forwarded copy's recipients) and sends one
    success notice ``2.0.0 alias expanded`` for the recipient, as Postfix does for an
    alias whose envelope sender is not replaced.

    Not implemented: ``owner-`` aliases (the forwarded copy keeps the original sender),
    ``expand_owner_alias``, ``propagate_unmatched_extensions``, ``.forward`` files.

Public API
    AliasExpander(maps, delimiter, mydestination, myorigin)
    AliasExpander.expand(address, deliver, forward) -> Dsn | None
        None: no alias for ``address``; ``deliver(address) -> Dsn`` delivers one local
        target to its mailbox (no alias lookup); ``forward(targets) -> Dsn`` sends the
        remote targets on as one message (at most one call). A success has action
        ``expanded``.
    split_targets(value) -> list[str]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

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

    def expand(self, address: str, deliver: Callable[[str], Dsn],
               forward: Callable[[list[str]], Dsn]) -> Dsn | None:
        """Expand ``address`` (a local recipient); None when it has no alias.

        ``deliver(address)`` delivers one local target; ``forward(targets)`` sends the
        remote targets on as one new message (transports.local_forward), called once
        after the expansion unless a target was deferred. A success has action
        ``expanded`` (RFC 3464; Postfix reports every alias expansion so).
        """
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
        remote: list[str] = []
        self._expand(found[0], found[1], [found[0]], deliver, results, (set(), remote))
        if not results and not remote:
            return make_dsn("5.4.6", f"mail forwarding loop for {address}")
        deferred = _first(results, "4")
        if deferred is not None:
            return deferred  # no forwarded copy: the retry expands everything again
        forwarded = forward(remote) if remote else None
        if forwarded is not None and not forwarded.status.startswith("2"):
            return forwarded
        failed = _first(results, "5")
        if failed is not None:
            return failed
        done = _success(results, forwarded)
        return replace(done, action="expanded")

    def _expand(self, name: str, value: str, chain: list[str],
                deliver: Callable[[str], Dsn], results: list[tuple[str, Dsn]],
                seen: tuple[set[str], list[str]]) -> None:
        """Expand one alias value into ``results`` (local targets) and ``seen``: the
        mailboxes delivered to and the remote targets to forward to."""
        done, remote = seen
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
                if low not in (r.lower() for r in remote):  # Postfix's duplicate filter
                    remote.append(target)
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
                self._expand(sub[0], sub[1], [*chain, sub[0]], deliver, results, seen)


def _first(results: list[tuple[str, Dsn]], digit: str) -> Dsn | None:
    """The first result whose status starts with ``digit``, its reason naming the
    target; None when there is none."""
    for target, dsn in results:
        if dsn.status.startswith(digit):
            return make_dsn(dsn.status, f"{target}: {dsn.reason}")
    return None


def _success(results: list[tuple[str, Dsn]], forwarded: Dsn | None) -> Dsn:
    """The status of an expansion without failures: the first local delivery's, with
    ``; forwarded as <qid>`` when remote targets were forwarded too; the forwarding's
    alone (action relayed) when there was no local delivery."""
    if not results:
        assert forwarded is not None
        return forwarded
    first = results[0][1]
    if forwarded is None:
        return first
    return make_dsn(first.status, f"{first.reason}; {forwarded.reason}")
