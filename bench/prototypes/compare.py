"""bench/prototypes/compare.py - the stock smtp agent against the asyncio prototype
(bench/prototypes/async_smtp_agent.py), qmgrd only, alternating, on issue 8's scenarios.

Usage (after ``make test``'s set-up, as root, with Debian's postfix package installed):
    .venv/bin/python bench/prototypes/compare.py [--rounds 3] [--only H,C,A]
                                                 [--jsonl bench/prototypes/results.jsonl]

One qmgrd instance; before each round its master.cf's ``smtp`` line runs either ``smtp``
(stock: one delivery per process) or ``bench.prototypes.async_smtp_agent`` (many
deliveries per process, one in-process connection cache). The order alternates per
scenario and round. Each round is validated at the sink as by bench/run.py and adds, per
variant: the smtp processes seen and at once, their peak PSS, and context switches per
message of smtp, master and qmgr. Prints medians [min-max] per scenario and variant.
Nothing is asserted; this is a measurement for the design of a multi-delivery agent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

import common
import psutil  # type: ignore[import-untyped]
import scenarios

SMTP_LINE = re.compile(r"(?m)^(smtp\s+unix(?:\s+\S+){5}\s+)smtp\s*$")
TITLES = ("qmgrd: smtp", "qmgrd: master", "qmgrd: qmgr")
_LAST: dict[str, Any] = {}


class Watch(scenarios.Watch):
    """scenarios.Watch plus the smtp processes' count, PSS and context switches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.smtp_pids: set[int] = set()
        self.ctxsw: dict[tuple[str, int], int] = {}
        self.peak_n = 0
        self.peak_pss = 0
        _LAST["watch"] = self

    def _sample(self) -> None:
        super()._sample()
        pid = self.inst.master_pid()
        if pid is None:
            return
        n = pss = 0
        for p in common.tree(pid):
            try:
                name = common.title(p)
                if name in TITLES:
                    c = p.num_ctx_switches()
                    self.ctxsw[(name, p.pid)] = c.voluntary + c.involuntary
                if name != "qmgrd: smtp":
                    continue
                with open(f"/proc/{p.pid}/smaps_rollup", "rb") as f:
                    data = f.read()
            except (OSError, psutil.Error):
                continue
            at = data.find(b"\nPss:")
            n += 1
            self.smtp_pids.add(p.pid)
            pss += int(data[at + 5:data.index(b"kB", at)]) * 1024
        self.peak_n = max(self.peak_n, n)
        self.peak_pss = max(self.peak_pss, pss)


def _median(values: list[float]) -> str:
    return (f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"
            if values else "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="H,C,A")
    parser.add_argument("--jsonl", default=str(HERE / "results.jsonl"))
    opts = parser.parse_args()
    scenarios.Watch = Watch  # type: ignore[misc]
    counts = {"H": scenarios.H_MESSAGES, "C": scenarios.C_MESSAGES, "A": scenarios.A_MESSAGES}
    base = Path(tempfile.mkdtemp(prefix="qmgrd-proto-"))
    os.chmod(base, 0o755)
    bench = scenarios.Bench(base, ["qmgrd"])
    rows: list[dict[str, Any]] = []
    try:
        inst = bench.inst["qmgrd"]
        cf = inst.etc / "master.cf"
        stock = cf.read_text()
        proto = SMTP_LINE.sub(r"\1bench.prototypes.async_smtp_agent", stock)
        if proto == stock:
            raise SystemExit("no 'smtp unix ... smtp' line in the bench's master.cf")
        texts = {"stock": stock, "proto": proto}
        step = 0
        with open(opts.jsonl, "w") as out:
            for rnd in range(1, opts.rounds + 1):
                for sc in opts.only.split(","):
                    order = ["stock", "proto"] if step % 2 == 0 else ["proto", "stock"]
                    step += 1
                    for variant in order:
                        inst.stop()
                        cf.write_text(texts[variant])
                        _LAST.clear()
                        n = common.scaled(counts[sc])
                        res = getattr(bench, sc.lower())("qmgrd", n)
                        inst.stop()
                        w = _LAST.get("watch")
                        res.update(variant=variant, round=rnd,
                                   load1=round(os.getloadavg()[0], 1))
                        if w is not None:
                            res.update(
                                smtp_procs_seen=len(w.smtp_pids), peak_smtp_procs=w.peak_n,
                                peak_smtp_pss_mib=round(w.peak_pss / 2**20, 1),
                                ctxsw_per_msg={t: round(sum(v for (tt, _), v in w.ctxsw.items()
                                                            if tt == t) / n, 2)
                                               for t in TITLES})
                        rows.append(res)
                        out.write(json.dumps(res) + "\n")
                        out.flush()
                        print(f"round {rnd} {sc} {variant}: valid={res.get('valid')} "
                              f"{res.get('msgs_per_s')} msgs/s, "
                              f"{res.get('cpu_ms_per_msg')} CPU ms/msg "
                              f"{res.get('error', '')}", flush=True)
    finally:
        bench.close()
        shutil.rmtree(base, ignore_errors=True)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("valid"):
            groups[(r["scenario"], r["variant"])].append(r)
    for (sc, variant), g in sorted(groups.items()):
        by = [r["cpu_ms_per_msg_by_process"] for r in g]
        print(f"{sc} {variant:5s} rounds={len(g)} msgs/s {_median([r['msgs_per_s'] for r in g])}"
              f"  CPU ms/msg {_median([r['cpu_ms_per_msg'] for r in g])}"
              f"  smtp {_median([b.get('qmgrd: smtp', 0.0) for b in by])}"
              f"  qmgr {_median([b.get('qmgrd: qmgr', 0.0) for b in by])}"
              f"  smtp procs {_median([r.get('peak_smtp_procs', 0) for r in g])}"
              f"  smtp PSS MiB {_median([r.get('peak_smtp_pss_mib', 0.0) for r in g])}"
              + (f"  all PSS MiB {_median([r['peak_pss_mib'] for r in g])}" if sc == "A" else ""))


if __name__ == "__main__":
    main()
