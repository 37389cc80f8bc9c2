"""Issue 6 point 6, inbound flow control (``in_flow_delay``, qmgrd.flow), end to end.

The qmgr keeps the master's flow pipe topped up to default_process_limit tokens while its
incoming scan is idle and puts one token per message it takes from incoming/; smtpd and
pickup take one token before each message. The test reads the token count through
/proc/<qmgr>/fd/3 (FIONREAD on the same pipe; nothing is consumed), drains the pipe and
stops the qmgr (SIGSTOP: it falls behind) to show that producers are then slowed by
about in_flow_delay per message - and still accept the mail - and that nothing is slowed
in normal flow.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from qmgrd.flow import FlowPipe
from tests.harness import MailSystem, MakeSystem, maildir_messages, wait_for
from tests.tools.smtpd_system import smtp, start

pytestmark = pytest.mark.timeout(120)

SENDER = "alice@mail.test.example"
RCPT = "alice@mail.test.example"
LIMIT = 20  # default_process_limit: the token level the qmgr keeps


@contextmanager
def qmgr_pipe(ms: MailSystem) -> Iterator[tuple[int, FlowPipe]]:
    """(qmgr pid, the master's flow pipe opened through the qmgr's fd 3)."""
    (qmgr,) = ms.children("qmgr")
    fd = os.open(f"/proc/{qmgr.pid}/fd/3", os.O_RDONLY | os.O_NONBLOCK)
    try:
        yield qmgr.pid, FlowPipe(fd, fd)
    finally:
        os.close(fd)


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def message(n: int) -> bytes:
    return (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: flow {n}\r\n"
            f"Message-ID: <flow{n}@test>\r\n\r\nbody {n}\r\n").encode()


def delivered(ms: MailSystem) -> int:
    return len(maildir_messages(ms, "alice"))


def test_flow_control_slows_producers_only_when_qmgr_falls_behind(
        mailsys: MakeSystem) -> None:
    ms, port = start(mailsys, {"in_flow_delay": "1s", "default_process_limit": str(LIMIT)})
    with qmgr_pipe(ms) as (qmgr_pid, pipe):
        wait_for(lambda: pipe.count() == LIMIT, 20, "qmgr to top the pipe up")

        # Normal flow: tokens are there, nothing waits.
        with smtp(port) as s:
            for n in range(5):
                t0 = time.monotonic()
                s.sendmail(SENDER, [RCPT], message(n))
                assert time.monotonic() - t0 < 0.8, "smtpd waited with tokens available"
        wait_for(lambda: delivered(ms) == 5, 30, "5 deliveries")
        # each message took a token and the qmgr put one back (and topped up when idle)
        wait_for(lambda: pipe.count() == LIMIT, 20, "the token level back at the limit")

        # The qmgr falls behind: it takes nothing from incoming and the pipe is empty.
        with stopped(qmgr_pid):
            assert pipe.drain(1 << 16) == LIMIT
            with smtp(port) as s:
                for n in range(5, 7):
                    t0 = time.monotonic()
                    s.sendmail(SENDER, [RCPT], message(n))  # accepted all the same
                    took = time.monotonic() - t0
                    assert 0.9 <= took < 5, f"smtpd message {n}: {took:.2f}s"
            # pickup is slowed the same way
            t0 = time.monotonic()
            for n in range(7, 9):
                r = ms.sendmail("-f", SENDER, RCPT, data=message(n))
                assert r.returncode == 0, r.stderr
            wait_for(lambda: len(ms.queue_files("incoming")) == 4, 30, "pickup to queue")
            took = time.monotonic() - t0
            assert took >= 1.8, f"pickup queued 2 messages in {took:.2f}s without tokens"
            assert not ms.queue_files("maildrop")
            assert pipe.count() == 0
        # The qmgr catches up: everything is delivered and the level is restored.
        wait_for(lambda: delivered(ms) == 9, 60, "all 9 deliveries")
        wait_for(lambda: pipe.count() == LIMIT, 20, "the token level back at the limit")


def test_in_flow_delay_zero_disables_the_wait(mailsys: MakeSystem) -> None:
    ms, port = start(mailsys, {"in_flow_delay": "0", "default_process_limit": str(LIMIT)})
    with qmgr_pipe(ms) as (qmgr_pid, pipe):
        wait_for(lambda: pipe.count() == LIMIT, 20, "qmgr to top the pipe up")
        with stopped(qmgr_pid):
            pipe.drain(1 << 16)
            with smtp(port) as s:
                for n in range(3):
                    t0 = time.monotonic()
                    s.sendmail(SENDER, [RCPT], message(n))
                    assert time.monotonic() - t0 < 0.8
            assert pipe.count() == 0
        wait_for(lambda: delivered(ms) == 3, 30, "3 deliveries")


def test_the_flow_pipe_is_decided_once_for_every_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """qmgrd.flow.process_pipe is decided at the first flow_get of a process - in an
    smtpd, in one of several session threads (transports.smtpd) that may queue their
    first messages at once. A thread that asks while another is deciding must get the
    pipe too, not None ("no flow pipe": its message would take no token and wait for
    none)."""
    import threading

    from qmgrd import flow

    monkeypatch.setenv("GENERATION", "1")
    monkeypatch.setattr(flow._State, "checked", False)
    monkeypatch.setattr(flow._State, "pipe", None)
    deciding, go = threading.Event(), threading.Event()
    pipe = object()

    def same_fifo(a: int, b: int) -> bool:  # fstat(2) x 2: the GIL is let go meanwhile
        deciding.set()
        go.wait(10)
        return True

    monkeypatch.setattr(flow, "_same_fifo", same_fifo)
    monkeypatch.setattr(flow, "FlowPipe", lambda r, w: pipe)
    got: dict[str, object] = {}

    def ask(name: str) -> None:
        got[name] = flow.process_pipe()

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    assert deciding.wait(10)
    second = threading.Thread(target=ask, args=("second",))
    second.start()
    second.join(0.3)
    go.set()
    first.join(10)
    second.join(10)
    assert got == {"first": pipe, "second": pipe}
