"""The master with real processes: a foreground master (own session) on a temporary
configuration with the test services of tests/services: on-demand spawn, respawn after a
kill, SIGHUP reload keeping the listener, solitary services across a reload, throttling,
SIGTERM leaving nothing behind, the second-master refusal and `qmgr-master` exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from tests.services.procs import (
    child_env,
    kill_session,
    log_lines,
    session_procs,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(60)

MASTER_CF = """\
echo   unix - - n - 2 tests.services.echo_agent
solo   unix - - n - 1 tests.services.echo_agent slow
bad    unix - - n - - tests.services.fail_agent
pickup fifo n n n 60 1 tests.services.trigger_agent
"""
MAIN_EXTRA = "service_throttle_time = 2s\n"


class Mail:
    """A temporary mail system: configuration, a foreground master, CLI calls."""

    def __init__(self, base: Path, master_cf: str = MASTER_CF, main_extra: str = "") -> None:
        self.base = base
        self.etc = write_config(base, master_cf, MAIN_EXTRA + main_extra)
        self.q = base / "q"
        self.pid_file = self.q / "pid" / "master.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sessions: list[int] = []

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-P", "-m", "master.cli", "-c", str(self.etc),
                               *args], check=False, env=child_env(), capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.base / "stderr", "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "master.cli", "-c", str(self.etc), "start",
                 "--foreground"], env=child_env(), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.sessions.append(self.proc.pid)
        wait_for(lambda: any("daemon started" in line for line in self.log()),
                 what="daemon started")
        return self.proc

    def log(self) -> list[str]:
        return log_lines(self.base)

    def children(self, service: str | None = None) -> list[psutil.Process]:
        assert self.proc is not None
        found = []
        for child in psutil.Process(self.proc.pid).children():
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                title = " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if service is None or f"qmgrd: {service}" in title or f"-n {service} " in title:
                found.append(child)
        return found

    def cleanup(self) -> None:
        for sid in self.sessions:
            kill_session(sid)
        if self.proc is not None:
            self.proc.wait(10)



@pytest.fixture
def mail(base: Path) -> Iterator[Mail]:
    system = Mail(base)
    yield system
    system.cleanup()


def _recv_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data.decode()


def ask(path: Path, text: str = "hello") -> list[str]:
    """One request to an echo service: [service, pid, generation, text].  Reads to EOF:
    the skeleton reports "idle" to the master before it closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(text.encode() + b"\n")
        data = b""
        while chunk := sock.recv(1024):
            data += chunk
        return data.decode().split()


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_on_demand_spawn_and_respawn_after_kill(mail: Mail) -> None:
    mail.start()
    # the wakeup timer fires at start: the pickup FIFO gets "W" and a child reads it
    triggers = mail.q / "pickup.triggers"
    wait_for(lambda: triggers.exists() and "b'W'" in triggers.read_text(), what="wakeup")
    assert mail.children("echo") == []  # nothing pre-forked
    first = ask(mail.q / "private" / "echo")
    assert first[0] == "echo" and first[2:] == ["1", "hello"]
    pid = int(first[1])
    assert [c.pid for c in mail.children("echo")] == [pid]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), what="killed child reaped")
    again = ask(mail.q / "private" / "echo")
    assert int(again[1]) != pid
    assert not any("echo: bad command startup" in line for line in mail.log())
    assert any(f"pid {pid} killed by signal 9" in line for line in mail.log())


def test_reload_keeps_listener_and_sweeps(mail: Mail) -> None:
    mail.start()
    echo = mail.q / "private" / "echo"
    old_pid = int(ask(echo)[1])
    (mail.etc / "master.cf").write_text(
        MASTER_CF.replace("bad    unix - - n - - tests.services.fail_agent\n",
                          "echo2  unix - - n - 2 tests.services.echo_agent\n"))
    assert mail.proc is not None
    mail.proc.send_signal(signal.SIGHUP)
    # every connection during and after the reload is accepted (never refused)
    replies = []
    while True:
        reply = ask(echo)
        replies.append(reply)
        if reply[2] == "2":
            break
        assert len(replies) < 500
    wait_for(lambda: any(f"reload -- version 0.1, configuration {mail.etc}" in line
                         for line in mail.log()), what="reload log")
    wait_for(lambda: gone(old_pid), what="old generation child exits")
    assert ask(mail.q / "private" / "echo2")[2] == "2"
    assert not (mail.q / "private" / "bad").exists()


def test_reload_reopens_a_rotated_maillog(mail: Mail) -> None:
    """Log rotation by rename: after the reload the master writes to a new maillog_file
    at the configured path (it used to go on writing to the renamed file)."""
    mail.start()
    rotated = mail.base / "maillog.1"
    os.rename(mail.base / "maillog", rotated)
    assert mail.proc is not None
    mail.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any("reload -- version" in line for line in mail.log()),
             what="the reload line in the new maillog")
    old = rotated.read_text(encoding="utf-8")
    assert "reload -- version" not in old and "daemon started" in old
    mail.proc.send_signal(signal.SIGTERM)
    mail.proc.wait(timeout=30)
    assert any("terminating on signal 15" in line for line in mail.log())
    assert "terminating" not in rotated.read_text(encoding="utf-8")


def test_solitary_service_across_reload(mail: Mail) -> None:
    mail.start()
    solo = str(mail.q / "private" / "solo")
    with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as b:
        a.settimeout(10)
        a.connect(solo)
        a.sendall(b"a\n")
        started = _recv_line(a).split()
        assert started[0] == "started" and started[2] == "1"
        assert mail.proc is not None
        mail.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any("reload --" in line for line in mail.log()), what="reload")
        b.connect(solo)
        b.sendall(b"b\n")
        b.settimeout(0.5)
        with pytest.raises(TimeoutError):
            b.recv(100)  # the old child still holds its request: no second child
        assert len(mail.children("solo")) == 1
        a.sendall(b"rest\n")
        assert _recv_line(a).split()[1:3] == [started[1], "1"]
        b.settimeout(10)
        b_started = _recv_line(b).split()
        assert b_started[0] == "started" and b_started[2] == "2"
        assert b_started[1] != started[1]
        b.sendall(b"rest\n")
        assert _recv_line(b).split()[2] == "2"


def test_failing_service_is_throttled_master_survives(mail: Mail) -> None:
    mail.start()
    marker = "bad: bad command startup -- throttling"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(mail.q / "private" / "bad"))  # waits in the backlog
        wait_for(lambda: sum(marker in line for line in mail.log()) >= 1, what="throttle")
        t1 = time.monotonic()
        wait_for(lambda: sum(marker in line for line in mail.log()) >= 2, what="2nd throttle")
        elapsed = time.monotonic() - t1
    assert elapsed > 1.0  # service_throttle_time = 2s between the two start-ups
    failures = [line for line in mail.log()
                if "process tests.services.fail_agent pid" in line and "exit status 1" in line]
    assert len(failures) == 2
    assert any(line.endswith("fatal: bad: this service cannot start") for line in mail.log())
    assert mail.proc is not None and mail.proc.poll() is None
    assert ask(mail.q / "private" / "echo")[0] == "echo"


def test_sigterm_leaves_no_process_behind(mail: Mail) -> None:
    proc = mail.start()
    ask(mail.q / "private" / "echo")
    with socket.socket(socket.AF_UNIX) as held:
        held.connect(str(mail.q / "private" / "solo"))
        held.sendall(b"x\n")
        held.settimeout(10)
        assert _recv_line(held).startswith("started")
        pids = [c.pid for c in mail.children()]
        assert len(pids) >= 3  # pickup, echo, solo
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: any("terminating on signal 15" in line for line in mail.log()),
                 what="terminating")
        held.sendall(b"rest\n")  # the request in hand is finished, then the child exits
        assert _recv_line(held).split()[0] == "solo"
        assert proc.wait(4) == 0  # well within the 5 s grace: nobody needed SIGKILL
    assert any("terminating on signal 15" in line for line in mail.log())
    assert all(gone(pid) for pid in pids)
    assert session_procs(proc.pid) == []
    assert not mail.pid_file.exists()


def test_second_master_refused_and_status(mail: Mail) -> None:
    proc = mail.start()
    content = mail.pid_file.read_text()
    assert content == f"{proc.pid:>32}\n"
    again = mail.cli("start", "--foreground")
    assert again.returncode == 1
    assert f"fatal: the qmgrd mail system is already running (pid {proc.pid})" in again.stderr
    # the master's own lock check, without the CLI's
    code = ("import sys; from master.daemon.master import run_master; "
            f"sys.exit(run_master({str(mail.etc)!r}, True))")
    direct = subprocess.run([sys.executable, "-P", "-c", code], check=False, env=child_env(),
                            capture_output=True, text=True, timeout=30)
    assert direct.returncode == 1
    assert f"fatal: the qmgrd mail system is already running (pid {proc.pid})" in direct.stderr
    assert mail.pid_file.read_text() == content and proc.poll() is None
    ask(mail.q / "private" / "echo")
    status = mail.cli("status")
    assert status.returncode == 0
    assert f"running: pid {proc.pid}" in status.stderr
    assert "master" in status.stdout and "echo" in status.stdout
    data = json.loads(mail.cli("status", "--json").stdout)
    assert data["running"] is True and data["pid"] == proc.pid
    services = {row["service"] for row in data["processes"]}
    assert {"master", "echo", "pickup"} <= services
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    down = mail.cli("status")
    assert down.returncode == 3 and "not running" in down.stderr


def test_bad_configuration_starts_nothing(base: Path) -> None:
    system = Mail(base, MASTER_CF + "oops unix - - n\n")
    try:
        result = system.cli("start")
        assert result.returncode == 1
        cf = system.etc / "master.cf"
        assert result.stderr.startswith(f"qmgr-master: fatal: {cf}, line 5: ")
        assert not system.q.exists()
    finally:
        system.cleanup()


def test_background_start_stop_reload(mail: Mail) -> None:
    """Each of start, reload and stop says one line naming the master, as postfix-script
    says "starting / refreshing / stopping the Postfix mail system"."""
    started = mail.cli("start")
    assert started.returncode == 0
    pid = int(mail.pid_file.read_text())
    mail.sessions.append(pid)  # setsid: the master leads its session
    assert started.stderr == f"qmgr-master: starting the qmgrd mail system (master pid {pid})\n"
    assert mail.cli("status").returncode == 0
    assert ask(mail.q / "private" / "echo")[2] == "1"
    reloaded = mail.cli("reload")
    assert reloaded.returncode == 0
    assert reloaded.stderr == (
        f"qmgr-master: refreshing the qmgrd mail system (master pid {pid})\n")
    wait_for(lambda: ask(mail.q / "private" / "echo")[2] == "2", what="reloaded generation")
    stopped = mail.cli("stop")
    assert stopped.returncode == 0
    assert stopped.stderr == f"qmgr-master: stopping the qmgrd mail system (master pid {pid})\n"
    assert gone(pid) and session_procs(pid) == []  # the master led its own session
    assert mail.cli("status").returncode == 3
    again = mail.cli("stop")
    assert again.returncode == 1 and "not running" in again.stderr
    assert mail.cli("reload").returncode == 1


def test_check_creates_queue_directories(base: Path) -> None:
    system = Mail(base)
    assert system.cli("check").returncode == 0
    modes = {p.name: p.stat().st_mode & 0o7777 for p in system.q.iterdir()}
    assert modes["maildrop"] == 0o1733 and modes["public"] == 0o755
    assert modes["incoming"] == 0o700 and modes["pid"] == 0o755 and len(modes) == 14
    assert (base / "data").is_dir()


def test_inet_service_on_loopback(base: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    system = Mail(base, f"127.0.0.1:{port} inet n - n - 2 tests.services.echo_agent\n")
    try:
        system.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"over tcp\n")
            data = b""
            while chunk := sock.recv(1024):
                data += chunk
        assert data.decode().split() == [f"127.0.0.1:{port}", data.split()[1].decode(), "1",
                                         "over", "tcp"]
    finally:
        system.cleanup()


def test_inet_service_on_two_addresses_gets_both_sockets(base: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    system = Mail(base, f"{port} inet n - n - 1 tests.services.echo_agent\n",
                  "inet_interfaces = 127.0.0.1, 127.0.0.2\n")
    try:
        system.start()
        pids = set()
        for host in ("127.0.0.1", "127.0.0.2", "127.0.0.1"):
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(b"hi\n")
                data = b""
                while chunk := sock.recv(1024):
                    data += chunk
            reply = data.decode().split()
            assert reply[0] == str(port) and reply[3] == "hi"
            pids.add(int(reply[1]))
        assert len(pids) == 1  # one child (maxproc 1) serves both addresses: -s 2
    finally:
        system.cleanup()
