"""bench/run.py - ``make bench``: issue 8's scenarios for qmgrd and a private Postfix side
by side, a table with the targets, bench/results.jsonl and bench/results.json.

Usage
    .venv/bin/python bench/run.py [--rounds 4] [--only A,H,C,B,busy,scale,rss] [--scale]
                                  [--b-messages N] [--rss-points 120000]
                                  [--systems qmgrd,postfix]
                                  [--out results.json] [--jsonl results.jsonl]
    BENCH_SCALE=0.1 make bench      every message count scaled (a quick check)

``--only`` names what to run (default ``A,H,C,B,busy,scale,rss``):
    A, H, C, B   issue 8's scenarios (bench/scenarios.py); M (peak PSS) is measured
                 during A. ``--rounds`` rounds (4: an even number, so that each system
                 goes first in half of each scenario's rounds; 6 took 19 minutes on
                 a slow day, over the 15 the issue allows); in each round every
                 scenario runs on both systems, one after the other, which goes first
                 alternating from one round to the next for each scenario (and from one
                 scenario to the next); medians over the valid rounds.
    busy         scenario A (and M) for qmgrd alone, BUSY_ROUNDS (2) rounds, with
                 ``smtpd_process_busy_sessions = 5`` (fewer smtpd processes, at the price
                 of pflogsumm's ``--smtpd-stats`` connection counts): the figures of the
                 other side of scenario M's trade-off, printed under the table; not a
                 target.
    scale        scenario H once more per system at 1,000 messages (5,000 is H itself;
                 ``--scale`` adds 50,000): msgs/s and the qmgr's peak RSS.
    rss          bench/queue_bench.py's qmgr RSS benchmark at ``--rss-points`` queued
                 messages (default 120,000: 20,000 active + 100,000 in deferred;
                 issue 4's run used 10000,50000,120000).
    drain, scan  bench/queue_bench.py's other issue-4 benchmarks (not run by default)
    idle, list   bench/master_idle.py and bench/ctl_list.py (qmgrd; not run by default)

Every round is one JSON line in ``--jsonl`` (rewritten per run; see
bench/scenarios.py for the keys). ``--out`` gets the medians, ratios, targets, the
machine (CPUs, load average before and after), the other benchmarks' figures and the
printed table. Without Postfix (or not root) only qmgrd is measured. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import queue_bench
import scenarios
from common import SCALE, scaled

SCENARIOS = ("A", "H", "C", "B")
# (scenario, figure, label, digits, target as (op, value) on qmgrd/Postfix or None)
TARGETS: dict[str, tuple[str, float]] = {"A": (">=", 1.0), "H": (">=", 1.0),
                                         "C": (">=", 1.0), "B": (">=", 0.5),
                                         "M": ("<=", 1.5)}
SCALE_POINTS = (1_000,)
BUSY_ROUNDS = 2
BUSY_SESSIONS = "5"
BIG_SCALE_POINT = 50_000


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


def legacy_table(res: dict[str, Any]) -> str:
    """The table of the issue-4 benchmarks (drain, rss, scan) and idle/list."""
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
    rss_sizes = [scaled(s) for s in queue_bench.RSS_POINTS] if "rss" in res else []
    for i, size in enumerate(rss_sizes):
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



# --------------------------------------------------------------------------- scenarios
def counts(b_messages: int | None) -> dict[str, int]:
    return {"A": scaled(scenarios.A_MESSAGES), "H": scaled(scenarios.H_MESSAGES),
            "C": scaled(scenarios.C_MESSAGES),
            "B": b_messages if b_messages else scaled(B_MESSAGES)}


# B: the 2,000 sequential runs per round. With qmgr-sendmail's start-up of 731dd75
# (about 55 runs/s) a whole run takes 7-9 minutes; with the older, slower qmgr-sendmail
# (9-10 runs/s) use --b-messages 500 to stay within 15 minutes.
B_MESSAGES = 2_000


def run_scenarios(bench: scenarios.Bench, only: list[str], rounds: int, n: dict[str, int],
                  sink: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """``rounds`` rounds of every scenario of ``only``, the systems alternating."""
    out: list[dict[str, Any]] = []
    for rnd in range(1, rounds + 1):
        for idx, sc in enumerate(s for s in SCENARIOS if s in only):
            # each scenario alternates which system goes first from round to round (and
            # neighbouring scenarios start differently): no system always runs right
            # after its own previous scenario, nor always first, in any scenario
            order = bench.systems if (rnd + idx) % 2 == 1 else bench.systems[::-1]
            for system in order:
                out.append(_timed(
                    f"round {rnd} {sc} {system}",
                    lambda: getattr(bench, sc.lower())(system, n[sc]),  # noqa: B023
                    {"round": rnd}, sink,
                    lambda r: f"{r['msgs_per_s']} msgs/s, {r['cpu_ms_per_msg']} CPU ms/msg"))
    return out


def _timed(label: str, run: Callable[[], dict[str, Any]], extra: dict[str, Any],
           sink: Callable[[dict[str, Any]], None],
           figures: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """One round: ``run()``, ``extra`` added, recorded (``sink``) and logged with its
    ``figures`` (or INVALID and the error) and the seconds it took."""
    t0 = time.monotonic()
    res = run()
    res.update(extra)
    sink(res)
    log(f"{label}: " + (figures(res) if res["valid"] else f"INVALID {res['error']}")
        + f" ({time.monotonic() - t0:.0f}s)")
    return res


def run_busy(bench: scenarios.Bench, n: int,
             sink: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Scenario A for qmgrd with smtpd_process_busy_sessions = BUSY_SESSIONS, then the
    default (1) again."""
    inst = bench.inst.get("qmgrd")
    if inst is None:
        return []
    out: list[dict[str, Any]] = []
    inst.stop()
    inst.write_main(smtpd_process_busy_sessions=BUSY_SESSIONS)
    try:
        for rnd in range(1, BUSY_ROUNDS + 1):
            out.append(_timed(
                f"busy A qmgrd (smtpd_process_busy_sessions = {BUSY_SESSIONS}) round {rnd}",
                lambda: bench.a("qmgrd", n), {"scenario": "A-busy", "round": rnd}, sink,
                lambda r: f"{r['msgs_per_s']} msgs/s, peak PSS {r['peak_pss_mib']} MiB"))
    finally:
        inst.stop()
        inst.write_main(smtpd_process_busy_sessions="1")
    return out


def busy_line(busy_rows: list[dict[str, Any]], summ: dict[str, Any]) -> str:
    """The busy rounds' medians against Postfix's A medians of this run."""
    if not busy_rows:
        return ""
    rate, pss = _median(busy_rows, "msgs_per_s"), _median(busy_rows, "peak_pss_mib")
    valid = sum(bool(r.get("valid")) for r in busy_rows)
    if rate is None or pss is None:
        return (f"qmgrd with smtpd_process_busy_sessions = {BUSY_SESSIONS}: no valid round "
                f"({valid}/{len(busy_rows)})")
    pf = summ.get("A", {}).get("postfix", {})
    prate, ppss = pf.get("msgs_per_s"), pf.get("peak_pss_mib")
    vs = (f" ({rate / prate:.2f} and {pss / ppss:.2f} x Postfix's A of this run)"
          if prate and ppss else "")
    return (f"qmgrd with smtpd_process_busy_sessions = {BUSY_SESSIONS} (not the default: "
            f"pflogsumm --smtpd-stats then undercounts\n  connections), scenario A, median "
            f"of {valid} rounds: {rate:,.0f} msgs/s, peak PSS {pss:.0f} MiB{vs}")


def run_scale(bench: scenarios.Bench, points: list[int],
              sink: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, size in enumerate(points):
        order = bench.systems if i % 2 == 0 else bench.systems[::-1]
        for system in order:
            out.append(_timed(
                f"scale H {size} {system}", lambda: bench.h(system, size),  # noqa: B023
                {"scenario": "H-scale"}, sink,
                lambda r: f"{r['msgs_per_s']} msgs/s, qmgr RSS {r['peak_qmgr_rss_mib']} MiB"))
    return out


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get("valid") and isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def _median_by_process(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per process title, the median over the valid rounds of CPU ms per message (a round
    without the title counts 0)."""
    valid = [r.get("cpu_ms_per_msg_by_process") or {} for r in rows if r.get("valid")]
    titles = {t for r in valid for t in r}
    med = {t: statistics.median(r.get(t, 0.0) for r in valid) for t in titles}
    return {t: round(v, 3) for t, v in sorted(med.items(), key=lambda kv: -kv[1]) if v > 0}


def cpu_breakdown(summ: dict[str, Any], top: int = 6) -> str:
    """Where the CPU goes: per scenario and system, the costliest process titles in CPU
    ms per message (median of the valid rounds; the profile issue 8 asks for)."""
    out = []
    for sc in ("A", "H", "C"):
        for system, v in summ.get(sc, {}).items():
            per = v.get("cpu_by_process") or {}
            if per:
                parts = [f"{t} {ms:.2f}" for t, ms in list(per.items())[:top]]
                out.append(f"  {sc} {system:<8} " + ", ".join(parts))
    return ("CPU ms per message by process (median of rounds):\n" + "\n".join(out)
            if out else "")


def summarize(rows: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    """Medians per scenario and system over the valid rounds; ratios; targets."""
    summ: dict[str, Any] = {}
    for sc in SCENARIOS:
        per: dict[str, Any] = {}
        for system in systems:
            mine = [r for r in rows if r["scenario"] == sc and r["system"] == system]
            if not mine:
                continue
            per[system] = {
                "rounds": len(mine), "valid": sum(bool(r["valid"]) for r in mine),
                "messages": mine[0]["messages"],
                "msgs_per_s": _median(mine, "msgs_per_s"),
                "cpu_ms_per_msg": _median(mine, "cpu_ms_per_msg"),
                "peak_pss_mib": _median(mine, "peak_pss_mib"),
                "peak_qmgr_rss_mib": _median(mine, "peak_qmgr_rss_mib"),
                "cpu_by_process": _median_by_process(mine),
                "errors": [r["error"] for r in mine if not r["valid"]]}
        if per:
            summ[sc] = per
    for sc, (op, want) in TARGETS.items():
        src, key = ("A", "peak_pss_mib") if sc == "M" else (sc, "msgs_per_s")
        q = summ.get(src, {}).get("qmgrd", {}).get(key)
        p = summ.get(src, {}).get("postfix", {}).get(key)
        ratio = q / p if isinstance(q, (int, float)) and isinstance(p, (int, float)) and p \
            else None
        met = None if ratio is None else (ratio >= want if op == ">=" else ratio <= want)
        summ.setdefault("targets", {})[sc] = {"ratio": None if ratio is None
                                              else round(ratio, 3),
                                              "target": f"{op} {want}", "met": met}
    return summ


def _cell(v: Any, digits: int, width: int) -> str:
    s = "-" if not isinstance(v, (int, float)) else f"{v:,.{digits}f}"
    return f"{s:>{width}}"


def scenario_table(summ: dict[str, Any], scale_rows: list[dict[str, Any]],
                   rss: dict[str, Any] | None) -> str:
    labels = {"A": "A SMTP in -> SMTP out ({n:,} msgs), msgs/s",
              "H": "H queue drain ({n:,} in incoming), msgs/s",
              "C": "C deferred drain ({n:,} after 4xx), msgs/s",
              "B": "B local submission ({n:,} sendmail runs), msgs/s"}
    rows: list[tuple[str, Any, Any, int, str]] = []  # label, qmgrd, postfix, digits, target
    for sc in SCENARIOS:
        per = summ.get(sc)
        if not per:
            continue
        n = next(iter(per.values()))["messages"]
        t = summ["targets"][sc]
        met = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        q, p = per.get("qmgrd", {}), per.get("postfix", {})
        rows.append((labels[sc].format(n=n), q.get("msgs_per_s"), p.get("msgs_per_s"), 0,
                     f"{t['target']}: {met}"))
        cpu = "  CPU ms per message (incl. sendmail runs)" if sc == "B" \
            else "  CPU ms per message, all processes"
        rows.append((cpu, q.get("cpu_ms_per_msg"), p.get("cpu_ms_per_msg"), 2, ""))
        if sc == "A":
            t = summ["targets"]["M"]
            met = {True: "met", False: "NOT met", None: "-"}[t["met"]]
            rows.append(("M peak PSS during A, all processes, MiB", q.get("peak_pss_mib"),
                         p.get("peak_pss_mib"), 0, f"{t['target']}: {met}"))
        if sc == "H":
            rows.append(("  peak qmgr RSS, MiB", q.get("peak_qmgr_rss_mib"),
                         p.get("peak_qmgr_rss_mib"), 1, ""))
    width = max([len(r[0]) for r in rows] + [40]) + 2
    out = [(f"{'scenario (median of valid rounds)':<{width}}{'qmgrd':>9}{'Postfix':>9}"
            f"{'q/P':>7}  target (qmgrd/Postfix)")] if rows else []
    for label, q, p, digits, target in rows:
        ratio = (f"{q / p:.2f}" if isinstance(q, (int, float)) and isinstance(p, (int, float))
                 and p else "-")
        out.append(f"{label:<{width}}{_cell(q, digits, 9)}{_cell(p, digits, 9)}"
                   f"{ratio:>7}  {target}")
    valid = []
    for sc in SCENARIOS:
        for system, v in summ.get(sc, {}).items():
            valid.append(f"{sc} {system} {v['valid']}/{v['rounds']}")
            for err in v["errors"]:
                out.append(f"  INVALID round: {sc} {system}: {err[:300]}")
    if valid:
        out.append("valid rounds: " + ", ".join(valid))
    if scale_rows or rss:
        if out:
            out.append("")
        h_first: dict[str, Any] = next(iter(summ.get("H", {}).values()), {})
        h_size = h_first.get("messages")
        out.append("scale (scenario H; one round per size" + (
            f"; the H rounds above for {h_size:,}):" if h_size else "):"))
        out.append(f"  {'messages':>9} {'qmgrd msgs/s':>13} {'qmgr RSS MiB':>13} "
                   f"{'Postfix msgs/s':>15} {'qmgr RSS MiB':>13}")
        points: dict[int, dict[str, Any]] = {}
        for r in scale_rows:
            points.setdefault(r["messages"], {})[r["system"]] = r
        for system, v in summ.get("H", {}).items():
            points.setdefault(v["messages"], {})[system] = {
                "valid": True, "msgs_per_s": v["msgs_per_s"],
                "peak_qmgr_rss_mib": v["peak_qmgr_rss_mib"]}
        for size in sorted(points):
            cells = []
            for system in ("qmgrd", "postfix"):
                r = points[size].get(system, {})
                ok = r.get("valid")
                cells.append(_cell(r.get("msgs_per_s") if ok else None, 0, 13 if
                                   system == "qmgrd" else 15))
                cells.append(_cell(r.get("peak_qmgr_rss_mib") if ok else None, 1, 13))
            out.append(f"  {size:>9,} " + " ".join(cells))
        if rss:
            for system in ("qmgrd", "postfix"):
                pts = rss.get(system, {}).get("points") if isinstance(rss.get(system),
                                                                       dict) else None
                if pts:
                    desc = ", ".join(f"{p['queued']:,} queued ({p['active']:,} active): "
                                     f"{p['rss_mib']} MiB" for p in pts)
                    out.append(f"  {system} qmgr RSS, deferred backlog: {desc}")
                elif isinstance(rss.get(system), dict) and "error" in rss[system]:
                    out.append(f"  {system} qmgr RSS: ERROR {rss[system]['error']}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--only", default="A,H,C,B,busy,scale,rss")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--scale", action="store_true",
                        help=f"scenario H at {BIG_SCALE_POINT:,} messages too")
    parser.add_argument("--b-messages", type=int, default=0,
                        help=f"sendmail runs per B round (default {B_MESSAGES:,} scaled)")
    parser.add_argument("--rss-points", default="120000",
                        help="queue sizes of the rss benchmark, comma-separated")
    parser.add_argument("--systems", default="qmgrd,postfix")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--jsonl", default=str(HERE / "results.jsonl"))
    opts = parser.parse_args()
    only = opts.only.split(",")
    systems = opts.systems.split(",")
    started = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started))
    res: dict[str, Any] = {
        "started": stamp, "scale": SCALE, "rounds": opts.rounds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release(), "loadavg_before": os.getloadavg()},
    }
    rows: list[dict[str, Any]] = []
    scale_rows: list[dict[str, Any]] = []
    busy_rows: list[dict[str, Any]] = []
    jsonl: IO[str] = open(opts.jsonl, "w")  # noqa: SIM115 - written round by round

    def record(row: dict[str, Any]) -> None:
        row["run"] = stamp
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()

    try:
        if any(s in only for s in (*SCENARIOS, "busy", "scale")):
            base = Path(tempfile.mkdtemp(prefix="qmgrd-bench-"))
            os.chmod(base, 0o755)
            bench = scenarios.Bench(base, systems)
            if "postfix" in systems and "postfix" not in bench.systems:
                log("postfix: not installed or not root - only qmgrd is measured")
            try:
                rows = run_scenarios(bench, only, opts.rounds, counts(opts.b_messages),
                                     record)
                if "busy" in only:
                    busy_rows = run_busy(bench, counts(None)["A"], record)
                if "scale" in only:
                    points = [scaled(p) for p in SCALE_POINTS]
                    if opts.scale:
                        points.append(scaled(BIG_SCALE_POINT))
                    scale_rows = run_scale(bench, points, record)
            finally:
                bench.close()
                shutil.rmtree(base, ignore_errors=True)
        queue = [b for b in only if b in ("drain", "rss", "scan")]
        if queue:
            sizes = tuple(int(x) for x in opts.rss_points.split(","))
            res.update(queue_bench.run(queue, systems, log, rss_sizes=sizes))
        if "idle" in only:
            log("idle: qmgrd master ...")
            res["idle"] = idle_bench()
        if "list" in only:
            log("list: qmgr-ctl list vs postqueue -j ...")
            res["ctl_list"] = ctl_list_bench()
    finally:
        jsonl.close()
    summ = summarize(rows, systems)
    res["scenarios"] = summ
    res["scale_h"] = scale_rows
    res["busy_a"] = busy_rows
    res["machine"]["loadavg_after"] = os.getloadavg()
    res["seconds"] = round(time.time() - started, 1)
    parts = []
    if rows or scale_rows or busy_rows:
        rss = res.get("rss") if isinstance(res.get("rss"), dict) else None
        table = scenario_table(summ, scale_rows, rss)
        line = busy_line(busy_rows, summ)
        parts.append(table + ("\n" + line if line else ""))
        breakdown = cpu_breakdown(summ)
        if breakdown:
            parts.append(breakdown)
    if any(b in only for b in ("drain", "scan", "idle", "list")):
        parts.append(legacy_table(res))
    text = "\n\n".join(parts)
    res["table"] = text.splitlines()
    Path(opts.out).write_text(json.dumps(res, indent=2) + "\n")
    print(text)
    load = res["machine"]
    print(f"\n(scale {SCALE:g}, {opts.rounds} rounds, {res['seconds']:.0f} s, load average "
          f"{load['loadavg_before'][0]:.1f} before, {load['loadavg_after'][0]:.1f} after; "
          f"figures in {opts.out} and {opts.jsonl})")


if __name__ == "__main__":
    main()
