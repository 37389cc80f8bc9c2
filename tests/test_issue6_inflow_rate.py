"""Issue 6 point 6: with inbound at full speed, outbound delivery keeps at least half its
unloaded rate (inbound flow control, ``in_flow_delay``; qmgr(8) BUGS).

A whole qmgrd instance with smtpd on a free loopback port (tests.tools.smtpd_system) and
two destinations routed to the ``discard`` transport: ``backlog.example`` (outbound: mail
already in the queue) and ``in.example`` (where the inbound mail goes).

Each timed round puts N messages for ``backlog.example`` straight into ``deferred/``, due
now (tests.harness.fill_deferred), sends a ``D`` trigger and times until discard has
logged ``status=sent`` for all N of them. Rounds base, loaded, loaded, base (a machine
load that drifts weighs on both kinds alike); during a loaded round Postfix's
``smtp-source`` (10 sessions, 1 KB messages, no message limit in practice) sends to
``in.example`` through our smtpd at full speed from before the trigger until the backlog
is delivered. Asserted: the backlog's delivery rate under load >= half its rate without.
The rates, and the inbound messages accepted meanwhile, are printed (``pytest -s``).

What is "outbound" here: only the backlog's deliveries are counted (recipients in
``backlog.example``); the inbound mail's own deliveries are not, though they share the
qmgr, the discard agents and the machine with it.

Measured (2 CPUs, N=1000): base ~1100-1250 msg/s. With the qmgr giving one token per
message taken from incoming whatever its backlog (Postfix's rule) the loaded rate was
~200-250 msg/s (ratio 0.21-0.30; 0.07-0.10 with in_flow_delay=0, the incoming queue then
growing to thousands). Withholding tokens while a deferred scan runs
(qmgrd.qmgr.scheduler.Scheduler.flow_behind) gives ratio ~0.8, smtpd still accepting
while the backlog goes out (each message waits at most in_flow_delay).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from qmgrd.trigger import send_trigger
from tests.harness import MailSystem, MakeSystem, fill_deferred, free_port, require_tool, wait_for
from tests.tools.smtpd_system import master_cf_with_smtpd, wait_settled, wait_smtpd

pytestmark = pytest.mark.timeout(150)

N = 1000  # backlog messages per timed round
SESSIONS = 10
SENDER = "alice@source.test.example"
BACKLOG_SENT = re.compile(rb"discard\[\d+\]: \w+: to=<[^>]*@backlog\.example>.*status=sent")
INBOUND_ACCEPTED = re.compile(rb"smtpd\[\d+\]: \w+: client=")


class LogCounter:
    """Counts matching complete lines written to the maillog after it was made (reads
    only what is new on each call)."""

    def __init__(self, ms: MailSystem, pattern: re.Pattern[bytes]) -> None:
        self.path = ms.maillog
        self.pattern = pattern
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.total = 0

    def count(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self.offset += end
        self.total += len(self.pattern.findall(data[:end]))
        return self.total


class Inbound:
    """smtp-source sending to ``in.example`` through our smtpd at full speed until stop()."""

    def __init__(self, ms: MailSystem, port: int) -> None:
        source = require_tool("smtp-source")
        self.accepted = LogCounter(ms, INBOUND_ACCEPTED)
        self.err = ""
        self.proc = subprocess.Popen(
            [source, "-s", str(SESSIONS), "-m", "1000000", "-l", "1000", "-N",
             "-M", "source.test.example", "-f", SENDER, "-t", "bob@in.example",
             f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        try:
            wait_for(lambda: self.accepted.count() >= 5 * SESSIONS or self.proc.poll() is not None,
                     20, "smtp-source to get going")
            assert self.proc.poll() is None, self.stop_err()
        except BaseException:
            self.stop()
            raise

    def stop_err(self) -> str:
        """stop(), then smtp-source's standard error (its end)."""
        self.stop()
        return self.err

    def stop(self) -> int:
        """Stop smtp-source; returns the messages smtpd accepted while it ran."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _out, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        self.err = err.decode(errors="replace")[-2000:]
        return self.accepted.count()


def timed_round(ms: MailSystem, tag: str) -> float:
    """N backlog messages made due in deferred/ and a D trigger: seconds until all N
    are delivered."""
    fill_deferred(ms, SENDER, [f"b{i}@backlog.example" for i in range(N)], tag=tag)
    sent = LogCounter(ms, BACKLOG_SENT)
    t0 = time.monotonic()
    assert send_trigger(str(ms.spool / "public" / "qmgr"), b"D")
    wait_for(lambda: sent.count() >= N, 60, f"{N} backlog deliveries ({tag})", interval=0.02)
    return time.monotonic() - t0


def settle(ms: MailSystem) -> None:
    """Until the queue is empty (the inbound mail left over is delivered too)."""
    wait_for(ms.queue_empty, 60, "an empty queue", interval=0.05)


def inflow_system(mailsys: MakeSystem) -> tuple[MailSystem, int]:
    """Started, smtpd answering; both test domains routed to discard."""
    port = free_port()
    ms = mailsys(main={"max_use": "100000"}, master_cf=master_cf_with_smtpd(port))
    (ms.etc / "transport").write_text("backlog.example discard:\nin.example discard:\n")
    ms.write_main(transport_maps=f"texthash:{ms.etc / 'transport'}")
    ms.start()
    wait_smtpd(port)
    wait_settled(ms)
    return ms, port


def fmt(seconds: list[float]) -> str:
    return "+".join(f"{t:.2f}" for t in seconds) + " s"


@pytest.fixture
def smtp_source() -> str:
    """Postfix's smtp-source; looked up in a fixture so that a missing tool under CI=true
    is a setup error, told apart from a rate shortfall."""
    return require_tool("smtp-source")


def test_outbound_keeps_half_its_rate_under_full_speed_inbound(mailsys: MakeSystem,
                                                               smtp_source: str) -> None:
    ms, port = inflow_system(mailsys)
    timed_round(ms, "warm")  # agents spawned, caches warm
    settle(ms)
    took: dict[str, list[float]] = {"base": [], "loaded": []}
    inbound = 0
    for k, kind in enumerate(("base", "loaded", "loaded", "base")):
        source = Inbound(ms, port) if kind == "loaded" else None
        try:
            took[kind].append(timed_round(ms, f"{kind}{k}"))
        finally:
            if source is not None:
                inbound += source.stop()
        settle(ms)
    rate_base = 2 * N / sum(took["base"])  # totals over the two rounds of each kind
    rate_loaded = 2 * N / sum(took["loaded"])
    in_rate = inbound / sum(took["loaded"])
    print(f"\nbacklog of {N}: base {fmt(took['base'])} ({rate_base:.0f} msg/s), loaded "
          f"{fmt(took['loaded'])} ({rate_loaded:.0f} msg/s), ratio "
          f"{rate_loaded / rate_base:.2f}; inbound accepted meanwhile {inbound} "
          f"(~{in_rate:.0f} msg/s); in_flow_delay "
          f"{ms.params.get('in_flow_delay', '1s (default)')}")
    assert inbound >= 10 * SESSIONS, inbound  # the inbound load was real
    assert rate_loaded >= 0.5 * rate_base, (rate_base, rate_loaded)
