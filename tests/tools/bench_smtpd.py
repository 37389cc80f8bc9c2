"""bench_smtpd - messages per second accepted by qmgrd's smtpd and by Postfix's smtpd from
Postfix's smtp-source (10 sessions, 1 KB messages), on the same machine in the same run.

Usage (as root: Postfix's master must start as root):
    .venv/bin/python tests/tools/bench_smtpd.py [-m MESSAGES] [-r ROUNDS]
        [-o name=value ...] (qmgrd main.cf) [--only postfix|qmgrd]

Both systems accept into their queue (cleanup, fsync) and route everything to their
``discard`` transport, so delivery costs little and the same for both. The rounds
alternate between the systems; each prints the accept rate (smtp-source's wall time)
and the CPU time per message summed over the system's processes (sampled with psutil;
a process that ends between two samples loses at most its last 0.2 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import MailSystem, free_port, wait_for
from tests.tools.smtpd_system import master_cf_with_smtpd, wait_smtpd

SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
POSTFIX_MASTER = """\
{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance with smtpd on 127.0.0.1:<port>."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.etc = root / "etc"
        for d in (root, self.etc, root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        (root / "lib").mkdir(mode=0o700)
        shutil.chown(root / "lib", "postfix")
        main = {"compatibility_level": "3.6", "mail_owner": "postfix",
                "setgid_group": "postdrop", "myhostname": "pf.bench.example",
                "mydestination": "localhost", "inet_interfaces": "loopback-only",
                "inet_protocols": "ipv4", "queue_directory": str(root / "spool"),
                "data_directory": str(root / "lib"), "maillog_file": str(root / "maillog"),
                "maillog_file_prefixes": str(root), "default_transport": "discard",
                "alias_maps": "", "alias_database": "", "local_recipient_maps": "",
                "smtputf8_enable": "no", "biff": "no"}
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        (self.etc / "master.cf").write_text(POSTFIX_MASTER.format(port=f"127.0.0.1:{port}"))

    def _run(self, *args: str) -> None:
        r = subprocess.run([POSTFIX, "-c", str(self.etc), *args], capture_output=True,
                           text=True, timeout=120, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix {args}: {r.stderr}")

    def start(self) -> None:
        self._run("check")
        self._run("start")
        wait_smtpd(self.port)

    def stop(self) -> None:
        self._run("stop")

    def processes(self) -> list[psutil.Process]:
        pid = int((self.root / "spool" / "pid" / "master.pid").read_text())
        master = psutil.Process(pid)
        return [master, *master.children()]

    def sent(self) -> int:
        text = (self.root / "maillog").read_text(errors="replace")
        return text.count("status=sent")


class Qmgrd:
    """A qmgrd instance (tests.harness.MailSystem) with smtpd on 127.0.0.1:<port>."""

    def __init__(self, root: Path, port: int, main: dict[str, str]) -> None:
        root.mkdir(parents=True)
        os.chmod(root, 0o755)
        self.port = port
        self.ms = MailSystem(root / "ms", {"default_transport": "discard", **main},
                             master_cf_with_smtpd(port))
        os.chmod(self.ms.root, 0o755)

    def start(self) -> None:
        self.ms.start()
        wait_smtpd(self.port)

    def stop(self) -> None:
        self.ms.stop()

    def processes(self) -> list[psutil.Process]:
        return self.ms.processes()

    def sent(self) -> int:
        return self.ms.log().count("status=sent")


def one_round(system: Postfix | Qmgrd, messages: int) -> tuple[float, float]:
    """(accepted messages per second, CPU ms per message) for one smtp-source run."""
    cpu: dict[int, float] = {}

    def sample() -> None:
        for p in system.processes():
            try:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
            except psutil.Error:
                continue

    before_sent = system.sent()
    sample()
    base = dict(cpu)
    t0 = time.monotonic()
    src = subprocess.Popen([SOURCE, "-s", "10", "-m", str(messages), "-l", "1000", "-N",
                            "-f", "bench@source.example", "-t", "rcpt@far.example",
                            f"127.0.0.1:{system.port}"])
    while src.poll() is None:
        sample()
        time.sleep(0.2)
    elapsed = time.monotonic() - t0
    if src.returncode != 0:
        raise RuntimeError(f"smtp-source exited {src.returncode}")

    def done() -> bool:
        sample()
        return system.sent() - before_sent >= messages

    wait_for(done, 300, "the discard deliveries", interval=0.2)
    used = sum(c - base.get(pid, 0.0) for pid, c in cpu.items())
    return messages / elapsed, used / messages * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--messages", type=int, default=2000)
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("-o", dest="main", action="append", default=[],
                        help="name=value for qmgrd's main.cf")
    parser.add_argument("--only", choices=("postfix", "qmgrd"))
    opts = parser.parse_args()
    main_cf = dict(item.split("=", 1) for item in opts.main)
    root = Path(tempfile.mkdtemp(prefix="bench-smtpd-"))
    os.chmod(root, 0o755)
    systems: list[tuple[str, Postfix | Qmgrd]] = [
        ("postfix", Postfix(root / "postfix", free_port())),
        ("qmgrd", Qmgrd(root / "qmgrd", free_port(), main_cf))]
    systems = [(n, s) for n, s in systems if opts.only in (None, n)]
    try:
        for _, system in systems:
            system.start()
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in systems}
        for r in range(opts.rounds):
            for name, system in systems:
                rate, cpu = one_round(system, opts.messages)
                results[name].append((rate, cpu))
                print(f"round {r + 1} {name:8s} {rate:7.0f} msg/s accepted  "
                      f"{cpu:5.2f} ms CPU/msg (all processes)", flush=True)
        for name, rows in results.items():
            rates = sorted(x for x, _ in rows)
            cpus = sorted(y for _, y in rows)
            print(f"median   {name:8s} {rates[len(rates) // 2]:7.0f} msg/s accepted  "
                  f"{cpus[len(cpus) // 2]:5.2f} ms CPU/msg")
    finally:
        for _, system in systems:
            try:
                system.stop()
            except (RuntimeError, AssertionError) as exc:
                print(f"stop: {exc}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
