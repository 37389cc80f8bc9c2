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
                 ``smtpd_process_busy_sessions = 1`` (Postfix's model, a process per
                 client; the default is 5, a thread per client): the figures of the
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
printed table. Their defaults are bench/results.json and bench/results.jsonl (the
committed figures of the last full run) for a full run - no ``--only``, ``--rounds``,
``--systems`` or BENCH_SCALE - and bench/results-partial.json(l) (not committed) for
any other. Without Postfix (or not root) only qmgrd is measured. See bench/README.md.

Exit status: 0 when every round was valid and every other benchmark gave figures; 1
when a round was invalid (a message missing at the sink, a command that failed...) or
a benchmark failed - the table is printed and the files written all the same, and a
target is judged (met / NOT met) only on a scenario whose rounds were all valid on
both systems; 2 for bad options (nothing is run). SIGINT, SIGTERM and SIGHUP stop the
run and tear the systems down (nothing is printed or written but the rounds done).
One benchmark at a time: a second run while one holds ``/tmp/qmgrd-bench.lock`` exits
2 at once (two runs on one machine spoil each other's figures).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import shutil
import signal
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

KNOWN = ("A", "H", "C", "B", "busy", "scale", "rss", "drain", "scan", "idle", "list")
DEFAULT_ONLY = "A,H,C,B,busy,scale,rss"
DEFAULT_ROUNDS = 4
SYSTEMS = ("qmgrd", "postfix")
LOCK = Path("/tmp/qmgrd-bench.lock")

SCENARIOS = ("A", "H", "C", "B")
# (scenario, figure, label, digits, target as (op, value) on qmgrd/Postfix or None)
TARGETS: dict[str, tuple[str, float]] = {"A": (">=", 1.0), "H": (">=", 1.0),
                                         "C": (">=", 1.0), "B": (">=", 0.5),
                                         "M": ("<=", 1.5)}
SCALE_POINTS = (1_000,)
BUSY_ROUNDS = 2
BUSY_SESSIONS = "1"  # the default is 5 (master.config.params)
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
    # one row per queue size measured (the points as run, whatever --rss-points said)
    rss_points = max((len(_get(res, "rss", system, "points") or [])
                      for system in SYSTEMS), default=0)
    for i in range(rss_points):
        q = _get(res, "rss", "qmgrd", "points", i)
        p = _get(res, "rss", "postfix", "points", i)
        ref = q or p or {}
        size, active = ref.get("queued"), ref.get("active")
        label = (f"qmgr RSS, {size:,} queued ({active:,} active), MiB"
                 if isinstance(active, int) else f"qmgr RSS, {size:,} queued, MiB")
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
    default again."""
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
        inst.ms.params.pop("smtpd_process_busy_sessions", None)
        inst.write_main()
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
    return (f"qmgrd with smtpd_process_busy_sessions = {BUSY_SESSIONS} (a process per "
            f"client, as Postfix; the default is 5,\n  a thread per client), scenario A, "
            f"median of {valid} rounds: {rate:,.0f} msgs/s, peak PSS {pss:.0f} MiB{vs}")


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
        # judged only on a scenario whose every round was valid on both systems: a
        # system that lost mail in a round must not look "met" on its other rounds
        invalid = any(v["valid"] < v["rounds"] for v in summ.get(src, {}).values())
        summ.setdefault("targets", {})[sc] = {"ratio": None if ratio is None
                                              else round(ratio, 3),
                                              "target": f"{op} {want}",
                                              "met": None if invalid else met,
                                              "invalid_rounds": invalid}
    return summ


def _cell(v: Any, digits: int, width: int) -> str:
    s = "-" if not isinstance(v, (int, float)) else f"{v:,.{digits}f}"
    return f"{s:>{width}}"


def _verdict(target: dict[str, Any]) -> str:
    """met / NOT met / not judged (invalid rounds) / - (a system missing)."""
    if target.get("invalid_rounds"):
        return "not judged: invalid rounds"
    return {True: "met", False: "NOT met", None: "-"}[target["met"]]


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
        met = _verdict(t)
        q, p = per.get("qmgrd", {}), per.get("postfix", {})
        rows.append((labels[sc].format(n=n), q.get("msgs_per_s"), p.get("msgs_per_s"), 0,
                     f"{t['target']}: {met}"))
        cpu = "  CPU ms per message (incl. sendmail runs)" if sc == "B" \
            else "  CPU ms per message, all processes"
        rows.append((cpu, q.get("cpu_ms_per_msg"), p.get("cpu_ms_per_msg"), 2, ""))
        if sc == "A":
            t = summ["targets"]["M"]
            met = _verdict(t)
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
    if scale_rows:
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
        if out:
            out.append("")
        out.append("qmgr RSS with a deferred backlog (bench/queue_bench.py):")
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


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {v}")
    return v


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    """A comma-separated list of ``known`` names, duplicates dropped (ArgumentTypeError
    for an empty list or an unknown name)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        hint = " (M is measured during A)" if "M" in bad else ""
        named = f"{what} {', '.join(map(repr, bad))}" if bad else "none named"
        raise argparse.ArgumentTypeError(f"{named}{hint}; known: {','.join(known)}")
    return list(dict.fromkeys(names))


def _rss_points(text: str) -> tuple[int, ...]:
    pts = tuple(_positive_int(x.strip()) for x in text.split(","))
    if list(pts) != sorted(set(pts)):
        raise argparse.ArgumentTypeError(f"queue sizes must increase: {text}")
    return pts


def _writable(path: str) -> str:
    """A file path whose directory exists and is writable (checked before the run, so
    that a typo does not cost the whole run's figures at its end)."""
    p = Path(path)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: is a directory")
    if not p.parent.is_dir() or not os.access(p.parent, os.W_OK) or (
            p.exists() and not os.access(p, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{path}: cannot write there")
    return path


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: exits 2 with argparse's usage message on a bad one."""
    parser = argparse.ArgumentParser(
        description="qmgrd against a private Postfix, side by side (issue 8; "
                    "bench/README.md).",
        epilog="Exit status: 0 all rounds valid, 1 an invalid round or a failed "
               "benchmark, 2 bad options or another benchmark running.")
    parser.add_argument("--only", type=lambda t: _names(t, KNOWN, "unknown benchmark"),
                        default=None, metavar="LIST",
                        help=f"what to run, comma-separated, of {','.join(KNOWN)} "
                             f"(default {DEFAULT_ONLY})")
    parser.add_argument("--rounds", type=_positive_int, default=None, metavar="N",
                        help=f"rounds of each scenario (default {DEFAULT_ROUNDS})")
    parser.add_argument("--scale", action="store_true",
                        help=f"with 'scale': scenario H at {BIG_SCALE_POINT:,} messages too")
    parser.add_argument("--b-messages", type=_positive_int, default=None, metavar="N",
                        help=f"with B: sendmail runs per round (default {B_MESSAGES:,} "
                             "scaled)")
    parser.add_argument("--rss-points", type=_rss_points, default=None, metavar="LIST",
                        help="with rss: queue sizes, increasing, comma-separated "
                             "(default 120000)")
    parser.add_argument("--systems", type=lambda t: _names(t, SYSTEMS, "unknown system"),
                        default=None, metavar="LIST",
                        help="qmgrd, postfix or both (default qmgrd,postfix)")
    parser.add_argument("--out", type=_writable, default=None, metavar="FILE",
                        help="medians, targets and the table as JSON (default "
                             "bench/results.json for a full run, else "
                             "bench/results-partial.json)")
    parser.add_argument("--jsonl", type=_writable, default=None, metavar="FILE",
                        help="one JSON line per round (default bench/results.jsonl for a "
                             "full run, else bench/results-partial.jsonl)")
    opts = parser.parse_args(argv)
    if not (math.isfinite(SCALE) and SCALE > 0):
        parser.error(f"BENCH_SCALE must be a number above 0, not {SCALE}")
    full = (opts.only is None and opts.rounds is None and opts.systems is None
            and SCALE == 1)
    opts.only = opts.only or DEFAULT_ONLY.split(",")
    opts.rounds = opts.rounds or DEFAULT_ROUNDS
    opts.systems = opts.systems or list(SYSTEMS)
    stem = "results" if full else "results-partial"
    try:
        opts.out = opts.out or _writable(str(HERE / f"{stem}.json"))
        opts.jsonl = opts.jsonl or _writable(str(HERE / f"{stem}.jsonl"))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if os.path.realpath(opts.out) == os.path.realpath(opts.jsonl):
        parser.error("--out and --jsonl name the same file")
    for flag, needs, given in (("--scale", "scale", opts.scale),
                               ("--b-messages", "B", opts.b_messages is not None),
                               ("--rss-points", "rss", opts.rss_points is not None)):
        if given and needs not in opts.only:
            parser.error(f"{flag} applies to {needs!r}, which --only does not name")
    if opts.only == ["busy"] and "qmgrd" not in opts.systems:
        parser.error("'busy' runs qmgrd alone: add qmgrd to --systems")
    return opts


def _lock() -> IO[str]:
    """Hold LOCK for the run (flock, released when the process ends however it ends);
    exits 2 when another benchmark holds it."""
    fh = open(LOCK, "a+")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        who = fh.read().strip() or "?"
        print(f"bench/run.py: another benchmark is running (pid {who}; {LOCK}): "
              "two at once spoil each other's figures", file=sys.stderr)
        sys.exit(2)
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _stop(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP as Ctrl-C: KeyboardInterrupt unwinds through the ``finally``
    clauses that stop the systems and remove their directories."""
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    opts = parse_options()
    lock = _lock()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    only, systems = opts.only, opts.systems
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
            bench: scenarios.Bench | None = None
            try:
                os.chmod(base, 0o755)
                bench = scenarios.Bench(base, systems)
                if "postfix" in systems and "postfix" not in bench.systems:
                    log("postfix: not installed or not root - only qmgrd is measured")
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
                if bench is not None:
                    bench.close()
                shutil.rmtree(base, ignore_errors=True)
        queue = [b for b in only if b in ("drain", "rss", "scan")]
        if queue:
            res.update(queue_bench.run(queue, systems, log,
                                       rss_sizes=opts.rss_points or (120_000,)))
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
    rss = res.get("rss") if isinstance(res.get("rss"), dict) else None
    if rows or scale_rows or busy_rows or rss:
        table = scenario_table(summ, scale_rows, rss)
        line = busy_line(busy_rows, summ)
        parts.append(table + ("\n" + line if line else ""))
        breakdown = cpu_breakdown(summ)
        if breakdown:
            parts.append(breakdown)
    if any(b in only for b in ("drain", "scan", "idle", "list")):
        parts.append(legacy_table(res))
    failures = failed(rows + scale_rows + busy_rows, res)
    res["failures"] = failures
    text = "\n\n".join(parts)
    res["table"] = text.splitlines()
    print(text, flush=True)  # before the file: a write that fails loses no figures
    Path(opts.out).write_text(json.dumps(res, indent=2) + "\n")
    load = res["machine"]
    print(f"\n(scale {SCALE:g}, {opts.rounds} rounds, {res['seconds']:.0f} s, load average "
          f"{load['loadavg_before'][0]:.1f} before, {load['loadavg_after'][0]:.1f} after; "
          f"figures in {opts.out} and {opts.jsonl})")
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
    lock.close()
    return 1 if failures else 0


def failed(rows: list[dict[str, Any]], res: dict[str, Any]) -> list[str]:
    """What makes the run's exit status 1: each invalid round, each benchmark that
    reported an error."""
    out = [f"invalid round: {r.get('scenario')} {r.get('system')} round "
           f"{r.get('round', '-')}" for r in rows if not r.get("valid")]
    for bench in ("drain", "rss", "scan"):
        for system, v in (res.get(bench) or {}).items():
            if isinstance(v, dict) and "error" in v:
                out.append(f"{bench} {system}: error")
    for bench in ("idle", "ctl_list"):
        if isinstance(res.get(bench), dict) and "error" in res[bench]:
            out.append(f"{bench}: error")
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:
        # the finally clauses have stopped the systems and removed their directories
        print(f"bench/run.py: stopped ({stop or 'SIGINT'}): the systems are torn down, "
              "no table", file=sys.stderr)
        sys.exit(130)
