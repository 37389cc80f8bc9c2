"""Test harness: a whole qmgrd mail system in a temporary directory, and SMTP peers.

MailSystem writes a config directory (main.cf + the bundled master.cf), starts the master
in the foreground as a subprocess in its own session, and offers sendmail/ctl helpers,
log access and condition waits with deadlines. stop() terminates it and checks with
psutil that no process of that config directory is left.

Peers: SmtpSink (Postfix's smtp-sink, dumping each transaction to a file) and
CaptureServer (tests/tools/capture_smtpd.py, aiosmtpd in its own process).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "corpus"
PY = sys.executable


def tool(name: str) -> str | None:
    """Path of a Postfix tool, or None. Under CI=true a missing tool fails the test."""
    for d in ("/usr/sbin", "/usr/bin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    found = shutil.which(name)
    if found is None and os.environ.get("CI") == "true":
        raise AssertionError(f"{name} is required when CI=true (install Debian's postfix)")
    return found


def require_tool(name: str) -> str:
    """Path of a tool; pytest.skip outside CI when missing, fail under CI."""
    import pytest

    p = tool(name)
    if p is None:
        pytest.skip(f"{name} not installed")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], object], timeout: float, what: str = "condition",
             interval: float = 0.05) -> object:
    """Poll ``cond`` until it returns a truthy value; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


DEFAULT_MAIN = {
    "myhostname": "mail.test.example",
    "mydomain": "test.example",
    "mydestination": "$myhostname, localhost",
    "local_recipient_maps": "",
    "queue_run_delay": "300s",
    "minimal_backoff_time": "300s",
    "maximal_backoff_time": "4000s",
    "smtp_connect_timeout": "5s",
    "smtp_helo_timeout": "10s",
    "daemon_timeout": "60s",
    "qmgr_ipc_timeout": "10s",
}


class MailSystem:
    """A qmgrd instance under ``root`` (see module docstring)."""

    def __init__(self, root: Path, main: dict[str, str] | None = None,
                 master_cf: str | None = None) -> None:
        self.root = root
        self.etc = root / "etc"
        self.spool = root / "spool"
        self.mail = root / "mail"
        self.maillog = root / "maillog"
        self.etc.mkdir(parents=True, exist_ok=True)
        params = dict(DEFAULT_MAIN)
        params.update(
            queue_directory=str(self.spool),
            data_directory=str(root / "lib"),
            maillog_file=str(self.maillog),
            mail_spool_directory=str(self.mail) + "/",
        )
        params.update(main or {})
        self.params = params
        self.write_main()
        text = master_cf if master_cf is not None else (REPO / "etc" / "master.cf").read_text()
        (self.etc / "master.cf").write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    def write_main(self, **changes: str) -> None:
        self.params.update(changes)
        (self.etc / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.params.items()))

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("QMGRD_CONFIG_DIR", None)
        return env

    def master(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(check=False, args=[PY, "-m", "master.cli", "-c", str(self.etc), *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env,
                              stdin=subprocess.DEVNULL)

    def start(self) -> None:
        with open(self.root / "master.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [PY, "-m", "master.cli", "-c", str(self.etc), "start", "--foreground"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True, env=self.env)
        wait_for(lambda: self.master("status").returncode == 0 or self.proc_dead(), 20,
                 "master to start")
        assert not self.proc_dead(), (self.root / "master.stderr").read_text()
        # qmgr and pickup are started by their first wakeup trigger.
        wait_for(lambda: self.children("qmgr"), 20, "qmgr to start")

    def proc_dead(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    @property
    def master_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def processes(self) -> list[psutil.Process]:
        """Every live process of this instance: the master runs in a session of its own
        (start_new_session) and its children stay in that session."""
        if self.proc is None:
            return []
        sid = self.proc.pid
        out = []
        for p in psutil.process_iter(["status"]):
            try:
                if p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if os.getsid(p.pid) == sid:
                    out.append(p)
            except (psutil.Error, OSError):
                continue
        return out

    def children(self, service: str) -> list[psutil.Process]:
        """Live children running ``service`` (title ``qmgrd: <service>``, or ``-n``)."""
        out = []
        for p in self.processes():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd[:1] == [f"qmgrd: {service}"] or " ".join(cmd) == f"qmgrd: {service}" or (
                    "-n" in cmd and cmd[cmd.index("-n") + 1:cmd.index("-n") + 2] == [service]):
                out.append(p)
        return out

    def stop(self, check: bool = True) -> None:
        """Stop the master; kill anything left; with ``check``, assert nothing was left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 10
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.processes()
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if check:
            assert not left, f"processes left behind: {[p.pid for p in left]}"

    def sendmail(self, *args: str, data: bytes, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(check=False, args=[PY, "-m", "qmgrd.sendmail", "-c", str(self.etc), *args],
                              input=data, capture_output=True, timeout=timeout, env=self.env)

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(check=False, args=[PY, "-m", "qmgrd.ctl.cli", "-c", str(self.etc), *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env,
                              stdin=subprocess.DEVNULL)

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queue_files(self, *queues: str) -> list[Path]:
        out: list[Path] = []
        for q in queues or ("maildrop", "incoming", "active", "deferred", "hold"):
            d = self.spool / q
            if d.exists():
                out += [p for p in d.rglob("*") if p.is_file()]
        return out

    def queue_empty(self) -> bool:
        return not self.queue_files()

    def maildir(self, user: str) -> list[Path]:
        d = self.mail / user / "new"
        return sorted(d.iterdir()) if d.exists() else []


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, dumping each transaction into ``dumpdir``."""

    def __init__(self, root: Path, extra: tuple[str, ...] = ()) -> None:
        self.bin = require_tool("smtp-sink")
        self.port = free_port()
        # smtp-sink runs as nobody when we are root: pytest's tmp_path (0700) is out of
        # its reach, so the dumps go to a world-writable directory of their own.
        self.dumpdir = Path(tempfile.mkdtemp(prefix=f"qmgrd-sink-{self.port}-"))
        os.chmod(self.dumpdir, 0o777)
        args = [self.bin, "-d", str(self.dumpdir) + "/%M.", "-h", "sink.test.example"]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        args += [*extra, f"127.0.0.1:{self.port}", "256"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._listening, 10, "smtp-sink to listen")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.recv(100)
            return True
        except OSError:
            return False

    def messages(self) -> list[bytes]:
        out = []
        for p in self.dumpdir.rglob("*"):
            if p.is_file():
                try:
                    out.append(p.read_bytes())
                except OSError:
                    continue
        return out

    def count(self) -> int:
        return sum(1 for p in self.dumpdir.rglob("*") if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dumpdir, ignore_errors=True)


class CaptureServer:
    """aiosmtpd in its own process; every message saved as raw bytes (see capture_smtpd.py).

    ``mode`` file in ``dir``: write "accept", "defer" (450 on RCPT) or "reject:<rcpt>"
    (550 for that recipient) to change its answers at run time.
    """

    def __init__(self, root: Path, mode: str = "accept") -> None:
        self.port = free_port()
        self.dir = root / f"capture-{self.port}"
        self.dir.mkdir(parents=True)
        self.set_mode(mode)
        with open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [PY, str(REPO / "tests" / "tools" / "capture_smtpd.py"), str(self.port),
                 str(self.dir)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)
        wait_for(self._listening, 15, "capture server to listen")

    def set_mode(self, mode: str) -> None:
        (self.dir / "mode").write_text(mode)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.recv(100)
            return True
        except OSError:
            return False

    def messages(self) -> list[tuple[str, list[str], bytes]]:
        """(sender, recipients, content bytes) per accepted message, in arrival order."""
        out = []
        for p in sorted(self.dir.glob("msg-*.eml")):
            env = (p.with_suffix(".env")).read_text().splitlines()
            out.append((env[0], env[1:], p.read_bytes()))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
