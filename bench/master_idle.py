"""bench/master_idle.py - what the master costs while idle, how fast it brings a child up,
and how much memory each kind of child takes.

Usage
    .venv/bin/python bench/master_idle.py [--seconds 60] [--rounds 3] [--json]

Runs a copy of the bundled etc/ (etc/main.cf + etc/master.cf, mail_owner qmgrd when run
as root) in a temporary directory, with the master in the foreground in its own session,
and reports:

* idle: the master's CPU time (user + system, psutil cpu_times) and voluntary context
  switches (= wake-ups) over ``--seconds`` of an idle mail system, measured after the
  start-up has settled (the qmgr and pickup are up);
* spawn-to-ready: for each delivery service of master.cf (a UNIX socket under private/),
  with no child of it running, the time from connect() - which makes the master spawn one
  (posix_spawn) - to the first byte the new child sends (the agent's protocol greeting:
  interpreter start, imports, main.cf, log, privilege drop, accept);
* memory: RSS and USS per child type (and the master), after the spawn rounds.

Nothing here is asserted; the numbers go to stdout (``--json``: one object).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parent.parent
DELIVERY_SERVICES = ("smtp", "local", "error", "discard", "bounce")


def wait_for(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def children_of(master: psutil.Process, service: str) -> list[psutil.Process]:
    found = []
    for child in master.children():
        try:
            if " ".join(child.cmdline()).startswith(f"qmgrd: {service}"):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def first_byte_after_connect(path: Path) -> float:
    """Seconds from connect() to the first byte received."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        t0 = time.perf_counter()
        sock.connect(str(path))
        if not sock.recv(1):
            raise SystemExit(f"{path}: closed without a greeting")
        return time.perf_counter() - t0


def stop_children(master: psutil.Process, service: str) -> None:
    procs = children_of(master, service)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    psutil.wait_procs(procs, timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="qmgrd-bench-"))
    os.chmod(base, 0o755)
    shutil.copytree(REPO / "etc", base / "etc")
    # the bundled main.cf logs to ../var/log/maillog, whose directory the master does
    # not make (as `make run` does, bin/ and the Makefile make it)
    (base / "var" / "log").mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("QMGRD_CONFIG_DIR", None)
    stderr = base / "master.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "master.cli", "-c",
                                 str(base / "etc"), "start", "--foreground"], env=env,
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    result: dict[str, object] = {"root": os.geteuid() == 0}
    try:
        master = psutil.Process(proc.pid)
        private = base / "var" / "spool" / "private"
        try:
            wait_for(lambda: proc.poll() is not None or (
                children_of(master, "qmgr") and children_of(master, "pickup")),
                20, "qmgr and pickup")
        except SystemExit as exc:
            raise SystemExit(f"{exc}; master: {stderr.read_text()[-1000:]}") from None
        if proc.poll() is not None:
            raise SystemExit(f"the master exited ({proc.returncode}): "
                               f"{stderr.read_text()[-1000:]}")
        time.sleep(2.0)  # let the start-up settle (first wakeups, pickup's first scan)

        before, ctx0 = master.cpu_times(), master.num_ctx_switches()
        t0 = time.monotonic()
        time.sleep(opts.seconds)
        after, ctx1 = master.cpu_times(), master.num_ctx_switches()
        elapsed = time.monotonic() - t0
        cpu = (after.user - before.user) + (after.system - before.system)
        result["idle"] = {"seconds": round(elapsed, 1), "master_cpu_s": round(cpu, 4),
                          "master_wakeups": ctx1.voluntary - ctx0.voluntary}

        spawn: dict[str, dict[str, float]] = {}
        for service in DELIVERY_SERVICES:
            times = []
            for _ in range(opts.rounds):
                stop_children(master, service)
                times.append(first_byte_after_connect(private / service))
            spawn[service] = {"median_ms": round(statistics.median(times) * 1000, 1),
                              "min_ms": round(min(times) * 1000, 1),
                              "max_ms": round(max(times) * 1000, 1)}
            if service != DELIVERY_SERVICES[-1]:
                first_byte_after_connect(private / service)  # leave one up for memory
        result["spawn_to_ready"] = spawn

        memory: dict[str, dict[str, float]] = {}
        for service in ("master", "qmgr", "pickup", *DELIVERY_SERVICES):
            procs = [master] if service == "master" else children_of(master, service)
            if not procs:
                continue
            info = procs[0].memory_full_info()
            memory[service] = {"rss_mib": round(info.rss / 2**20, 1),
                               "uss_mib": round(info.uss / 2**20, 1)}
        result["memory"] = memory
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)

    if opts.json:
        print(json.dumps(result))
        return
    idle = result["idle"]
    assert isinstance(idle, dict)
    print(f"idle {idle['seconds']} s: master CPU {idle['master_cpu_s']:.3f} s (clock-tick "
          f"resolution, 0.01 s), {idle['master_wakeups']} wake-ups (running as root: "
          f"{result['root']})")
    print("spawn -> ready (connect to first byte of the new child), ms:")
    for service, row in spawn.items():
        print(f"  {service:<8} median {row['median_ms']:>6}  min {row['min_ms']:>6}  "
              f"max {row['max_ms']:>6}")
    print("memory per process, MiB:")
    for service, row in memory.items():
        print(f"  {service:<8} RSS {row['rss_mib']:>6}  USS {row['uss_mib']:>6}")


if __name__ == "__main__":
    main()
