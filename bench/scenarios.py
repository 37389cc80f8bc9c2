"""bench/scenarios.py - issue 8's mail-flow scenarios A, H, C, B (and M, measured during A),
one round of one scenario on one system at a time; bench/run.py alternates the systems.

Public API
    DOMAINS                          the 50 recipient domains d0..d49.bench.example
    A_MESSAGES, H_MESSAGES, C_MESSAGES, B_MESSAGES   full-size message counts
    Sink(port, soft=False)           Postfix's smtp-sink on 127.0.0.1:<port> (-u nobody as
                                     root); soft: every RCPT gets a 4xx, nothing is dumped;
                                     else each transaction is dumped to a file of its own
        .count() -> int, .last_time() -> float (newest dump's mtime, epoch s),
        .recipients() -> collections.Counter[str], .stop()
    Bench(base)                      one qmgrd and one Postfix instance (when available)
                                     under ``base``, both with smtpd on a loopback port of
                                     their own and the same texthash transport map sending
                                     the 50 domains to smtp:[127.0.0.1]:<sink port>
        .systems -> list[str]; .close()
        .a(system, n) / .h(system, n) / .c(system, n) / .b(system, n) -> dict   one round
                                     (the other system is stopped first)

Every round returns a dict (one JSON line of bench/results.jsonl): "system",
"scenario", "messages", "valid" (bool), and, when valid, "seconds", "msgs_per_s",
"cpu_s", "cpu_ms_per_msg"; A, H and C add "cpu_ms_per_msg_by_process" ({title: CPU ms
per message}, from samples of each process every 0.25 s; "(not sampled)": what
processes used after their last sample before they exited); A adds "peak_pss_mib" (scenario M) and
"peak_pss_by_process" ({title: [processes, MiB]} at the peak); H adds
"peak_qmgr_rss_mib"; B adds "client_cpu_s"; an invalid round has "error". A round is
valid only when the sink has received exactly the expected messages: as many dump
files as messages and each expected recipient exactly once (X-Rcpt-Args of the dumps),
and the command(s) that fed the system succeeded. What each figure measures is in
bench/README.md. Raises nothing: errors are recorded in the round's dict.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from common import (
    CpuByProcess,
    Instance,
    PostfixInstance,
    QmgrdInstance,
    count_files,
    postfix_available,
    transport_table,
    tree_cpu,
    tree_pss,
    wait_for,
)

from tests.harness import free_port, terminate, tool
from tests.tools.smtpd_system import wait_smtpd

DOMAINS = [f"d{i}.bench.example" for i in range(50)]
SENDER = "bench@sender.example"
A_MESSAGES, H_MESSAGES, C_MESSAGES, B_MESSAGES = 5_000, 5_000, 1_000, 2_000
A_SESSIONS = 10
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
POLL = 0.05
SAMPLE = 0.25


def _tool(name: str) -> str:
    path = tool(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (Debian's postfix package)")
    return path


# The sink's dumps go to a memory file system where there is one: the sink is the
# instrument, not part of either system, and its 5,000 files a round created and
# removed on the disk that holds both queues made the next round's file creation
# (both systems' and the sink's own) slower by an amount that depended on which system
# had just run (bench/README.md, "Issue 8: the scenarios").
SINK_DUMP_PARENT = ("/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
                    else None)


class Sink:
    """smtp-sink on 127.0.0.1:<port> (see the module docstring)."""

    def __init__(self, port: int, soft: bool = False) -> None:
        self.port = port
        self.dumpdir = Path(tempfile.mkdtemp(prefix=f"qmgrd-bench-sink-{port}-",
                                             dir=SINK_DUMP_PARENT))
        os.chmod(self.dumpdir, 0o777)  # smtp-sink writes as nobody
        args = [_tool("smtp-sink"), "-h", "sink.bench.example"]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        if soft:
            args += ["-r", "RCPT"]
        else:
            args += ["-d", str(self.dumpdir) + "/%H%M%S."]
        args += [f"127.0.0.1:{port}", "1024"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_smtpd(port, 15)
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(f"smtp-sink on port {port} did not start: {exc}") from exc

    def _files(self) -> list[os.DirEntry[str]]:
        with os.scandir(self.dumpdir) as it:
            return [e for e in it if e.is_file()]

    def count(self) -> int:
        with os.scandir(self.dumpdir) as it:
            return sum(1 for _ in it)

    def last_time(self) -> float:
        return max((e.stat().st_mtime for e in self._files()), default=0.0)

    def recipients(self) -> Counter[str]:
        got: Counter[str] = Counter()
        for e in self._files():
            with open(e.path, "rb") as f:
                head = f.read(4096)
            for line in head.split(b"\n"):
                if line.startswith(b"X-Rcpt-Args: "):
                    arg = line[13:].decode(errors="replace")  # <addr> [ORCPT=...]
                    got[arg[1:arg.find(">")] if arg.startswith("<") else arg] += 1
                elif not line.startswith(b"X-"):
                    break
        return got

    def stop(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self.dumpdir, ignore_errors=True)


def queued(inst: Instance, queues: tuple[str, ...] = QUEUES) -> int:
    return sum(count_files(inst.queue_directory / q) for q in queues)


def _master(inst: Instance) -> int:
    pid = inst.master_pid()
    if pid is None:
        raise RuntimeError(f"{inst.name}: the master is not running")
    return pid


class Watch:
    """Polls the sink until it holds ``n`` dumps (every POLL s), sampling the system's
    summed PSS (``pss``) or the qmgr's RSS (``rss``) every SAMPLE s, and calling ``pump``
    (the load generator's step) on every poll. RuntimeError after ``timeout`` s."""

    def __init__(self, inst: Instance, sink: Sink, n: int, timeout: float,
                 pss: bool = False, rss: bool = False,
                 pump: Callable[[], None] | None = None, from_zero: bool = False) -> None:
        self.inst, self.sink, self.n = inst, sink, n
        self.timeout, self.pss, self.rss, self.pump = timeout, pss, rss, pump
        self.cpu = CpuByProcess(_master(inst), from_zero)
        self.peak_pss = 0
        self.peak_by_name: dict[str, list[int]] = {}
        self.peak_rss = 0
        self._qmgr: psutil.Process | None = None

    def _sample(self) -> None:
        self.cpu.sample()
        if self.pss:
            pid = self.inst.master_pid()
            if pid is not None:
                by_name: dict[str, list[int]] = {}
                pss = tree_pss(pid, by_name)
                if pss > self.peak_pss:
                    self.peak_pss, self.peak_by_name = pss, by_name
        if self.rss:
            try:
                if self._qmgr is None or not self._qmgr.is_running():
                    self._qmgr = psutil.Process(self.inst.qmgr_pid())
                self.peak_rss = max(self.peak_rss, int(self._qmgr.memory_info().rss))
            except (RuntimeError, psutil.Error):
                self._qmgr = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        next_sample = 0.0
        while True:
            now = time.monotonic()
            if now >= next_sample:
                self._sample()
                next_sample = now + SAMPLE
            if self.pump is not None:
                self.pump()
            got = self.sink.count()
            if got >= self.n:
                return
            if now > deadline:
                raise RuntimeError(f"{self.inst.name}: {got}/{self.n} messages at the sink "
                                   f"after {self.timeout:.0f}s")
            time.sleep(POLL)


def _verify(sink: Sink, expect: Callable[[str], bool], n: int) -> None:
    """The sink holds exactly ``n`` dumps, ``n`` distinct recipients, each once, all
    expected ones."""
    files = sink.count()
    rcpts = sink.recipients()
    dup = [r for r, c in rcpts.items() if c > 1]
    bad = [r for r in rcpts if not expect(r)]
    if files != n or len(rcpts) != n or dup or bad:
        raise RuntimeError(f"sink check: {files} dumps, {len(rcpts)} distinct recipients "
                           f"(want {n}), duplicates {dup[:3]}, unexpected {bad[:3]}")


def _settle(inst: Instance, timeout: float = 60) -> None:
    """Until the system's queue is empty (its last removals are part of its work)."""
    wait_for(lambda: queued(inst) == 0, timeout, f"{inst.name}: an empty queue")


def _figures(n: int, seconds: float, cpu: float) -> dict[str, Any]:
    return {"seconds": round(seconds, 3), "msgs_per_s": round(n / seconds, 1),
            "cpu_s": round(cpu, 3), "cpu_ms_per_msg": round(cpu / n * 1000, 3)}


def _rcpt(i: int) -> bytes:
    return b"h%d@%s" % (i, DOMAINS[i % len(DOMAINS)].encode())


class Bench:
    """Both systems set up once for all rounds (see the module docstring)."""

    def __init__(self, base: Path, systems: list[str]) -> None:
        self.base = base
        self.sink_port = free_port()
        self.inst: dict[str, Instance] = {}
        self.smtpd_port: dict[str, int] = {}
        main = {"mynetworks": "127.0.0.0/8"}
        if "postfix" in systems and not postfix_available():
            systems = [s for s in systems if s != "postfix"]
        try:
            self._prepare(systems, main)
        except BaseException:
            self.close()  # no system left running by a failed or interrupted set-up
            raise
        self.systems = list(self.inst)

    def _prepare(self, systems: list[str], main: dict[str, str]) -> None:
        base = self.base
        for name in systems:
            root = base / name
            root.mkdir(parents=True)
            os.chmod(root, 0o755)
            table = root / "transport"
            maps = transport_table(table, DOMAINS, self.sink_port)
            port = free_port()
            self.smtpd_port[name] = port
            if name == "qmgrd":
                self.inst[name] = QmgrdInstance(root, smtpd_port=port, transport_maps=maps,
                                                **main)
            else:
                self.inst[name] = PostfixInstance(root, smtpd_port=port, transport_maps=maps,
                                                  **main)
            self.inst[name].prepare()

    def close(self) -> None:
        for inst in self.inst.values():
            inst.stop()

    # ------------------------------------------------------------------ helpers
    def _purge(self, inst: Instance) -> None:
        """System stopped: remove whatever an earlier (failed) round left queued."""
        inst.stop()
        for q in QUEUES + ("bounce", "defer", "trace"):
            d = inst.queue_directory / q
            if not d.is_dir():
                continue
            for dirpath, _, files in os.walk(d):
                for f in files:
                    os.unlink(os.path.join(dirpath, f))

    def _round(self, system: str, scenario: str, n: int,
               body: Callable[[Instance, list[Sink]], dict[str, Any]],
               soft: bool = False) -> dict[str, Any]:
        """One round: a fresh sink (``soft``: answering 4xx) in a one-element list that
        ``body`` may replace; the body's figures, or valid False and the error."""
        inst = self.inst[system]
        out: dict[str, Any] = {"system": system, "scenario": scenario, "messages": n,
                               "time": time.strftime("%H:%M:%S")}
        slot: list[Sink] = []
        try:
            for other, oinst in self.inst.items():  # one system at a time on the machine
                if other != system:
                    oinst.stop()
            if queued(inst):
                self._purge(inst)
            slot.append(Sink(self.sink_port, soft=soft))
            out.update(body(inst, slot))
            out["valid"] = True
        except Exception as exc:  # noqa: BLE001 - an invalid round is reported, not fatal
            out.update(valid=False, error=f"{type(exc).__name__}: {exc}")
        finally:
            if slot:
                slot[0].stop()
        if not out["valid"]:
            self._purge(inst)
        return out

    # ------------------------------------------------------------------ A (+ M)
    def a(self, system: str, n: int = A_MESSAGES) -> dict[str, Any]:
        """smtp-source -> smtpd -> qmgr -> smtp -> smtp-sink, the system running."""
        return self._round(system, "A", n, lambda inst, slot: self._a(system, inst, slot, n))

    def _a(self, system: str, inst: Instance, slot: list[Sink], n: int) -> dict[str, Any]:
        sink = slot[0]
        if inst.master_pid() is None:
            inst.start()
        port = self.smtpd_port[system]
        wait_smtpd(port, 30)
        source = _tool("smtp-source")
        # n messages in len(DOMAINS) smtp-source runs, one domain and one SMTP session
        # (-d: every message over the same connection) each, A_SESSIONS at a time.
        per = [n // len(DOMAINS) + (1 if i < n % len(DOMAINS) else 0)
               for i in range(len(DOMAINS))]
        jobs = [(d, k) for d, k in zip(DOMAINS, per, strict=True) if k]
        running: list[subprocess.Popen[bytes]] = []
        failed: list[str] = []

        def pump() -> None:
            for p in list(running):
                if p.poll() is not None:
                    running.remove(p)
                    err = p.stderr.read() if p.stderr else b""
                    if p.stderr:
                        p.stderr.close()
                    if p.returncode != 0:
                        failed.append(err.decode(errors="replace")[-300:])
            while jobs and len(running) < A_SESSIONS:
                domain, k = jobs.pop(0)
                running.append(subprocess.Popen(
                    [source, "-s", "1", "-d", "-m", str(k), "-l", "1024", "-N",
                     "-M", "source.bench.example", "-f", SENDER,
                     "-t", f"bench@{domain}", f"127.0.0.1:{port}"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE))

        master = _master(inst)
        cpu0 = tree_cpu(master)
        t0 = time.time()
        watch = Watch(inst, sink, n, max(300.0, n / 10), pss=True, pump=pump)
        try:
            watch.run()
            def sources_done() -> bool:
                pump()
                return not running and not jobs

            wait_for(sources_done, 60, "smtp-source to exit")
        finally:
            for p in running:
                p.kill()
                p.wait()
                if p.stderr:
                    p.stderr.close()
        end = sink.last_time()
        _settle(inst)
        watch.cpu.sample()
        cpu = tree_cpu(master) - cpu0
        if failed:
            raise RuntimeError(f"smtp-source failed: {failed[0]}")
        _verify(sink, lambda r: bool(re.fullmatch(r"\d+bench@d\d+\.bench\.example", r)), n)
        out = _figures(n, end - t0, cpu)
        out["cpu_ms_per_msg_by_process"] = watch.cpu.by_title(cpu, n)
        out["peak_pss_mib"] = round(watch.peak_pss / 2**20, 1)
        out["peak_pss_by_process"] = {  # at the peak: title -> [processes, MiB]
            k: [v[0], round(v[1] / 2**20, 1)] for k, v in sorted(
                watch.peak_by_name.items(), key=lambda kv: -kv[1][1])}
        return out

    # ------------------------------------------------------------------ H
    def h(self, system: str, n: int = H_MESSAGES) -> dict[str, Any]:
        """n messages in incoming/ (system stopped), then the system is started."""
        return self._round(system, "H", n, lambda inst, slot: self._h(inst, slot[0], n))

    def _h(self, inst: Instance, sink: Sink, n: int) -> dict[str, Any]:
        inst.stop()
        inst.writer.write("incoming", n, _rcpt)
        t0 = time.time()
        inst.start()
        watch = Watch(inst, sink, n, max(300.0, n / 10), rss=True, from_zero=True)
        watch.run()
        end = sink.last_time()
        _settle(inst)
        watch.cpu.sample()
        cpu = tree_cpu(_master(inst))  # the whole tree, from its start
        _verify(sink, lambda r: r.startswith("h"), n)
        out = _figures(n, end - t0, cpu)
        out["cpu_ms_per_msg_by_process"] = watch.cpu.by_title(cpu, n)
        out["peak_qmgr_rss_mib"] = round(watch.peak_rss / 2**20, 1)
        return out

    # ------------------------------------------------------------------ C
    def c(self, system: str, n: int = C_MESSAGES) -> dict[str, Any]:
        """n messages deferred by a 4xx peer, then the peer accepts and the queue is
        flushed."""
        return self._round(system, "C", n, lambda inst, slot: self._c(inst, slot, n),
                           soft=True)

    def _c(self, inst: Instance, holder: list[Sink], n: int) -> dict[str, Any]:
        inst.stop()
        inst.writer.write("incoming", n, _rcpt)
        inst.start()
        deferred = inst.queue_directory / "deferred"
        wait_for(lambda: count_files(deferred) >= n
                 and queued(inst, ("incoming", "active")) == 0,
                 max(300.0, n / 5), f"{inst.name}: {n} messages deferred", interval=0.1)
        holder[0].stop()
        holder[0] = sink = Sink(self.sink_port)
        master = _master(inst)
        watch = Watch(inst, sink, n, max(300.0, n / 10))
        cpu0 = tree_cpu(master)
        t0 = time.time()
        inst.flush()
        watch.run()
        end = sink.last_time()
        _settle(inst)
        watch.cpu.sample()
        cpu = tree_cpu(master) - cpu0
        _verify(sink, lambda r: r.startswith("h"), n)
        out = _figures(n, end - t0, cpu)
        out["cpu_ms_per_msg_by_process"] = watch.cpu.by_title(cpu, n)
        return out

    # ------------------------------------------------------------------ B
    def b(self, system: str, n: int = B_MESSAGES) -> dict[str, Any]:
        """n sequential sendmail runs (one recipient each), then drained to the sink."""
        return self._round(system, "B", n, lambda inst, slot: self._b(inst, slot[0], n))

    def _b(self, inst: Instance, sink: Sink, n: int) -> dict[str, Any]:
        if inst.master_pid() is None:
            inst.start()
        argv = inst.sendmail_argv() + ["-f", SENDER]
        env = inst.sendmail_env()
        master = _master(inst)
        cpu0 = tree_cpu(master)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        for i in range(n):
            rcpt = f"s{i}@{DOMAINS[i % len(DOMAINS)]}"
            msg = (f"From: {SENDER}\nTo: {rcpt}\nSubject: bench {i}\n\n"
                   + "This is a line of a benchmark message, about sixty bytes long....\n"
                   * 16).encode()
            r = subprocess.run([*argv, rcpt], input=msg, capture_output=True, env=env,
                               timeout=60, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"sendmail run {i}: exit {r.returncode} "
                                   f"{r.stderr.decode(errors='replace')[-300:]}")
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        Watch(inst, sink, n, max(300.0, n / 5)).run()
        end = sink.last_time()
        _settle(inst)
        cpu = tree_cpu(master) - cpu0
        client = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        _verify(sink, lambda r: r.startswith("s"), n)
        out = _figures(n, end - t0, cpu + client)
        out["client_cpu_s"] = round(client, 3)
        return out
