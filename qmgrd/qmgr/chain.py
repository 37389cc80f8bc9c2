"""chain — an intrusive doubly-linked list with O(1) insert, remove and rotate (QMGR_LIST).

Summary
    The qmgr's scheduler moves objects around lists all the time: a job is put in front
    of the job it preempts, unlinked when it retires, relinked when it gets more
    recipients; a job's peers are rotated for round robin. Postfix does this with
    intrusive lists (``QMGR_LIST_*`` macros); this is the same thing for Python: every
    object that can be on a list owns one :class:`Link` per list, and a :class:`Chain`
    links them. Every operation is O(1); iteration is in list order and tolerates the
    removal of the link just returned.

Public API
    Link(owner)                 .owner, .prev, .next (Link | None), .linked -> bool
    Chain()                     .head, .tail (Link | None), len(), bool(), iter() -> owners
        .append(link), .prepend(link), .insert_before(link, ref), .remove(link),
        .rotate(link) (link becomes the tail: the list continues after it)

Raises
    ValueError for a link that is already on a list (append/insert) or is not on this
    one (remove/rotate): an internal invariant, never input-dependent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["Chain", "Link"]

T = TypeVar("T")


class Link(Generic[T]):
    """One object's membership in one :class:`Chain`."""

    __slots__ = ("chain", "next", "owner", "prev")

    def __init__(self, owner: T) -> None:
        self.owner = owner
        self.prev: Link[T] | None = None
        self.next: Link[T] | None = None
        self.chain: Chain[T] | None = None

    @property
    def linked(self) -> bool:
        """True while the link is on a chain."""
        return self.chain is not None


class Chain(Generic[T]):
    """A doubly-linked list of :class:`Link` objects (see module docstring)."""

    __slots__ = ("_len", "head", "tail")

    def __init__(self) -> None:
        self.head: Link[T] | None = None
        self.tail: Link[T] | None = None
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[T]:
        link = self.head
        while link is not None:
            nxt = link.next
            yield link.owner
            link = nxt

    def _claim(self, link: Link[T]) -> None:
        if link.chain is not None:
            raise ValueError("link is already on a chain")
        link.chain = self
        self._len += 1

    def append(self, link: Link[T]) -> None:
        """Add ``link`` at the tail."""
        self._claim(link)
        link.prev, link.next = self.tail, None
        if self.tail is None:
            self.head = link
        else:
            self.tail.next = link
        self.tail = link

    def prepend(self, link: Link[T]) -> None:
        """Add ``link`` at the head."""
        self._claim(link)
        link.prev, link.next = None, self.head
        if self.head is None:
            self.tail = link
        else:
            self.head.prev = link
        self.head = link

    def insert_before(self, link: Link[T], ref: Link[T] | None) -> None:
        """Insert ``link`` in front of ``ref`` (``ref`` None: append)."""
        if ref is None:
            self.append(link)
            return
        if ref.chain is not self:
            raise ValueError("reference link is not on this chain")
        if ref.prev is None:
            self.prepend(link)
            return
        self._claim(link)
        prev = ref.prev
        link.prev, link.next = prev, ref
        prev.next = link
        ref.prev = link

    def remove(self, link: Link[T]) -> None:
        """Take ``link`` off this chain."""
        if link.chain is not self:
            raise ValueError("link is not on this chain")
        if link.prev is None:
            self.head = link.next
        else:
            link.prev.next = link.next
        if link.next is None:
            self.tail = link.prev
        else:
            link.next.prev = link.prev
        link.prev = link.next = None
        link.chain = None
        self._len -= 1

    def rotate(self, link: Link[T]) -> None:
        """Make ``link`` the tail, keeping the cyclic order (Postfix QMGR_LIST_ROTATE)."""
        if link.chain is not self:
            raise ValueError("link is not on this chain")
        if link.next is None:
            return
        head, tail = self.head, self.tail
        assert head is not None and tail is not None
        tail.next, head.prev = head, tail  # close the circle ...
        self.head = link.next
        self.tail = link
        self.head.prev = None  # ... and open it after ``link``
        link.next = None
