"""Building blocks of the qmgr: queue scans (restart flags, A/F modifiers, floods),
keyed timers on a fake clock, and the intrusive lists the scheduler uses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qmgrd.qmgr.chain import Chain, Link
from qmgrd.qmgr.scan import Scan
from qmgrd.qmgr.timers import Timers


class Lister:
    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.started = 0

    def __call__(self) -> Iterator[tuple[str, str]]:
        self.started += 1
        return iter([(n, f"q/{n}") for n in self.names])


def drain(scan: Scan) -> list[str]:
    out = []
    while (qid := scan.next()) is not None:
        out.append(qid)
    return out


def test_scan_runs_once_and_restarts_once_when_asked_meanwhile() -> None:
    lister = Lister(["a", "b"])
    scan = Scan("incoming", lister)
    assert scan.next() is None and lister.started == 0
    scan.request()
    assert scan.busy and scan.next() == "a" and scan.path == "q/a"  # where it was found
    lister.names.append("c")
    for _ in range(10_000):  # a flood of requests while the scan runs: one flag
        scan.request()
    assert lister.started == 1 and scan.restart_pending
    assert drain(scan) == ["b", "a", "b", "c"]
    assert lister.started == 2 and not scan.busy


def test_scan_modifiers_apply_now_and_to_the_next_scan_but_start_nothing() -> None:
    lister = Lister(["a"])
    scan = Scan("deferred", lister)
    scan.request(start=False, scan_all=True)  # "A" alone starts no scan
    assert not scan.busy and lister.started == 0
    scan.request()
    assert scan.scan_all and not scan.flush  # kept for the next scan that starts
    assert drain(scan) == ["a"] and not scan.scan_all
    scan.request()
    assert not scan.scan_all  # used up
    scan.request(start=False, flush=True)  # while running: this scan and the next
    assert scan.flush
    scan.request()
    assert drain(scan) == ["a", "a"]
    assert lister.started == 3
    scan.request()
    assert not scan.flush


def test_scan_close_abandons_the_walk() -> None:
    closed = []

    def gen() -> Iterator[tuple[str, str]]:
        try:
            yield "a", "q/a"
            yield "b", "q/b"
        finally:
            closed.append(True)

    scan = Scan("incoming", gen)
    scan.request()
    assert scan.next() == "a"
    scan.close()
    assert closed == [True] and scan.next() is None


def test_timers_fire_in_time_order_and_can_be_replaced_or_cancelled() -> None:
    timers = Timers()
    fired: list[str] = []
    timers.request("x", 10.0, lambda: fired.append("x"))
    timers.request("y", 5.0, lambda: fired.append("y"))
    timers.request("z", 7.0, lambda: fired.append("z"))
    timers.request("x", 6.0, lambda: fired.append("x2"))  # replaces x
    assert timers.cancel("z") and not timers.cancel("z")
    assert len(timers) == 2 and timers.next_due() == 5.0 and timers.when("x") == 6.0
    assert timers.run_due(4.9) == 0
    assert timers.run_due(6.0) == 2 and fired == ["y", "x2"]
    assert timers.next_due() is None and len(timers) == 0


def test_timer_callback_may_request_another_timer() -> None:
    timers = Timers()
    fired: list[float] = []

    def again() -> None:
        fired.append(1.0)
        if len(fired) < 3:
            timers.request("k", 1.0, again)

    timers.request("k", 1.0, again)
    assert timers.run_due(1.0) == 3 and fired == [1.0, 1.0, 1.0]


def test_chain_insert_remove_rotate() -> None:
    chain: Chain[str] = Chain()
    links = {name: Link(name) for name in "abcde"}
    for name in "abd":
        chain.append(links[name])
    chain.insert_before(links["c"], links["d"])
    chain.prepend(links["e"])
    assert list(chain) == ["e", "a", "b", "c", "d"] and len(chain) == 5
    chain.rotate(links["b"])  # the list now continues after b
    assert list(chain) == ["c", "d", "e", "a", "b"]
    chain.rotate(links["b"])  # already the tail
    assert list(chain) == ["c", "d", "e", "a", "b"]
    for owner in chain:  # removal of the element just returned is safe
        if owner in "ce":
            chain.remove(links[owner])
    assert list(chain) == ["d", "a", "b"] and not links["c"].linked
    with pytest.raises(ValueError):
        chain.append(links["a"])
    with pytest.raises(ValueError):
        chain.remove(links["c"])
    chain.insert_before(links["c"], None)
    assert list(chain) == ["d", "a", "b", "c"]
    assert chain.head is links["d"] and chain.tail is links["c"]
