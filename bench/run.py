"""bench/run.py - ``make bench``: every benchmark, a qmgrd-vs-Postfix table, results.json.

Usage
    .venv/bin/python bench/run.py [--only drain,rss,scan,idle,list] [--out FILE]
    BENCH_SCALE=0.1 make bench      every message count (and the idle time) scaled down

Runs bench/queue_bench.py's drain, rss and scan benchmarks for qmgrd and for a private
Postfix instance (skipped with a note when Postfix is missing or we are not root), then
bench/master_idle.py (qmgrd only: idle cost of the master, spawn-to-ready, memory per
process) and bench/ctl_list.py (``qmgr-ctl list --json`` against ``postqueue -j`` on a
big queue), each as a subprocess. Prints a table and writes every figure, with the machine
(CPUs, load average before and after) and the time of the run, to ``--out``.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import queue_bench
from common import SCALE, scaled


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def idle_bench() -> dict[str, Any]:
    seconds = max(5.0, 60.0 * SCALE)
    r = subprocess.run([sys.executable, str(HERE / "master_idle.py"), "--json",
                        "--seconds", str(seconds)], capture_output=True, text=True,
                       timeout=600, check=False, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-2000:]}
    return dict(json.loads(r.stdout))


def ctl_list_bench() -> dict[str, Any]:
    """bench/ctl_list.py (qmgr-ctl list --json vs postqueue -j), when it is there."""
    script = HERE / "ctl_list.py"
    if not script.exists():
        return {"error": "bench/ctl_list.py not found"}
    r = subprocess.run([sys.executable, str(script), "--json", "--count",
                        str(scaled(100_000))], capture_output=True, text=True, timeout=900,
                       check=False, stdin=subprocess.DEVNULL)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr or r.stdout)[-2000:]}
    return dict(json.loads(lines[-1]))


def _get(res: dict[str, Any], bench: str, system: str, *path: object) -> Any:
    v: Any = res.get(bench, {}).get(system)
    for k in path:
        if isinstance(v, dict):
            v = v.get(k)
        elif isinstance(v, list) and isinstance(k, int) and -len(v) <= k < len(v):
            v = v[k]
        else:
            return None
    return v


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)):
        return f"{v:,.{digits}f}"
    return str(v)


def _ms(us: Any) -> Any:
    return us / 1000 if isinstance(us, (int, float)) else None


def table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, Any, Any, int, bool]] = []  # label, qmgrd, postfix, digits, higher
    n = scaled(queue_bench.DRAIN_MESSAGES)
    rows.append((f"drain {n:,} msgs via discard, msgs/s", _get(res, "drain", "qmgrd",
                 "msgs_per_s"), _get(res, "drain", "postfix", "msgs_per_s"), 0, True))
    rows.append(("  same, after the first removal, msgs/s",
                 _get(res, "drain", "qmgrd", "steady_msgs_per_s"),
                 _get(res, "drain", "postfix", "steady_msgs_per_s"), 0, True))
    rows.append(("  CPU of the whole mail system per msg, ms",
                 _ms(_get(res, "drain", "qmgrd", "system_cpu_us_per_msg")),
                 _ms(_get(res, "drain", "postfix", "system_cpu_us_per_msg")), 2, False))
    rows.append(("  CPU of the qmgr process per msg, ms",
                 _ms(_get(res, "drain", "qmgrd", "qmgr_cpu_us_per_msg")),
                 _ms(_get(res, "drain", "postfix", "qmgr_cpu_us_per_msg")), 2, False))
    for i, size in enumerate(scaled(s) for s in queue_bench.RSS_POINTS):
        q = _get(res, "rss", "qmgrd", "points", i)
        p = _get(res, "rss", "postfix", "points", i)
        ref = q or p or {}
        label = (f"qmgr RSS, {size:,} queued ({ref.get('active', '?'):,} active), MiB"
                 if isinstance(ref.get("active"), int) else f"qmgr RSS, {size:,} queued, MiB")
        rows.append((label, q.get("rss_mib") if q else None, p.get("rss_mib") if p else None,
                     1, False))
    files = scaled(queue_bench.SCAN_FILES)
    label = f"deferred scan over {files:,} files, s (median of {queue_bench.SCAN_ROUNDS})"
    rows.append((label, _get(res, "scan", "qmgrd", "median_s"),
                 _get(res, "scan", "postfix", "median_s"), 3, False))
    rows.append(("  CPU of the qmgr process per scan, s",
                 _get(res, "scan", "qmgrd", "median_cpu_s"),
                 _get(res, "scan", "postfix", "median_cpu_s"), 2, False))
    width = max(len(r[0]) for r in rows) + 2
    out = [f"{'benchmark':<{width}}{'qmgrd':>12}{'Postfix':>12}{'qmgrd/Postfix':>15}"]
    for label, q, p, digits, _higher in rows:
        ratio = (f"{q / p:.2f}x" if isinstance(q, (int, float)) and isinstance(p, (int, float))
                 and p else "-")
        out.append(f"{label:<{width}}{_fmt(q, digits):>12}{_fmt(p, digits):>12}{ratio:>15}")
    for bench in ("drain", "rss", "scan"):
        for system, v in res.get(bench, {}).items():
            if isinstance(v, dict) and "error" in v:
                out.append(f"  {bench} {system}: ERROR {v['error']}")
    idle = res.get("idle")
    if isinstance(idle, dict) and "idle" in idle:
        i = idle["idle"]
        out.append("")
        out.append(f"qmgrd master idle {i['seconds']} s: CPU {i['master_cpu_s']:.2f} s, "
                   f"{i['master_wakeups']} wake-ups")
        spawn = ", ".join(f"{k} {v['median_ms']:.0f}" for k, v in
                          idle.get("spawn_to_ready", {}).items())
        out.append(f"spawn -> ready, median ms: {spawn}")
        mem = ", ".join(f"{k} {v['rss_mib']:.0f}" for k, v in idle.get("memory", {}).items())
        out.append(f"RSS per process, MiB: {mem}")
    elif isinstance(idle, dict) and "error" in idle:
        out.append(f"master_idle: ERROR {idle['error']}")
    listing = res.get("ctl_list")
    if isinstance(listing, dict) and isinstance(listing.get("results"), dict):
        out.append("")
        out.append(f"listing a queue of {listing.get('count', '?'):,} messages "
                   "(median; first line / total, s):")
        for name, r in listing["results"].items():
            if isinstance(r, dict):
                out.append(f"  {name:<58} {_fmt(r.get('first_line_s'), 3):>7} / "
                           f"{_fmt(r.get('total_s'), 2):>6}")
    elif isinstance(listing, dict) and "error" in listing:
        out.append(f"ctl_list: ERROR {listing['error']}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="drain,rss,scan,idle,list")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    opts = parser.parse_args()
    only = opts.only.split(",")
    started = time.time()
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release(), "loadavg_before": os.getloadavg()},
    }
    queue = [b for b in only if b in ("drain", "rss", "scan")]
    if queue:
        res.update(queue_bench.run(queue, ["qmgrd", "postfix"], log))
    if "idle" in only:
        log("idle: qmgrd master ...")
        res["idle"] = idle_bench()
    if "list" in only:
        log("list: qmgr-ctl list vs postqueue -j ...")
        res["ctl_list"] = ctl_list_bench()
    res["machine"]["loadavg_after"] = os.getloadavg()
    res["seconds"] = round(time.time() - started, 1)
    text = table(res)
    res["table"] = text.splitlines()
    Path(opts.out).write_text(json.dumps(res, indent=2) + "\n")
    print(text)
    print(f"\n(scale {SCALE:g}, {res['seconds']:.0f} s; figures in {opts.out})")


if __name__ == "__main__":
    main()
