"""bench/ctl_list.py - how fast ``qmgr-ctl list --json`` streams a big queue.

Usage
    .venv/bin/python bench/ctl_list.py [--count 100000] [--rounds 3] [--keep DIR] [--json]

Builds a queue of ``--count`` messages in a temporary directory (or DIR with --keep;
an existing queue there is reused): a few template messages written by
qmgrd.spool.cleanup.Cleanup, copied under fresh long queue ids without fsync - 90 %
in deferred/ (hashed; every third one with a defer/ log), 5 % hold, 3 % incoming, 2 %
active. Then, ``--rounds`` times, it runs ``python -m qmgrd.ctl -c <etc> list --json``
as a child process reading its standard output through a pipe, and reports per round:

* first: seconds from the start of the process to its first complete output line;
* total: seconds until EOF (process exit), CPU seconds (user + system) of the
  process, and the number of lines;
* the same for ``qmgr-ctl list --json --queue deferred --reason 'try later'`` (a
  selector that must read the defer logs);
* Postfix's ``postqueue -j`` on the same queue (as root with no Postfix running it
  runs showq stand-alone: ``postqueue -c <dir> -j``), when postqueue is installed.

Nothing is asserted; the issue's target is first line < 1 s, total < 10 s at 100,000.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from master.config import Config
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.queue import Spool
from qmgrd.spool.queueid import new_long_id

T0 = 1_700_000_000
REASON = "host mx.example.net[192.0.2.1] said: 450 4.2.0 try later"


def build(root: Path, count: int) -> Path:
    """Write etc/main.cf and a queue of ``count`` messages under ``root``; returns etc."""
    etc = root / "etc"
    qdir = root / "q"
    pf = root / "postfix"
    for d in (etc, pf):
        d.mkdir(parents=True, exist_ok=True)
    (etc / "main.cf").write_text(f"queue_directory = {qdir}\nmyhostname = mx.example.org\n")
    (pf / "main.cf").write_text(f"queue_directory = {qdir}\n")
    (pf / "master.cf").write_text("")
    for cf in ("main.cf", "master.cf"):
        os.utime(pf / cf, (1_600_000_000, 1_600_000_000))
    marker = root / "built"
    if marker.exists() and marker.read_text() == str(count):
        return etc
    cfg = Config.load(str(etc))
    spool = Spool.from_config(cfg)
    if qdir.exists():
        shutil.rmtree(qdir)
    spool.make_dirs()
    cleanup = Cleanup(cfg, spool)
    templates = []
    for i in range(8):
        rcpts = [Recipient(f"user{j}@dom{(i * 7 + j) % 30}.example") for j in range(1 + i % 3)]
        body = (b"Subject: bench %d\nFrom: s%d@example.org\n\n" % (i, i)) + b"x" * (200 * i)
        qid = cleanup.submit(Envelope(f"s{i}@example.org", rcpts, arrival=(T0 + i, 0)), body,
                             origin="smtp")
        path = spool.path("incoming", qid)
        templates.append((Path(path).read_bytes(), [r.address for r in rcpts]))
        os.unlink(path)
    for i in range(count):
        r = i % 100
        queue = ("deferred" if r < 90 else "hold" if r < 95 else "incoming" if r < 98
                 else "active")
        qid = new_long_id(T0 + i // 1000, (i * 997) % 1_000_000, i + 1)
        data, addrs = templates[i % len(templates)]
        path = spool.path(queue, qid)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fchmod(fd, 0o700)
        os.close(fd)
        if queue == "deferred" and i % 3 == 0:
            dsn = statuslog.Dsn("4.2.0", "delayed", REASON)
            for addr in addrs:
                statuslog.append(spool, "defer", qid, Recipient(addr), dsn)
    _give_to_postfix(qdir)
    marker.write_text(str(count))
    return etc


def _give_to_postfix(qdir: Path) -> None:
    """As root: the queue belongs to Postfix's mail_owner, so that its stand-alone showq
    (which drops to mail_owner) can read it. qmgr-ctl as root reads it either way."""
    if os.geteuid() != 0:
        return
    try:
        pw = pwd.getpwnam("postfix")
    except KeyError:
        return
    for top, dirs, files in os.walk(qdir):
        for name in dirs + files:
            os.lchown(os.path.join(top, name), pw.pw_uid, pw.pw_gid)
    os.chown(qdir, 0, 0)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, float]:
    """(seconds to the first line, seconds to EOF, lines, CPU seconds) of ``cmd``."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    first = -1.0
    lines = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          stdin=subprocess.DEVNULL, env=env) as proc:
        assert proc.stdout is not None
        for _ in proc.stdout:
            if first < 0:
                first = time.perf_counter() - t0
            lines += 1
        proc.wait()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return first, wall, lines, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", metavar="DIR", help="build (or reuse) the queue in DIR")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qmgrd-bench-"))
    try:
        t = time.perf_counter()
        etc = build(root, args.count)
        build_s = time.perf_counter() - t
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("QMGRD_CONFIG_DIR", None)
        base = [sys.executable, "-m", "qmgrd.ctl", "-c", str(etc), "list", "--json"]
        cases: dict[str, list[str]] = {
            "qmgr-ctl list --json": base,
            "qmgr-ctl list --json --queue deferred --reason 'try later'":
                [*base, "--queue", "deferred", "--reason", "try later"],
        }
        pq = shutil.which("postqueue") or ("/usr/sbin/postqueue"
                                           if os.access("/usr/sbin/postqueue", os.X_OK) else None)
        if pq and os.geteuid() == 0:
            cases["postqueue -j (stand-alone showq)"] = [pq, "-c", str(root / "postfix"), "-j"]
        results: dict[str, dict[str, float]] = {}
        for name, cmd in cases.items():
            runs = [timed(cmd, env) for _ in range(args.rounds)]
            results[name] = {
                "first_line_s": statistics.median(r[0] for r in runs),
                "total_s": statistics.median(r[1] for r in runs),
                "cpu_s": statistics.median(r[3] for r in runs),
                "lines": runs[-1][2],
            }
        out = {"count": args.count, "build_s": round(build_s, 1), "results": results}
        if args.json:
            print(json.dumps(out))
        else:
            print(f"queue of {args.count} messages (built in {build_s:.1f}s), "
                  f"median of {args.rounds} runs:")
            for name, r in results.items():
                print(f"  {name:<60} first line {r['first_line_s']:.3f}s  "
                      f"total {r['total_s']:.2f}s  cpu {r['cpu_s']:.2f}s  "
                      f"lines {r['lines']:.0f}")
            print(f"  (load average at the end: {os.getloadavg()[0]:.1f})")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
