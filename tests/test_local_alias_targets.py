"""alias_maps values split into targets as Postfix's local(8) does (tok822_parse):
comments dropped, the address of ``Phrase <addr>``, missing commas added."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_agent_support import close_log  # noqa: F401 - autouse fixture
from test_local_alias import alias_env, inbox
from test_local_delivery import deliver

from qmgrd.spool import statuslog
from transports.local_alias import split_targets


@pytest.mark.parametrize(("value", "targets"), [
    ("alice (Alice Smith)", ["alice"]),
    ("(the boss) alice, bob (Bob (the (nested) one))", ["alice", "bob"]),
    (r"alice (a \) in a comment), bob", ["alice", "bob"]),
    ("alice (unterminated", ["alice"]),
    ("Carol Person <carol@localhost>", ["carol@localhost"]),
    ('"Carol Person" <carol@localhost>, bob', ["carol@localhost", "bob"]),
    ("<carol@localhost>", ["carol@localhost"]),
    ("< carol @ localhost >", ["carol@localhost"]),
    ("bob carol", ["bob", "carol"]),
    ("bob @ example.com", ["bob@example.com"]),
    ('alice,  bob@x "c d" , e', ["alice", "bob@x", "c d", "e"]),
    ('"a b"@x', ["a b@x"]),
    ("|/bin/cmd -a b, alice", ["|/bin/cmd -a b", "alice"]),
    ('"|/bin/cmd x", :include:/a, /tmp/file', ["|/bin/cmd x", ":include:/a", "/tmp/file"]),
    ("alice |/bin/cmd (not a comment), bob", ["alice", "|/bin/cmd (not a comment)", "bob"]),
    (", ,(only a comment), <>", []),
])
def test_split_targets(value: str, targets: list[str]) -> None:
    assert split_targets(value) == targets


NAME = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,8}(@[a-z0-9]{1,6}(\.[a-z]{2,3})?)?",
                     fullmatch=True).filter(lambda s: not s.endswith("."))
COMMENT_TEXT = st.text(st.characters(blacklist_characters="()\\", codec="ascii"), max_size=8)


@st.composite
def comment(draw: st.DrawFn) -> str:
    """An RFC 822 comment, possibly nested and with backslash escapes."""
    inner = draw(st.lists(st.one_of(COMMENT_TEXT, st.sampled_from([r"\(", r"\)", "()"])),
                          max_size=3))
    return "(" + "".join(inner) + ")"


@given(st.lists(st.tuples(NAME, st.sampled_from([", ", ",", " ", "\t", ",\n "]),
                          st.lists(comment(), max_size=2)), min_size=1, max_size=6))
def test_names_with_comments_and_separators(items: list[tuple[str, str, list[str]]]) -> None:
    """Names separated by commas or white space (missing commas added), with comments
    between them: the names, in order, and nothing of the comments."""
    value = "".join(f"{name} {' '.join(comments)}{sep}" for name, sep, comments in items)
    assert split_targets(value) == [name for name, _, _ in items]


@given(st.lists(st.one_of(NAME, st.from_regex(r'"[a-zA-Z ,]{0,8}"', fullmatch=True),
                          comment()), max_size=4), NAME, st.lists(NAME, max_size=3))
def test_phrase_angle_address(phrase: list[str], address: str, rest: list[str]) -> None:
    """``Phrase <addr>``: the address alone is the target; the phrase is dropped."""
    value = " ".join([*phrase, f"<{address}>"] + [f", {r}" for r in rest])
    assert split_targets(value) == [address, *rest]


ALIASES = """\
paren: alice (Alice Smith)
named: Carol Person <carol@localhost>
angle: <dave@localhost>
both: bob eve
"""


def test_comment_and_phrase_are_no_mailboxes(tmp_path: Path) -> None:
    """The tester's case: ``alice (Alice Smith)`` went to the mailboxes "(alice",
    "alice" and "smith)"; ``Carol Person <carol@localhost>`` to carol and person and
    bounced ``"<carol"@localhost>``."""
    env = alias_env(tmp_path)
    (tmp_path / "aliases").write_text(ALIASES)
    qid, reply = deliver(env, ["paren@localhost", "named@localhost", "angle@localhost",
                               "both@localhost"])
    assert reply.status == 0
    assert statuslog.read(env.spool, "bounce", qid) == []
    assert statuslog.read(env.spool, "defer", qid) == []
    assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == [
        "alice", "bob", "carol", "dave", "eve"]
    assert len(inbox(tmp_path, "carol")) == 1
    (msg,) = inbox(tmp_path, "dave")
    assert b"Delivered-To: dave@localhost\n" in msg
