"""Issue 3 acceptance: 20 reloads in 5 seconds while 500 messages flow.

SIGHUP to the master 20 times, 200 ms apart, while qmgr-sendmail runs feed 500 messages
(remote to smtp-sink, some local) and the test keeps connecting to an inet echo service
(tests.services.echo_agent on 127.0.0.1:<free port>, added to master.cf).  A reload is
not a crash: every message is delivered exactly once (counted by Message-ID), no
connection to the inet service is refused (the master keeps its listeners across a
reload, postfix.md §3.7) and every connection gets its answer, and afterwards every
process of the instance's session is the master or a child of it, with no zombie.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import time
import uuid
from typing import TYPE_CHECKING

import psutil
import pytest

from tests.harness import (
    REPO,
    Injector,
    LogCursor,
    MakeSystem,
    free_port,
    maildir_messages,
    message_ids,
    service_of,
    session_report,
    wait_delivered,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Peers

pytestmark = pytest.mark.timeout(150)

RELOADS = 20
# 19 gaps of 0.2 s: 3.8 s, so that a late turn of the test's own loop (it also starts
# qmgr-sendmail runs and probes between two signals) still keeps the 20 within 5 s
RELOAD_EVERY = 0.2


class EchoProber:
    """Connections to the inet echo service, opened one per probe() without blocking and
    carried on by poll(): counts refusals, answers and other failures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.buffers: dict[socket.socket, bytes] = {}
        self.connecting: set[socket.socket] = set()
        self.probes = 0
        self.refused = 0
        self.answers: list[str] = []
        self.errors: list[str] = []

    def probe(self) -> None:
        """Start one connection (never blocks)."""
        self.probes += 1
        s = socket.socket()
        s.setblocking(False)
        code = s.connect_ex(("127.0.0.1", self.port))
        self.buffers[s] = b""
        if code in (0, errno.EINPROGRESS):
            self.connecting.add(s)
            self.sel.register(s, selectors.EVENT_WRITE)
        else:
            self.sel.register(s, selectors.EVENT_READ)
            self._failed(s, code)

    def _failed(self, s: socket.socket, code: int) -> None:
        if code == errno.ECONNREFUSED:
            self.refused += 1
        else:
            self.errors.append(f"connect: {os.strerror(code)}")
        self._drop(s)

    def _connected(self, s: socket.socket) -> None:
        self.connecting.discard(s)
        code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._failed(s, code)
            return
        try:
            s.send(b"probe\n")  # 6 bytes into an empty socket buffer: never partial
        except OSError as exc:
            self.errors.append(f"send: {exc!r}")
            self._drop(s)
            return
        self.sel.modify(s, selectors.EVENT_READ)

    def poll(self, timeout: float) -> bool:
        """Carry on what is ready (waiting up to ``timeout`` s); True when none is pending."""
        if not self.buffers:
            return True
        for key, _ in self.sel.select(timeout):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if s in self.connecting:
                self._connected(s)
                continue
            try:
                chunk = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.errors.append(f"{exc!r} before an answer")
                self._drop(s)
                continue
            if chunk:
                self.buffers[s] += chunk
                continue
            data = self.buffers[s]
            if data.endswith(b"\n"):
                self.answers.append(data.decode().strip())
            else:
                self.errors.append(f"closed without an answer ({data!r})")
            self._drop(s)
        return not self.buffers

    def _drop(self, s: socket.socket) -> None:
        self.sel.unregister(s)
        del self.buffers[s]
        self.connecting.discard(s)
        s.close()

    def close(self) -> None:
        for s in list(self.buffers):
            self._drop(s)
        self.sel.close()


def test_twenty_reloads_while_500_messages_flow(mailsys: MakeSystem, peers: Peers) -> None:
    sink = peers.sink()
    port = free_port()
    cf = ((REPO / "etc" / "master.cf").read_text()
          + f"127.0.0.1:{port} inet n - n - - tests.services.echo_agent\n")
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{sink.port}"}, master_cf=cf)
    ms.start()
    tag = f"reload-{uuid.uuid4().hex[:10]}.test"
    want_remote, want_local = set(), set()
    jobs = []
    for i in range(500):
        if i % 10 == 9:
            want_local.add(f"l{i}")
            rcpt, mid = f"u{i % 5}@localhost", f"l{i}"
        else:
            want_remote.add(f"r{i}")
            rcpt, mid = f"r{i}@d{i % 11}.example", f"r{i}"
        jobs.append((["-i", "-f", "alice@mail.test.example", rcpt],
                     f"Subject: {mid}\nMessage-ID: <{mid}@{tag}>\n\nbody {i}\n".encode()))

    def remote() -> dict[str, int]:
        return dict(message_ids(sink.messages(), tag))

    def local() -> dict[str, int]:
        return dict(message_ids(maildir_messages(ms), tag))

    inj = Injector(ms, jobs, parallel=8)
    prober = EchoProber(port)
    cursor = LogCursor(ms)
    try:
        wait_for(lambda: inj.pump() or inj.done >= 100, 60, "100 messages injected",
                 interval=0.02)
        wait_for(lambda: inj.pump() or remote() or local(), 30,
                 "mail flowing before the reloads", interval=0.05)
        t0 = time.monotonic()
        sent: list[float] = []
        while len(sent) < RELOADS:
            now = time.monotonic()
            if now >= t0 + len(sent) * RELOAD_EVERY:
                os.kill(ms.master_pid, signal.SIGHUP)
                sent.append(now)
                continue
            inj.pump()
            prober.probe()
            prober.poll(0.02)
        reload_time = sent[-1] - sent[0]
        wait_for(lambda: prober.poll(0.05), 20, "answers to every echo connection")
        inj.finish(120)
        assert not inj.failures, inj.failures[:3]
        wait_delivered(ms, lambda: set(remote()) >= want_remote and set(local()) >= want_local,
                       90, "every message delivered")
        wait_for(ms.queue_empty, 30, "an empty queue")
    finally:
        inj.close()
        prober.close()
    reload_lines = [line for line in cursor.lines() if "reload" in line and "master[" in line]
    answered_by = sorted({a.split()[2] for a in prober.answers if len(a.split()) > 2})
    print(f"{RELOADS} SIGHUPs in {reload_time:.2f}s, {len(reload_lines)} reloads logged; "
          f"{prober.probes} echo probes, answered by generations {answered_by}")
    assert reload_time <= 5.0, f"{RELOADS} reloads took {reload_time:.2f}s"
    assert reload_lines, "the master logged no reload"
    assert prober.refused == 0, f"{prober.refused} of {prober.probes} connections refused"
    assert prober.errors == [], prober.errors[:10]
    assert len(prober.answers) == prober.probes
    dup_remote = {m: n for m, n in remote().items() if n != 1}
    dup_local = {m: n for m, n in local().items() if n != 1}
    assert not dup_remote and not dup_local, ("delivered more than once", dup_remote,
                                              dup_local)
    assert set(remote()) == want_remote and set(local()) == want_local
    assert not ms.proc_dead()

    def tree_clean() -> bool:
        r = session_report(ms)
        return not r["orphans"] and not r["zombies"]

    try:
        wait_for(tree_clean, 10, "no orphan and no zombie in the instance's session")
    except AssertionError:
        raise AssertionError(f"process tree: {session_report(ms)}") from None

    # and the children of old generations have finished (they saw EOF on their status
    # channel): what is left runs with the newest generation
    def generations() -> dict[int, str]:
        out: dict[int, str] = {}
        for p in psutil.Process(ms.master_pid).children():
            try:
                out[p.pid] = f"{service_of(p)}:{p.environ().get('GENERATION', '?')}"
            except psutil.Error:
                continue
        return out

    def one_generation() -> bool:
        gens = {g.rpartition(":")[2] for g in generations().values()}
        return len(gens) <= 1

    try:
        wait_for(one_generation, 15, "old-generation children to exit after the reloads")
    except AssertionError:
        raise AssertionError(f"children (service:generation): {generations()}") from None
