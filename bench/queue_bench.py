"""bench/queue_bench.py - the issue-4 queue benchmarks, qmgrd and Postfix measured the same
way on the same machine (see bench/README.md for what each figure means).

Usage
    .venv/bin/python bench/queue_bench.py [--only drain,rss,scan] [--systems qmgrd,postfix]
                                          [--json]
    BENCH_SCALE=0.1 ...   scales every message count (quick runs)

Benchmarks (functions; each takes an Instance factory and returns a dict):
    drain(make) -> {"messages", "seconds", "msgs_per_s", "startup_s" (start command to
                    the first removal), "steady_msgs_per_s", "qmgr_cpu_s",
                    "qmgr_cpu_us_per_msg", "system_cpu_s", "system_cpu_us_per_msg"}
        N (20,000) one-recipient messages written into incoming/ while the system is
        stopped, 10 domains, default_transport = discard. Timed from the start command
        to the N-th "<id>: removed" line of the qmgr in the maillog (then the queue is
        checked empty). CPU: the qmgr process; the whole system = the master, its live
        children and the children it reaped.
    rss(make, keep=False, sizes=RSS_POINTS) -> ({"active_limit", "points": [{"queued", "active",
                               "deferred", "rss_mib", "fill_s"}], "max_rss_mib",
                               "growth_full_mib", "growth_mib"}, kept instance or None)
        The queue is topped up to each size (10k, 50k, 120k) in deferred/ (due now) with
        the system stopped; started; mail goes to smtp:[127.0.0.1]:<port>, a socket that
        accepts connections and never answers (greeting timeout 1 h), so the active queue
        fills to qmgr_message_active_limit (20,000) and stays full. Once active/ holds
        min(size, limit) files, the qmgr's RSS is sampled every 0.25 s for 5 s; the
        maximum is reported. At 120k: 20k active + 100k in deferred.
    scan(make, reuse=None) -> {"files", "startup_scan_s", "scan_s": [...], "median_s",
                               "qmgr_cpu_s": [...], "median_cpu_s"}
        100,000 files in deferred/ with mtime one day ahead (not due; the qmgr only
        stats them). The file the directory walk visits last (readdir order, the order
        both qmgrs use) is made due; the time from the one-byte "D" trigger written to
        public/qmgr until that file has left deferred/ is one deferred scan. Three scans,
        after the start-up scan has finished (measured the same way from the start).
        ``reuse``: the stopped instance of rss() (its queue is turned into this one).
    run(only, systems, log) -> dict    every benchmark of ``only`` for every system

Everything runs in temporary directories that are removed afterwards. Nothing is
asserted; figures go to stdout (``--json``: one object).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # type: ignore[import-untyped]
from common import (
    BlackHole,
    Instance,
    PostfixInstance,
    QmgrdInstance,
    count_files,
    postfix_available,
    scaled,
    tree_cpu,
    wait_for,
)

Make = Callable[..., Instance]
DRAIN_MESSAGES = 20_000
RSS_POINTS = (10_000, 50_000, 120_000)
ACTIVE_LIMIT = 20_000
SCAN_FILES = 100_000
SCAN_ROUNDS = 3


def rcpt(i: int) -> bytes:
    return b"u%d@d%d.bench.example" % (i, i % 10)


class LogTail:
    """Counts ``<id>: removed`` lines appended to a maillog after a point."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.removed = 0

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.removed
        end = data.rfind(b"\n") + 1
        self.offset += end
        self.removed += data[:end].count(b": removed\n")
        return self.removed


def maillog(inst: Instance) -> Path:
    return inst.ms.maillog if isinstance(inst, QmgrdInstance) else inst.maillog


def _cpu(inst: Instance) -> float:
    """CPU seconds (user + system) the qmgr process has used so far."""
    t = psutil.Process(inst.qmgr_pid()).cpu_times()
    return float(t.user + t.system)


def _system_cpu(inst: Instance) -> float:
    """CPU seconds used so far by the whole mail system: the master, the children it
    has reaped, and its live children (with the children they reaped)."""
    pid = inst.ms.master_pid if isinstance(inst, QmgrdInstance) else inst.master_pid()
    return 0.0 if pid is None else tree_cpu(pid)


# --------------------------------------------------------------------------- drain
def drain(make: Make) -> dict[str, float]:
    n = scaled(DRAIN_MESSAGES)
    inst = make(default_transport="discard")
    try:
        inst.prepare()
        inst.writer.write("incoming", n, rcpt)
        tail = LogTail(maillog(inst))
        t0 = time.perf_counter()
        inst.start()
        first = 0.0
        deadline = t0 + max(600.0, n / 10)
        while True:
            done = tail.poll()
            if done and not first:
                first = time.perf_counter() - t0
            if done >= n:
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{inst.name}: drain: {tail.removed}/{n} after "
                                   f"{deadline - t0:.0f}s")
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        cpu, system_cpu = _cpu(inst), _system_cpu(inst)
        left = sum(count_files(inst.queue_directory / q) for q in ("incoming", "active"))
        if left:
            raise RuntimeError(f"{inst.name}: drain: {left} files left in the queue")
        return {"messages": n, "seconds": round(seconds, 2),
                "msgs_per_s": round(n / seconds, 1), "startup_s": round(first, 2),
                "steady_msgs_per_s": round((n - 1) / max(seconds - first, 1e-6), 1),
                "qmgr_cpu_s": round(cpu, 2), "qmgr_cpu_us_per_msg": round(cpu / n * 1e6),
                "system_cpu_s": round(system_cpu, 2),
                "system_cpu_us_per_msg": round(system_cpu / n * 1e6)}
    finally:
        inst.stop()


# --------------------------------------------------------------------------- rss
def _sample_rss(inst: Instance, seconds: float = 5.0) -> float:
    proc = psutil.Process(inst.qmgr_pid())
    peak = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.25)
    return peak / 2**20


def _holds(path: Path, n: int) -> Callable[[], bool]:
    return lambda: count_files(path) >= n


def rss(make: Make, keep: bool = False, sizes: tuple[int, ...] = RSS_POINTS
        ) -> tuple[dict[str, object], Instance | None]:
    """Returns (result, the stopped instance when ``keep``, for the scan benchmark).
    ``sizes``: the queue sizes measured (before BENCH_SCALE), ascending."""
    hole = BlackHole()
    limit = scaled(ACTIVE_LIMIT)
    inst = make(default_transport=f"smtp:[127.0.0.1]:{hole.port}",
                smtp_connect_timeout="3600s", smtp_helo_timeout="3600s",
                qmgr_message_active_limit=str(limit), queue_run_delay="3600s")
    points: list[dict[str, float | int]] = []
    ok = False
    try:
        inst.prepare()
        queued = 0
        for size in (scaled(s) for s in sizes):
            inst.writer.write("deferred", size - queued, rcpt, mtime=time.time() - 60)
            queued = size
            # What the qmgr does at start-up anyway, done here so that active/ starts
            # empty and its count shows the new qmgr's progress.
            for qid in list(inst.writer.spool.scan("active")):
                inst.writer.spool.move(qid, "active", "incoming")
            inst.start()
            want = min(size, limit)
            t0 = time.perf_counter()
            wait_for(_holds(inst.queue_directory / "active", want), max(300.0, want / 20),
                     f"{inst.name}: {want} files in active/", interval=0.25)
            fill = time.perf_counter() - t0
            peak = _sample_rss(inst)
            active = count_files(inst.queue_directory / "active")
            points.append({"queued": size, "active": active, "deferred": size - active,
                           "rss_mib": round(peak, 1), "fill_s": round(fill, 1)})
            inst.stop()
        ok = True
    finally:
        inst.stop()
        hole.close()
    mib = [float(p["rss_mib"]) for p in points]
    full = [float(p["rss_mib"]) for p in points if int(p["active"]) >= limit]
    result: dict[str, object] = {
        "active_limit": limit, "points": points, "max_rss_mib": max(mib),
        "growth_full_mib": round(max(full) - min(full), 1) if full else None,
        "growth_mib": round(mib[-1] - mib[0], 1),
    }
    return result, (inst if keep and ok else None)


# --------------------------------------------------------------------------- scan
def _walk_last(inst: Instance) -> str:
    """The deferred file the qmgr's directory walk visits last (readdir order)."""
    last = ""
    for qid in inst.writer.spool.scan("deferred"):
        last = qid
    if not last:
        raise RuntimeError("scan: deferred/ is empty")
    return last


def _to_deferred(inst: Instance, n: int, mtime: float) -> None:
    """Make deferred/ hold exactly ``n`` files with time stamp ``mtime`` (system stopped):
    files left in incoming/ or active/ are moved there, extra ones removed, missing
    ones written."""
    spool = inst.writer.spool
    for q in ("active", "incoming"):
        for qid in list(spool.scan(q)):
            spool.move(qid, q, "deferred")
    have = list(spool.scan("deferred"))
    for qid in have[n:]:
        spool.remove("deferred", qid)
    if len(have) < n:
        inst.writer.write("deferred", n - len(have), rcpt)
    inst.writer.fix_owner("deferred")
    for qid in spool.scan("deferred"):
        os.utime(spool.path("deferred", qid), (mtime, mtime))


def _gone(path: str) -> Callable[[], bool]:
    return lambda: not os.path.exists(path)


def scan(make: Make, reuse: Instance | None = None) -> dict[str, object]:
    n = scaled(SCAN_FILES)
    inst = reuse if reuse is not None else make()
    inst.write_main(default_transport="discard", queue_run_delay="3600s")
    try:
        inst.prepare()
        _to_deferred(inst, n, time.time() + 86400)
        spool = inst.writer.spool
        timeout = max(120.0, n / 500)

        last = _walk_last(inst)
        path = spool.path("deferred", last)
        os.utime(path, (time.time() - 60,) * 2)
        t0 = time.perf_counter()
        inst.start()
        wait_for(_gone(path), timeout, f"{inst.name}: the start-up scan", interval=0.005)
        startup = time.perf_counter() - t0
        times: list[float] = []
        cpus: list[float] = []
        for _ in range(SCAN_ROUNDS):
            time.sleep(1.0)  # let the previous file's delivery finish
            last = _walk_last(inst)
            path = spool.path("deferred", last)
            os.utime(path, (time.time() - 60,) * 2)
            cpu0 = _cpu(inst)
            t0 = time.perf_counter()
            inst.trigger(b"D")
            wait_for(_gone(path), timeout, f"{inst.name}: a deferred scan", interval=0.005)
            times.append(round(time.perf_counter() - t0, 3))
            cpus.append(round(_cpu(inst) - cpu0, 2))
        return {"files": n, "startup_scan_s": round(startup, 3), "scan_s": times,
                "median_s": statistics.median(times), "qmgr_cpu_s": cpus,
                "median_cpu_s": statistics.median(cpus)}
    finally:
        inst.stop()


# --------------------------------------------------------------------------- driver
def factories(base: Path, systems: list[str],
              made: list[Instance]) -> dict[str, Make]:
    """An instance factory per system; every instance made is appended to ``made``."""

    def qmgrd(**kw: str) -> Instance:
        made.append(QmgrdInstance(base / f"qmgrd{len(made)}", None, **kw))
        return made[-1]

    def postfix(**kw: str) -> Instance:
        made.append(PostfixInstance(base / f"postfix{len(made)}", None, **kw))
        return made[-1]

    table: dict[str, Make] = {"qmgrd": qmgrd, "postfix": postfix}
    return {name: table[name] for name in systems}


def run(only: list[str], systems: list[str], log: Callable[[str], None],
        rss_sizes: tuple[int, ...] = RSS_POINTS) -> dict[str, object]:
    """Run the benchmarks named in ``only`` for each system; results by benchmark, then
    by system (an error is recorded as {"error": text}). ``rss_sizes``: rss's points."""
    if "postfix" in systems and not postfix_available():
        log("postfix: not installed or not root - skipped")
        systems = [s for s in systems if s != "postfix"]
    base = Path(tempfile.mkdtemp(prefix="qmgrd-bench-"))
    os.chmod(base, 0o755)
    results: dict[str, dict[str, object]] = {b: {} for b in only}
    made: list[Instance] = []
    try:
        makes = factories(base, systems, made)
        kept: dict[str, Instance | None] = {}
        for bench in only:  # benchmark by benchmark, the systems one after the other
            for name, make in makes.items():
                log(f"{bench}: {name} ...")
                t0 = time.perf_counter()
                try:
                    if bench == "drain":
                        results[bench][name] = drain(make)
                    elif bench == "rss":
                        results[bench][name], kept[name] = rss(make, keep="scan" in only,
                                                               sizes=rss_sizes)
                    elif bench == "scan":
                        results[bench][name] = scan(make, kept.pop(name, None))
                except Exception as exc:  # noqa: BLE001 - report and go on with the rest
                    results[bench][name] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{bench}: {name}: {results[bench][name]} "
                    f"({time.perf_counter() - t0:.0f}s)")
    finally:
        for inst in made:
            inst.stop()
        shutil.rmtree(base, ignore_errors=True)
    return {"scale": float(os.environ.get("BENCH_SCALE", "1") or "1"), **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="drain,rss,scan")
    parser.add_argument("--systems", default="qmgrd,postfix")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    res = run(opts.only.split(","), opts.systems.split(","),
              lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=None if opts.json else 2))


if __name__ == "__main__":
    main()
