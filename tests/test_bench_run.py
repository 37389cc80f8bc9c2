"""bench/run.py's own checks (``make bench``, issue 8): bad options refused before anything
runs, a target not judged on invalid rounds, a non-zero exit for them, the RSS rows
labelled by the queue sizes that were measured. Nothing here runs a benchmark."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.harness import PY

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def run() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("argv, says", [
    (["--only", "a"], "unknown benchmark 'a'"),
    (["--only", "M"], "M is measured during A"),
    (["--only", ""], "none named"),
    (["--rounds", "0"], "must be 1 or more"),
    (["--rounds", "x"], "not a whole number"),
    (["--b-messages", "-5", "--only", "B"], "must be 1 or more"),
    (["--systems", "Postfix"], "unknown system 'Postfix'"),
    (["--out", "/nonexistent/x.json"], "cannot write there"),
    (["--out", "/tmp"], "is a directory"),
    (["--rss-points", "50000,10000", "--only", "rss"], "must increase"),
    (["--scale", "--only", "A"], "--scale applies to 'scale'"),
    (["--b-messages", "5", "--only", "A"], "--b-messages applies to 'B'"),
    (["--only", "busy", "--systems", "postfix"], "'busy' runs qmgrd alone"),
])
def test_bad_options_are_refused(run: ModuleType, argv: list[str], says: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run.parse_options(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_a_partial_run_does_not_overwrite_the_committed_results(run: ModuleType) -> None:
    full = run.parse_options([])
    assert Path(full.out).name == "results.json" and Path(full.jsonl).name == "results.jsonl"
    part = run.parse_options(["--only", "B,B", "--rounds", "1"])
    assert part.only == ["B"] and part.rounds == 1
    assert Path(part.out).name == "results-partial.json"
    assert Path(part.jsonl).name == "results-partial.jsonl"


def test_bad_bench_scale_is_refused_before_anything_runs() -> None:
    r = subprocess.run([PY, str(BENCH / "run.py"), "--only", "B"], capture_output=True,
                       text=True, env={"BENCH_SCALE": "abc", "PATH": "/usr/bin:/bin"},
                       timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    assert "BENCH_SCALE must be a number above 0" in r.stderr


def _row(system: str, valid: bool, rnd: int, rate: float) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": "A", "system": system, "valid": valid,
                           "messages": 10, "round": rnd}
    if valid:
        row.update(msgs_per_s=rate, cpu_ms_per_msg=1.0, peak_pss_mib=rate / 2)
    else:
        row["error"] = "RuntimeError: 9/10 messages at the sink"
    return row


def test_a_target_is_not_met_on_the_valid_rounds_of_a_system_that_lost_mail(
        run: ModuleType) -> None:
    rows = [_row("qmgrd", True, 1, 120.0), _row("qmgrd", False, 2, 0),
            _row("postfix", True, 1, 100.0), _row("postfix", True, 2, 100.0)]
    summ = run.summarize(rows, ["qmgrd", "postfix"])
    assert summ["targets"]["A"]["met"] is None and summ["targets"]["M"]["met"] is None
    table = run.scenario_table(summ, [], None)
    assert "met" not in table.replace("not judged", "")
    assert ">= 1.0: not judged: invalid rounds" in table
    assert run.failed(rows, {}) == ["invalid round: A qmgrd round 2"]
    ok = [r for r in rows if r["valid"]]
    summ = run.summarize(ok, ["qmgrd", "postfix"])
    assert summ["targets"]["A"]["met"] is True
    assert run.failed(ok, {}) == []


def test_failed_benchmarks_count(run: ModuleType) -> None:
    res = {"rss": {"qmgrd": {"error": "x"}}, "idle": {"error": "timed out"}}
    assert run.failed([], res) == ["rss qmgrd: error", "idle: error"]


def test_rss_rows_are_labelled_by_the_sizes_measured(run: ModuleType) -> None:
    res = {"rss": {"qmgrd": {"points": [{"queued": 1200, "active": 200, "rss_mib": 31.6}]}}}
    table = run.legacy_table(res)
    assert "qmgr RSS, 1,200 queued (200 active), MiB" in table
    assert "10,000 queued" not in table and "120,000 queued" not in table
