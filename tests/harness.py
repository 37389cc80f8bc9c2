"""Test harness: a whole qmgrd mail system in a temporary directory, and SMTP peers.

MailSystem writes a config directory (main.cf + the bundled master.cf), starts the master
in the foreground as a subprocess in its own session, and offers sendmail/ctl helpers,
log access and condition waits with deadlines. stop() terminates it and checks with
psutil that no process of that config directory is left.

Peers: SmtpSink (Postfix's smtp-sink, dumping each transaction to a file) and
CaptureServer (tests/tools/capture_smtpd.py, aiosmtpd in its own process).

Load and process helpers (issue-3 acceptance tests): spawn_sendmail / inject_many (parallel
qmgr-sendmail runs, blocking) and Injector (the same, advanced step by step with pump() so
a test can kill, reload and sample while mail flows); message_ids() (Message-ID tags in
delivered messages); service_of() / ProcSampler (which service a process runs; the
largest number of processes of a service seen alive at one instant); LogCursor (log lines
written after a point, by service and pid); session_report() (orphans and zombies of an
instance's session).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORT_LOW = 10000


def free_port() -> int:
    """A loopback TCP port free now, chosen at random below the kernel's ephemeral
    range: a port from bind(0) lies in that range, where any outgoing connection of the
    suite (smtp agents, clients) may take it as its source port before the test's
    server binds it ("address already in use", seen in a full run)."""
    high = _ephemeral_low() - 1
    for _ in range(50):
        port = random.randint(_PORT_LOW, high) if high > _PORT_LOW else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], object], timeout: float, what: str = "condition",
             interval: float = 0.05, error: type[Exception] = AssertionError) -> object:
    """Poll ``cond`` every ``interval`` s until it returns a truthy value (returned);
    ``error`` (AssertionError) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


DEFAULT_MAIN = {
    "myhostname": "mail.test.example",
    "mydomain": "test.example",
    "mydestination": "$myhostname, localhost",
    "local_recipient_maps": "",
    "alias_maps": "",  # not the system's /etc/aliases
    "queue_run_delay": "300s",
    "minimal_backoff_time": "300s",
    "maximal_backoff_time": "4000s",
    "smtp_connect_timeout": "5s",
    "smtp_helo_timeout": "10s",
    "daemon_timeout": "60s",
    "qmgr_ipc_timeout": "10s",
    "mail_owner": "qmgrd",
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
        # the bundled smtpd listens on 127.0.0.1:2525: give each instance a port of its own
        text = text.replace("\n127.0.0.1:2525 ", f"\n127.0.0.1:{free_port()} ")
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
        return subprocess.run(check=False, args=[PY, "-m", "qmgrd.ctl", "-c", str(self.etc), *args],
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
        terminate(self.proc)
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
            try:
                env = (p.with_suffix(".env")).read_text().splitlines()
            except FileNotFoundError:
                continue  # its envelope is renamed into place after the content: not yet
            out.append((env[0], env[1:], p.read_bytes()))
        return out

    def stop(self) -> None:
        terminate(self.proc)


# --------------------------------------------------------------------------- load helpers
MakeSystem = Callable[..., MailSystem]  # the type of the ``mailsys`` fixture


def terminate(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM ``proc`` if it still runs, wait up to ``grace`` s (0: SIGKILL at once),
    then SIGKILL and reap; its stdout pipe, if any, is closed."""
    if proc.poll() is None:
        if grace > 0:
            proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def spawn_sendmail(ms: MailSystem, args: list[str], data: bytes) -> subprocess.Popen[bytes]:
    """Start one qmgr-sendmail run with ``data`` on its stdin (already closed)."""
    p = subprocess.Popen([PY, "-m", "qmgrd.sendmail", "-c", str(ms.etc), *args],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=ms.env)
    assert p.stdin is not None
    p.stdin.write(data)
    p.stdin.close()
    return p


class Injector:
    """Parallel qmgr-sendmail runs, ``parallel`` at a time, advanced by pump().

    ``jobs`` is a list of (sendmail args, message bytes).  Nothing runs in the background
    between pump() calls except the sendmail processes themselves.  ``failures`` collects
    (args, exit code, stderr) of runs that did not exit 0; ``done`` counts finished runs.
    """

    def __init__(self, ms: MailSystem, jobs: Iterable[tuple[list[str], bytes]],
                 parallel: int = 8) -> None:
        self.ms = ms
        self.pending: deque[tuple[list[str], bytes]] = deque(jobs)
        self.total = len(self.pending)
        self.parallel = parallel
        self.running: list[tuple[list[str], subprocess.Popen[bytes]]] = []
        self.done = 0
        self.failures: list[tuple[list[str], int, bytes]] = []

    def _finish(self, args: list[str], p: subprocess.Popen[bytes]) -> None:
        err = p.stderr.read() if p.stderr else b""
        if p.stderr:
            p.stderr.close()
        if p.returncode != 0:
            self.failures.append((args, p.returncode, err))
        self.done += 1

    def pump(self) -> bool:
        """Collect finished runs, start new ones; True once every job has finished."""
        still = []
        for args, p in self.running:
            if p.poll() is None:
                still.append((args, p))
            else:
                self._finish(args, p)
        self.running = still
        while self.pending and len(self.running) < self.parallel:
            args, data = self.pending.popleft()
            self.running.append((args, spawn_sendmail(self.ms, args, data)))
        return not self.pending and not self.running

    def finish(self, timeout: float = 120) -> None:
        """pump() until every job has finished (AssertionError after ``timeout`` s)."""
        wait_for(self.pump, timeout, f"{self.total} qmgr-sendmail runs", interval=0.02)

    def close(self) -> None:
        """Kill what still runs (test teardown on failure)."""
        for args, p in self.running:
            if p.poll() is None:
                p.kill()
            p.wait()
            self._finish(args, p)
        self.running = []


def inject_many(ms: MailSystem, jobs: list[tuple[list[str], bytes]], parallel: int = 8) -> None:
    """Run qmgr-sendmail for each (args, data), ``parallel`` at a time; all must exit 0."""
    inj = Injector(ms, jobs, parallel)
    try:
        inj.finish()
    finally:
        inj.close()
    assert not inj.failures, inj.failures[:3]


def message_ids(blobs: Iterable[bytes], tag: str, top_only: bool = True) -> Counter[str]:
    """Count ``Message-ID: <ID@tag>`` headers (case-insensitive name) per ID in ``blobs``.

    ``top_only``: look at each message's own header section only (a delivered message);
    False: anywhere in it (a bounce notice counts for the message whose headers it quotes).
    """
    pat = re.compile(rb"^Message-ID:\s*<([^@>\s]+)@" + re.escape(tag.encode()) + rb">",
                     re.IGNORECASE | re.MULTILINE)
    out: Counter[str] = Counter()
    for blob in blobs:
        if top_only:
            blob = re.split(rb"\r?\n\r?\n", blob, maxsplit=1)[0]
        for m in set(pat.findall(blob)):
            out[m.decode()] += 1
    return out


def wait_delivered(ms: MailSystem, cond: Callable[[], object], timeout: float, what: str,
                   flush_every: float = 2.0, pump: Callable[[], object] | None = None) -> None:
    """wait_for(cond), running ``qmgr-ctl flush`` at most every ``flush_every`` s while
    mail sits in deferred/ or incoming/ (mail deferred by a killed agent is retried at
    once instead of after minimal_backoff_time); ``pump`` is called on every poll."""
    last = [time.monotonic()]

    def check() -> object:
        if pump is not None:
            pump()
        if cond():
            return True
        now = time.monotonic()
        if now - last[0] >= flush_every and ms.queue_files("deferred", "incoming"):
            last[0] = now
            ms.ctl("flush")
        return False

    wait_for(check, timeout, what, interval=0.1)


def maildir_messages(ms: MailSystem, user: str | None = None) -> list[bytes]:
    """The bytes of every message in ``<mail>/<user>/new`` (every user when None)."""
    out = []
    users = [user] if user else ([d.name for d in ms.mail.iterdir()] if ms.mail.exists()
                                 else [])
    for u in users:
        for p in ms.maildir(u):
            try:
                out.append(p.read_bytes())
            except OSError:
                continue
    return out


# --------------------------------------------------------------------------- processes
def service_of(p: psutil.Process) -> str | None:
    """The master.cf service a qmgrd child runs: from its title ``qmgrd: <service>``, its
    ``-n <service>`` argument, or (zombies) the kernel's process name; None if unknown."""
    try:
        cmd = p.cmdline()
    except psutil.ZombieProcess:
        cmd = []
    except psutil.Error:
        return None
    if cmd:
        joined = " ".join(cmd)
        if joined.startswith("qmgrd: "):
            rest = joined[len("qmgrd: "):].split()
            return rest[0] if rest else None
        if "-n" in cmd[:-1]:
            return str(cmd[cmd.index("-n") + 1])
        return None
    try:
        name = str(p.name())
    except psutil.Error:
        return None
    return name[len("qmgrd: "):] if name.startswith("qmgrd: ") else None


class ProcSampler:
    """Samples the children of one master: the most processes of ``service`` (zombies
    included: the master counts a child until it has reaped it) alive at one instant.

    A sample lists the master's children, then checks that each is still the same process
    (pid and create time); those that pass existed together at the moment the re-check
    began, so a child that ended and was replaced during the listing is never counted
    twice.
    """

    def __init__(self, master_pid: int, service: str) -> None:
        self.master = psutil.Process(master_pid)
        self.service = service
        self.max_seen = 0
        self.samples = 0
        self.pids: set[int] = set()

    def _children(self) -> list[psutil.Process]:
        pid = self.master.pid
        try:  # Linux: the kernel's list of children, much cheaper than a /proc scan
            with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            return list(self.master.children())
        out = []
        for child in pids:
            try:
                out.append(psutil.Process(child))
            except psutil.Error:
                continue
        return out

    def sample(self) -> int:
        """Take one sample; returns the count (also folded into max_seen, pids)."""
        try:
            kids = self._children()
        except psutil.Error:
            return 0
        listed = []
        for p in kids:
            if service_of(p) == self.service:
                try:
                    listed.append((p, p.create_time()))
                except psutil.Error:
                    continue
        alive = 0
        for p, created in listed:
            try:
                if psutil.Process(p.pid).create_time() == created:
                    alive += 1
                    self.pids.add(p.pid)
            except psutil.Error:
                continue
        self.samples += 1
        self.max_seen = max(self.max_seen, alive)
        return alive


def session_report(ms: MailSystem) -> dict[str, list[tuple[int, int, str]]]:
    """The processes of the instance's session that break the process tree rule:
    ``orphans`` (not the master, parent not the master) and ``zombies``; each as
    (pid, ppid, command line or name)."""
    out: dict[str, list[tuple[int, int, str]]] = {"orphans": [], "zombies": []}
    if ms.proc is None:
        return out
    sid = ms.proc.pid
    for p in psutil.process_iter(["status", "ppid"]):
        try:
            if os.getsid(p.pid) != sid or p.pid == sid:
                continue
            try:
                what = " ".join(p.cmdline()) or p.name()
            except psutil.ZombieProcess:
                what = p.name()
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                out["zombies"].append((p.pid, p.info["ppid"], what))
            elif p.info["ppid"] != sid:
                out["orphans"].append((p.pid, p.info["ppid"], what))
        except (psutil.Error, OSError):
            continue
    return out


class LogCursor:
    """Reads the maillog from a byte offset on: ``lines()`` are those written after the
    cursor was made (or last moved with ``mark()``)."""

    LINE = re.compile(r"^\S+ +\d+ [\d:]+ \S+ ([^\s\[]+)\[(\d+)\]: (.*)$")

    def __init__(self, ms: MailSystem) -> None:
        self.ms = ms
        self.offset = self._size()

    def _size(self) -> int:
        try:
            return self.ms.maillog.stat().st_size
        except FileNotFoundError:
            return 0

    def mark(self) -> None:
        self.offset = self._size()

    def lines(self) -> list[str]:
        try:
            with open(self.ms.maillog, "rb") as f:
                f.seek(self.offset)
                return f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def by(self, program: str) -> list[tuple[int, str]]:
        """(pid, message) of the lines logged by ``<syslog_name>/<program>`` since the mark
        (the program: the module's name, whatever the service's, as Postfix logs)."""
        out = []
        for line in self.lines():
            m = self.LINE.match(line)
            if m and m.group(1).rpartition("/")[2] == program:
                out.append((int(m.group(2)), m.group(3)))
        return out


# --------------------------------------------------------------------------- queue filling
def fill_deferred(ms: MailSystem, sender: str, recipients: list[str], *, tag: str = "bulk",
                  age: float = 3600.0, timeout: float = 120) -> list[str]:
    """Put one message per recipient straight into ``deferred/``, due now; returns the ids.

    The files are written by the project's own writer (qmgrd.spool.cleanup.Cleanup, the
    same records as any queued mail) into a staging queue directory on the same file
    system, then renamed into ``<queue_directory>/deferred/<hash>/`` with their mtime
    (the next-attempt time, postfix.md §4.9) an hour ahead, so that a deferred scan
    while they are being written takes none of them; once all are in place every mtime
    is set one second in the past, so the next deferred scan takes them all. Their
    arrival (create_time) is ``age`` seconds ago, as for mail that has waited in the
    queue. The work runs in a child process that, as root,
    becomes the owner of ``deferred/`` (the mail_owner) before it writes anything, so the
    qmgr owns and reads the files as it would its own. Message ``i`` has
    ``Message-ID: <{tag}{i}@{tag}>``. The qmgr is not told (send trigger ``D`` to
    ``public/qmgr`` to scan at once). Start the system first (the queue directories must
    exist). Raises AssertionError if the writer fails.
    """
    import json as _json

    deferred = ms.spool / "deferred"
    st = deferred.stat()
    staging = Path(tempfile.mkdtemp(prefix="fill-", dir=ms.root))
    spec = staging / "spec.json"
    spec.write_text(_json.dumps({"etc": str(ms.etc), "staging": str(staging),
                                 "deferred": str(deferred), "sender": sender,
                                 "recipients": recipients, "tag": tag, "age": age,
                                 "uid": st.st_uid, "gid": st.st_gid}))
    if os.geteuid() == 0 and st.st_uid != 0:
        os.chown(staging, st.st_uid, st.st_gid)
    code = "import sys; from tests.harness import _fill_worker; _fill_worker(sys.argv[1])"
    r = subprocess.run([PY, "-c", code, str(spec)],
                       capture_output=True, text=True, timeout=timeout, cwd=str(REPO),
                       env=ms.env, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = [line for line in r.stdout.split() if line]
    shutil.rmtree(staging, ignore_errors=True)
    assert len(ids) == len(recipients), (len(ids), r.stderr[-2000:])
    return ids


def _fill_worker(spec_path: str) -> None:
    """fill_deferred's child: writes the messages, prints one queue id a line."""
    import json as _json

    from master import log
    from master.config import Config
    from qmgrd.spool.cleanup import Cleanup
    from qmgrd.spool.envelope import Envelope, Recipient
    from qmgrd.spool.queue import Spool

    spec = _json.loads(Path(spec_path).read_text())
    cfg = Config.load(spec["etc"])
    real = Spool.from_config(cfg)
    staging = Spool(spec["staging"], cfg.get_list("hash_queue_names"),
                    cfg.get_int("hash_queue_depth"))
    log.setup("fill", os.devnull)  # Cleanup's per-message info lines are of no interest
    cleanup = Cleanup(cfg, staging)
    if os.geteuid() == 0 and spec["uid"] != 0:
        # Become the queue owner once everything is loaded (the interpreter itself may
        # live where the mail_owner cannot read), as the master's children do.
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
    staging.make_dirs()
    arrival = time.time() - float(spec["age"])
    sec, usec = int(arrival), int(arrival % 1 * 1_000_000)
    later = time.time() + 3600
    tag = spec["tag"]
    out = []
    for i, rcpt in enumerate(spec["recipients"]):
        content = f"Subject: {tag} {i}\nMessage-ID: <{tag}{i}@{tag}>\n\nbody {i}\n".encode()
        qid = cleanup.submit(Envelope(spec["sender"], [Recipient(rcpt)], arrival=(sec, usec)),
                             content)
        src = staging.path("incoming", qid)
        os.utime(src, (later, later))
        dst = real.path("deferred", qid)
        os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
        os.rename(src, dst)
        out.append(qid)
    due = time.time() - 1
    for qid in out:
        os.utime(real.path("deferred", qid), (due, due))
    sys.stdout.write("\n".join(out) + "\n")


# --------------------------------------------------------------------- scenario peers
if TYPE_CHECKING:
    from tests.tools.scenario_smtpd import Scenario

# the type of the ``scenario`` fixture (tests/conftest.py): setup(behaviours, **main)
# -> (a started MailSystem routing each behaviour's domain to its port, the peer)
ScenarioSetup = Callable[..., "tuple[MailSystem, Scenario]"]


def ctl_status(ms: MailSystem) -> dict[str, Any]:
    """``qmgr-ctl status --json`` of ``ms`` (it must succeed)."""
    r = ms.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]
