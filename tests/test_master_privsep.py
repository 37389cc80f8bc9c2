"""Privilege separation with real processes (root only; CI runs as root): a chroot+unpriv
test service really runs in queue_directory as mail_owner and cannot regain root, an
unpriv one runs as mail_owner outside a chroot, an ``unpriv n`` one as root; the
endpoints belong to mail_owner; ``status --json`` shows all of it; ``start`` refuses an
unknown or privileged mail_owner; ``check`` repairs the tree; a master started by a normal
user runs everything as that user after one warning."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from tests.services.procs import (
    MAIL_OWNER,
    child_env,
    kill_session,
    log_lines,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation needs root")]

MASTER_CF = """\
jail   unix - - y - 1 tests.services.jail_agent
plain  unix - - n - 1 tests.services.jail_agent
rooted unix - n n - 1 tests.services.jail_agent
"""


class Master:
    """A foreground master on a configuration under ``base`` (own session)."""

    def __init__(self, base: Path, master_cf: str = MASTER_CF, main_extra: str = "") -> None:
        self.base = base
        self.etc = write_config(base, master_cf, main_extra)
        self.q = base / "q"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-P", "-m", "master.cli", "-c", str(self.etc),
                               *args], check=False, env=child_env(), capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL, user=user)

    def start(self, user: int | None = None, group: int | None = None,
              python: str = sys.executable, env: dict[str, str] | None = None) -> None:
        with open(self.base / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [python, "-P", "-m", "master.cli", "-c", str(self.etc), "start",
                 "--foreground"], env=env or child_env(), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                user=user, group=group, extra_groups=[] if user is not None else None)
        wait_for(lambda: any("daemon started" in line for line in log_lines(self.base))
                 or self.proc is None or self.proc.poll() is not None, what="daemon started")
        assert self.proc.poll() is None, (self.base / "stderr").read_text()

    def stop(self) -> None:
        if self.proc is not None:
            kill_session(self.proc.pid)
            self.proc.wait(10)



@pytest.fixture
def master(base: Path) -> Iterator[Master]:
    m = Master(base)
    yield m
    m.stop()


def ask(path: Path) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"who\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    result: dict[str, object] = json.loads(data)
    return result


def test_jail_uid_root_and_no_way_back(master: Master) -> None:
    master.start()
    owner = pwd.getpwnam(MAIL_OWNER)
    q = os.path.realpath(master.q)
    jailed = ask(master.q / "private" / "jail")
    assert jailed["uids"] == [owner.pw_uid] * 3 and jailed["gids"] == [owner.pw_gid] * 3
    assert jailed["groups"] == [] and jailed["setuid0"] == "denied"
    assert jailed["cwd"] == "/" and jailed["queue_directory"] == "/"
    assert jailed["root_listing"] == sorted(os.listdir(q))  # "/" is the queue directory
    # pre_jail ran before the chroot, with the full path, in the queue directory
    assert jailed["pre_jail_queue_directory"] == str(master.q)
    assert jailed["pre_jail_cwd"] == q and "private" in jailed["pre_jail_listing"]  # type: ignore[operator]
    pid = int(str(jailed["pid"]))
    assert os.readlink(f"/proc/{pid}/root") == q
    assert tuple(psutil.Process(pid).uids()) == (owner.pw_uid,) * 3

    plain = ask(master.q / "private" / "plain")
    assert plain["uids"] == [owner.pw_uid] * 3 and plain["setuid0"] == "denied"
    assert plain["queue_directory"] == str(master.q) and plain["cwd"] == q
    assert os.readlink(f"/proc/{plain['pid']}/root") == "/"
    rooted = ask(master.q / "private" / "rooted")
    assert rooted["uids"] == [0, 0, 0] and os.readlink(f"/proc/{rooted['pid']}/root") == "/"

    for name in ("jail", "plain", "rooted"):
        st = (master.q / "private" / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (owner.pw_uid, owner.pw_gid,
                                                               0o666)
    assert not any("imported after the jail" in line for line in log_lines(master.base))
    assert (master.base / "maillog").stat().st_mode & 0o7777 == 0o644

    data = json.loads(master.cli("status", "--json").stdout)
    assert data["running"] is True and data["master"]["mail_owner"] == MAIL_OWNER
    services = {svc["name"]: svc for svc in data["services"]}
    [row] = services["jail"]["processes"]
    assert (row["pid"], row["uid"], row["root"], row["chrooted"]) == (pid, owner.pw_uid, q,
                                                                      True)
    assert (row["state"], row["uses"]) == ("idle", 1)
    assert (services["jail"]["maxproc"], services["jail"]["type"]) == (1, "unix")
    assert services["jail"]["throttled_until"] is None
    [root_row] = services["rooted"]["processes"]
    assert (root_row["uid"], root_row["chrooted"]) == (0, False)
    masters = [p for p in data["processes"] if p["service"] == "master"]
    assert masters[0]["pid"] == master.proc.pid and masters[0]["uid"] == 0  # type: ignore[union-attr]
    text = master.cli("status")
    assert text.returncode == 0
    assert any(line.split()[:1] == ["jail"] and str(pid) in line and q in line
               for line in text.stdout.splitlines())


@pytest.mark.parametrize(("owner", "what"), [
    ("nosuchuser", "unknown user name value: nosuchuser"),
    ("root", "user root has privileged user ID"),
])
def test_start_refuses_bad_mail_owner(base: Path, owner: str, what: str) -> None:
    m = Master(base, main_extra=f"mail_owner = {owner}\n")
    lines = (m.etc / "main.cf").read_text().split("\n")
    n = max(i + 1 for i, line in enumerate(lines) if line.startswith("mail_owner"))
    message = f"{m.etc}/main.cf, line {n}: parameter mail_owner: {what}"
    for args in (("start",), ("start", "--foreground"), ("check",)):
        result = m.cli(*args)
        assert result.returncode == 1, args
        *before, last = result.stderr.splitlines()
        assert last == f"qmgr-master: fatal: {message}", args
        # main_extra sets mail_owner a second time: start names the line it overrides
        assert all("overriding earlier entry: mail_owner=" in line for line in before), args
    assert not m.q.exists()
    # the master's own check, without the CLI's
    code = ("import sys; from master.daemon.master import run_master; "
            f"sys.exit(run_master({str(m.etc)!r}, True))")
    direct = subprocess.run([sys.executable, "-P", "-c", code], check=False, env=child_env(),
                            capture_output=True, text=True, timeout=30)
    assert direct.returncode == 1 and f"fatal: {message}" in direct.stderr
    assert any(line.endswith(f"fatal: {message}") for line in log_lines(base))
    assert not (m.q / "pid" / "master.pid").exists()


def test_check_repairs_the_tree(master: Master) -> None:
    owner = pwd.getpwnam(MAIL_OWNER)
    first = master.cli("check")
    assert first.returncode == 0 and "created" in first.stderr
    os.chown(master.q / "active", 0, 0)
    os.chmod(master.q / "public", 0o711)
    again = master.cli("check")
    assert again.returncode == 0
    assert again.stderr.splitlines() == [
        f"qmgr-master: fixed {master.q / 'public'}: mode 0711 -> 0755",
        f"qmgr-master: fixed {master.q / 'active'}: owner 0:0 -> {owner.pw_uid}:"
        + str(owner.pw_gid)]
    assert master.cli("check").stderr == ""
    # start runs the same check and logs what it fixed
    os.chmod(master.q / "maildrop", 0o755)
    master.start()
    assert any(line.endswith(f"fixed {master.q / 'maildrop'}: mode 0755 -> 1733")
               for line in log_lines(master.base))


def _python_for(uid: int, gid: int) -> tuple[str, dict[str, str]] | None:
    """An interpreter (and environment) with which that user can run our code: ours, or
    else the system's python3 of the same version with our venv's site-packages (ours
    may live where the user cannot go, e.g. under /root)."""
    site = next((p for p in sys.path if p.endswith("site-packages")), "")
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    env = child_env()
    candidates = [(sys.executable, env),
                  (system, {**env, "PYTHONPATH": env["PYTHONPATH"] + os.pathsep + site})]
    for python, penv in candidates:
        try:
            probe = subprocess.run([python, "-P", "-c", "import master.cli"], check=False,
                                   env=penv, capture_output=True, timeout=30, user=uid,
                                   group=gid, extra_groups=[])
        except OSError:
            continue  # not there, or not for this user
        if probe.returncode == 0:
            return python, penv
    return None


def test_started_by_a_normal_user(base: Path) -> None:
    owner = pwd.getpwnam(MAIL_OWNER)
    found = _python_for(owner.pw_uid, owner.pw_gid)
    if found is None:
        pytest.skip(f"no interpreter that {MAIL_OWNER} may run our code with")
    m = Master(base, main_extra="mail_owner = nosuchuser\n")  # not needed, not looked up
    for path in (base, m.etc):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    try:
        m.start(user=owner.pw_uid, group=owner.pw_gid, python=found[0], env=found[1])
        jailed = ask(m.q / "private" / "jail")
        assert jailed["uids"] == [owner.pw_uid] * 3 and jailed["queue_directory"] == str(m.q)
        assert os.readlink(f"/proc/{jailed['pid']}/root") == "/"  # chroot y ignored
        warnings = [line for line in log_lines(base) if "not started as root" in line]
        assert len(warnings) == 1 and f"user {MAIL_OWNER} (uid {owner.pw_uid})" in warnings[0]
        assert (m.q / "pid").stat().st_uid == owner.pw_uid
    finally:
        m.stop()
    assert "not started as root" in (base / "stderr").read_text()
