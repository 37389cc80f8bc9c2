"""tests.services.fork_probe - what a child forked by master.daemon.forkspawn starts with.

Run as ``__main__`` (by forkspawn or ``python -m``): writes a JSON report to the path in
``sys.argv[1]`` - open descriptors, process group, signal dispositions and mask,
``GENERATION``, ``sys.argv``, the ``__main__`` module's name and spec - then exits 7.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _disposition(sig: signal.Signals) -> str:
    handler = signal.getsignal(sig)
    if handler is signal.SIG_DFL:
        return "default"
    if handler is signal.SIG_IGN:
        return "ignore"
    if handler is signal.default_int_handler:
        return "python-int"
    return "handler"


def main() -> None:
    spec = sys.modules["__main__"].__spec__
    report = {
        "fds": sorted(int(n) for n in os.listdir("/proc/self/fd")),
        "pgid_is_pid": os.getpgid(0) == os.getpid(),
        "signals": {s.name: _disposition(s) for s in (signal.SIGTERM, signal.SIGHUP,
                                                        signal.SIGCHLD, signal.SIGPIPE,
                                                        signal.SIGXFSZ, signal.SIGINT)},
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "wakeup_fd": signal.set_wakeup_fd(-1),
        "generation": os.environ.get("GENERATION"),
        "env_marker": os.environ.get("FORK_PROBE_MARKER"),
        "argv": sys.argv[1:],
        "main_name": __name__,
        "spec": spec.name if spec is not None else None,
    }
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)
    sys.exit(7)


if __name__ == "__main__":
    main()
