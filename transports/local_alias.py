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

    A match is split into targets as Postfix's tok822_parse() reads an address list
    (split_targets): commas separate them, and so does white space between two words
    that no ``@`` or ``.`` joins (Postfix adds the missing commas: ``bob carol``); a
    ``(comment)`` is dropped (nested, ``\\`` escapes); of ``Phrase <addr>`` or
    ``<addr>`` only ``addr`` is a target; a ``"quoted string"`` is one word (quotes
    removed); a ``|command`` runs to the next comma. ``#`` after a value is no comment
    (aliases(5): only a line starting with ``#`` is). Each target is

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
    forwarding loop``. A value with no address at all (only a comment) is logged
    ``warning: no recipient in alias lookup result for <name>`` and deferred ``4.3.0
    alias database unavailable`` (Postfix local/alias.c, alias_count < 1). A target's
    domain loses one trailing dot before it is classified (``alice@localhost.`` is
    local), as Postfix's resolver does.

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

from master import log
from qmgrd.maps import AliasMaps, TableUnavailable
from transports.agent import Dsn, make_dsn

__all__ = ["AliasExpander", "split_targets"]

MAX_DEPTH = 100
UNAVAILABLE = ("4.3.0", "alias database unavailable")  # Postfix local/alias.c


def _skip_comment(value: str, i: int) -> int:
    """The index after the RFC 822 comment that starts at ``value[i]`` (``(``):
    comments nest, a backslash quotes the next character, an unterminated comment
    runs to the end (Postfix tok822_comment)."""
    depth = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def _quoted(value: str, i: int) -> tuple[str, int]:
    """The text of the quoted string that starts at ``value[i]`` (``"``), quotes and
    backslashes removed, and the index after it (unterminated: to the end)."""
    out: list[str] = []
    i += 1
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    return "".join(out), i


_SPECIAL = ' \t\r\n,()<>"'


def split_targets(value: str) -> list[str]:
    """The targets of an alias value, as Postfix's local(8) parses it (tok822_parse):

    * commas separate addresses; words with white space (or a comment) between them
      and no ``@`` or ``.`` operator joining them are separate addresses too
      (Postfix adds the missing commas: ``bob carol`` is bob and carol);
    * a ``(comment)`` belongs to no address and is dropped (comments nest, ``\\``
      quotes the next character);
    * in ``Phrase <addr>`` (and ``<addr>``) the address inside the angle brackets is
      the target, the phrase is dropped;
    * a ``"quoted string"`` is one word (quotes and backslashes removed), also next to
      other characters (``"a b"@x`` is ``a b@x``);
    * a word starting with ``|`` is a command running to the next comma (quotes
      removed), as qmgrd always read it.

    Returns:
        the targets in order, none empty.
    """
    out: list[str] = []
    words: list[str] = []   # the words of the current comma-separated part
    cur: list[str] = []     # the pieces of the word being read
    i, n = 0, len(value)

    def end_word() -> None:
        nonlocal cur
        if not cur:
            return
        word = "".join(cur)
        cur = []
        if words and (words[-1].endswith(("@", ".")) or word.startswith(("@", "."))):
            words[-1] += word   # "user @ host": RFC 822 operators join words
        else:
            words.append(word)  # else a missing comma: a new address

    def end_part() -> None:
        nonlocal words
        end_word()
        out.extend(words)
        words = []

    while i < n:
        ch = value[i]
        if ch == "|" and not cur:
            end_word()
            j = i
            command: list[str] = []
            while j < n and value[j] != ",":
                if value[j] == '"':
                    text, j = _quoted(value, j)
                    command.append(text)
                    continue
                command.append(value[j])
                j += 1
            out.extend(words)
            out.append("".join(command).strip())
            words, i = [], j
            continue
        if ch == ",":
            end_part()
            i += 1
        elif ch in " \t\r\n":
            end_word()
            i += 1
        elif ch == "(":
            end_word()
            i = _skip_comment(value, i)
        elif ch == '"':
            text, i = _quoted(value, i)
            cur.append(text)
        elif ch == "<":
            end_word()
            j = value.find(">", i + 1)
            j = n if j < 0 else j
            words = split_targets(value[i + 1:j])[:1]  # the phrase is dropped
            end_part()
            i = j + 1
        else:  # an atom; a stray ">" or ")" is kept in it
            j = i + 1
            while j < n and value[j] not in _SPECIAL:
                j += 1
            cur.append(value[i:j])
            i = j
    end_part()
    return [t for t in (w.strip() for w in out) if t]


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
        targets = split_targets(value)
        if not targets:  # e.g. only a (comment): Postfix's local/alias.c alias_count < 1
            log.warning(f"no recipient in alias lookup result for {name}")
            results.append(("", make_dsn(*UNAVAILABLE)))
            return
        for target in targets:
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
            if domain.endswith(".") and not domain.endswith("..") and domain != ".":
                # Postfix's resolver strips one trailing dot: alice@localhost. is local
                domain = domain[:-1]
                target, low = target[:-1], low[:-1]
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
    target (when there is one: an alias without a recipient has none); None when there
    is none."""
    for target, dsn in results:
        if dsn.status.startswith(digit):
            return make_dsn(dsn.status, f"{target}: {dsn.reason}" if target else dsn.reason)
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
