"""tests.services.procs - helpers for the tests that run real qmgrd processes.

Bounded and hermetic (design.md §4 rule 9): every process runs in its own session, every
wait is a condition polled with a deadline, and kill_session() removes whatever a test
left behind (children of the master have their own process groups, but stay in the
master's session).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def child_env() -> dict[str, str]:
    """The environment for a child process: our sources first on PYTHONPATH, no
    inherited GENERATION / QMGRD_CONFIG_DIR."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GENERATION", "QMGRD_CONFIG_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)
    return env


MAIL_OWNER = "qmgrd"  # created by tests/conftest.py when the suite runs as root


def make_base() -> Path:
    """A fresh temporary directory that mail_owner can traverse (mode 0755; pytest's
    tmp_path lives under a 0700 directory).  Remove it with remove_base()."""
    base = Path(tempfile.mkdtemp(prefix="qmgrd-master-"))
    os.chmod(base, 0o755)
    return base


def remove_base(base: Path) -> None:
    """Remove a directory made by make_base()."""
    shutil.rmtree(base, ignore_errors=True)


def write_config(base: Path, master_cf: str, main_extra: str = "") -> Path:
    """Write ``base/etc/{main.cf,master.cf}`` with queue_directory ``base/q``, the log in
    ``base/maillog`` and mail_owner qmgrd; returns the configuration directory."""
    etc = base / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "main.cf").write_text(
        f"queue_directory = {base / 'q'}\n"
        f"data_directory = {base / 'data'}\n"
        f"maillog_file = {base / 'maillog'}\n"
        f"mail_owner = {MAIL_OWNER}\n" + main_extra, encoding="utf-8")
    (etc / "master.cf").write_text(master_cf, encoding="utf-8")
    return etc


def wait_for(cond: Callable[[], T | None], timeout: float = 10.0, what: str = "") -> T:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(0.02)


def log_lines(base: Path) -> list[str]:
    """The lines of ``base/maillog`` (empty if it does not exist yet)."""
    try:
        return (base / "maillog").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def session_procs(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of session ``sid``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (each process group of it)."""
    for proc in session_procs(sid):
        try:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        except OSError:
            continue
