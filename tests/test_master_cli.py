"""`qmgr-master` and configuration problems (real processes): start refuses bad values,
bad -o overrides, unknown ports and busy endpoints with `fatal: <file>, line <n>: ...`
and starts nothing; reload checks both files before signalling (exit 1, the master keeps
its configuration, also when signalled directly); status and stop work on a broken
main.cf; duplicate services are warned about; a child's configuration error is one
clean fatal line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.procs import (
    child_env,
    kill_session,
    log_lines,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(60)

MASTER_CF = "echo   unix - - n - 2 tests.services.echo_agent\n"


class System:
    """A configuration under ``base`` and the masters started on it."""

    def __init__(self, base: Path, master_cf: str = MASTER_CF, main_extra: str = "") -> None:
        self.base = base
        self.etc = write_config(base, master_cf, main_extra)
        self.main = self.etc / "main.cf"
        self.master_cf = self.etc / "master.cf"
        self.good_main = self.main.read_text()
        self.q = base / "q"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sessions: list[int] = []

    def cli(self, *args: str, pythonpath: str = "",
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = child_env() | (env_extra or {})
        if pythonpath:
            env["PYTHONPATH"] += os.pathsep + pythonpath
        return subprocess.run([sys.executable, "-P", "-m", "master.cli", "-c", str(self.etc),
                               *args], check=False, env=env, capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)

    def start(self, pythonpath: str = "") -> int:
        """A foreground master in its own session; returns its pid once started."""
        env = child_env()
        if pythonpath:
            env["PYTHONPATH"] += os.pathsep + pythonpath
        with open(self.base / "stderr", "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "master.cli", "-c", str(self.etc), "start",
                 "--foreground"], env=env, start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.sessions.append(self.proc.pid)
        wait_for(lambda: self.grep("daemon started"), what="daemon started")
        return self.proc.pid

    def grep(self, text: str) -> list[str]:
        return [line for line in log_lines(self.base) if text in line]

    def echo(self) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.q / "private" / "echo"))
            sock.sendall(b"ping\n")
            data = b""
            while chunk := sock.recv(1024):
                data += chunk
        return data.decode()

    def cleanup(self) -> None:
        try:  # a background master (also one that should not have started)
            self.sessions.append(int((self.q / "pid" / "master.pid").read_text()))
        except (OSError, ValueError):
            pass
        for sid in self.sessions:
            kill_session(sid)
        if self.proc is not None:
            self.proc.wait(10)



@pytest.fixture
def system(base: Path) -> Iterator[System]:
    made = System(base)
    yield made
    made.cleanup()


@pytest.mark.parametrize("line,what", [
    ("maximal_queue_lifetime = 5q", 'bad time value for parameter maximal_queue_lifetime: "5q"'),
    ("qmgr_message_active_limit = lots",
     'bad numerical value for parameter qmgr_message_active_limit: "lots"'),
    ("myhostname = $myhostname",
     "expansion loop in parameter myhostname: myhostname -> myhostname"),
])
def test_start_refuses_bad_main_cf_value(system: System, line: str, what: str) -> None:
    system.main.write_text(system.good_main + line + "\n")
    result = system.cli("start")
    assert result.returncode == 1
    assert result.stderr == f"qmgr-master: fatal: {system.main}, line 5: {what}\n"
    assert not system.q.exists() and log_lines(system.base) == []  # nothing started


@pytest.mark.parametrize("value,why", [
    ("deferred, defer, maildrop",
     "maildrop cannot be hashed (pickup reads maildrop/ without hash directories)"),
    ("deffered", ('"deffered" is not a queue directory that can be hashed (incoming, '
                  "active, deferred, hold, corrupt, bounce, defer, trace)")),
])
@pytest.mark.parametrize("command", ["start", "reload", "check"])
def test_start_reload_check_refuse_a_hash_queue_names_pickup_cannot_use(
        system: System, command: str, value: str, why: str) -> None:
    """maildrop in hash_queue_names would make pickup look for maildrop files in hash
    directories qmgr-sendmail never writes (Postfix's pickup reads maildrop flat too),
    and a name that is no queue directory hashes nothing: start, reload and check
    refuse it, naming main.cf's line, and nothing is started or created."""
    system.main.write_text(system.good_main + f"hash_queue_names = {value}\n")
    result = system.cli(command)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"qmgr-master: fatal: {system.main}, line 5: bad hash_queue_names parameter "
        f'value "{value}": {why}')
    assert not system.q.exists()


@pytest.mark.parametrize("extra,what", [
    ("relay unix - - n - - tests.services.echo_agent -o max_idle=soon",
     '-o max_idle=soon: bad time value for parameter max_idle: "soon"'),
    ("inet1 inet n - n - - tests.services.echo_agent",
     'unknown service port "inet1" in inet service "inet1"'),
    ("mine unix - - n - - tests.services.no_such_agent",
     'command "tests.services.no_such_agent": no module named tests.services.no_such_agent'),
])
@pytest.mark.parametrize("command", ["start", "check"])
def test_start_and_check_refuse_bad_service(system: System, extra: str, what: str,
                                            command: str) -> None:
    """A bad master.cf line is refused by start and by check (Postfix's ``postfix check``
    reads master.cf too), naming file and line; nothing is created."""
    system.master_cf.write_text(MASTER_CF + extra + "\n")
    result = system.cli(command)
    assert result.returncode == 1
    assert result.stderr.startswith(f"qmgr-master: fatal: {system.master_cf}, line 2: {what}")
    assert not system.q.exists()


@pytest.mark.parametrize("command", ["start", "check"])
def test_start_and_check_name_every_bad_master_cf_line_at_once(system: System,
                                                                command: str) -> None:
    """Pasting a stock Postfix master.cf: one run lists every line of a Postfix program
    qmgrd lacks, not one per run (a fresh-eyes finding: 15 attempts); nothing starts."""
    system.master_cf.write_text(MASTER_CF + "cleanup unix n - y - 0 cleanup\n"
                                "postlog unix-dgram n - n - 1 postlogd\n")
    result = system.cli(command)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert [ln.split(": ", 2)[1] for ln in lines] == ["fatal", "fatal"], lines
    assert lines[0].startswith(f"qmgr-master: fatal: {system.master_cf}, line 2: "
                               'command "cleanup"')
    assert lines[1].startswith(f"qmgr-master: fatal: {system.master_cf}, line 3: "
                               'command "postlogd"')
    assert not system.q.exists()


def test_busy_endpoint_names_master_cf_line(system: System) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        system.master_cf.write_text(
            MASTER_CF + f"127.0.0.1:{port} inet n - n - - tests.services.echo_agent\n")
        result = system.cli("start")
    assert result.returncode == 1
    expected = (f"fatal: {system.master_cf}, line 2: cannot open endpoint 127.0.0.1:{port}: "
                "Address already in use")
    # the master was forked ("starting ..."), then refused the busy endpoint
    said = result.stderr.splitlines()
    assert said[0].startswith("qmgr-master: starting the qmgrd mail system (master pid ")
    assert said[1:] == [f"qmgr-master: {expected}"]
    assert any(line.endswith(expected) for line in log_lines(system.base))


def test_duplicate_service_is_warned_about(system: System) -> None:
    system.master_cf.write_text(MASTER_CF + "# again\necho unix - - n - 1 "
                                "tests.services.echo_agent\n")
    warning = f"warning: {system.master_cf}, line 3: duplicate service echo/unix, overrides line 1"
    result = system.cli("start")
    pid = int((system.q / "pid" / "master.pid").read_text())
    system.sessions.append(pid)
    assert result.returncode == 0 and result.stderr == (
        f"qmgr-master: {warning}\n"
        f"qmgr-master: starting the qmgrd mail system (master pid {pid})\n")
    assert len(system.grep(warning)) == 1
    assert system.cli("stop").returncode == 0


def test_reload_checks_the_configuration_before_signalling(system: System) -> None:
    system.start()
    generation = system.echo().split()[2]
    cases = [
        (system.main, system.good_main + "maximal_queue_lifetime = 5q\n",
         f"{system.main}, line 5: bad time value for parameter maximal_queue_lifetime"),
        (system.main, system.good_main + "broken line\n",
         f"{system.main}, line 5: missing '=' after parameter name"),
        (system.master_cf, MASTER_CF + "oops unix -\n",
         f"{system.master_cf}, line 2: too few fields (3 of at least 8)"),
        (system.master_cf, MASTER_CF + "x unix - - n - - tests.services.echo_agent "
         "-o max_use=none\n", f"{system.master_cf}, line 2: -o max_use=none: bad numerical"),
    ]
    for path, text, what in cases:
        good = path.read_text()
        path.write_text(text)
        result = system.cli("reload")
        assert result.returncode == 1, what
        assert result.stderr.startswith(f"qmgr-master: fatal: {what}")
        path.write_text(good)
    assert system.grep("reload") == []  # the master was never signalled
    assert system.echo().split()[2] == generation
    assert system.cli("reload").returncode == 0
    wait_for(lambda: system.grep("reload -- version"), what="reload")
    assert system.echo().split()[2] != generation


def test_direct_sighup_with_bad_value_keeps_configuration(system: System) -> None:
    pid = system.start()
    generation = system.echo().split()[2]
    system.main.write_text(system.good_main + "maximal_queue_lifetime = 5q\n")
    os.kill(pid, signal.SIGHUP)
    kept = wait_for(lambda: system.grep("reload failed"), what="reload failure")
    assert kept[0].endswith(
        f"warning: reload failed, keeping the current configuration: {system.main}, line 5:"
        ' bad time value for parameter maximal_queue_lifetime: "5q"')
    assert not system.grep("reload -- version")
    assert system.echo().split()[2] == generation


def test_maillog_file_that_cannot_be_opened(system: System) -> None:
    """A maillog_file in a directory that does not exist (a typo; mail_owner's home,
    meant not to exist): no directory is made for it, as Postfix's postlogd makes none.
    start and check refuse it naming main.cf's line (exit 1); a reload is refused by
    the master, which keeps its configuration and its log and says so there, and
    qmgr-master reload exits 1 with the reason."""
    missing = system.base / "nonexistent"
    bad = missing / "dir" / "maillog"
    good_line = f"maillog_file = {system.base / 'maillog'}\n"
    assert system.good_main.splitlines()[2] + "\n" == good_line
    bad_main = system.good_main.replace(good_line, f"maillog_file = {bad}\n")
    problem = (f'{system.main}, line 3: cannot open maillog_file "{bad}": No such file '
               f"or directory (its directory {bad.parent} does not exist; it is not "
               "created)")
    system.main.write_text(bad_main)
    for command in ("start", "check"):
        result = system.cli(command)
        assert result.returncode == 1, (command, result.stderr)
        assert result.stderr.splitlines()[-1] == f"qmgr-master: fatal: {problem}"
        assert not missing.exists()
    system.main.write_text(system.good_main)
    system.start()
    generation = system.echo().split()[2]
    system.main.write_text(bad_main)
    result = system.cli("reload")
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "qmgr-master: fatal: the master refused the reload and keeps its configuration: "
        f"{problem}")
    (kept,) = system.grep("reload failed")
    assert kept.endswith(f"warning: reload failed, keeping the current configuration: "
                         f"{problem}")
    assert not missing.exists()
    assert system.echo().split()[2] == generation
    system.main.write_text(system.good_main)  # the old log still gets the master's lines
    assert system.cli("reload").returncode == 0
    wait_for(lambda: system.grep("reload -- version"), what="reload")


def test_status_and_stop_work_with_a_broken_main_cf(system: System) -> None:
    assert system.cli("start").returncode == 0  # in the background: stop reaps nothing
    pid = int((system.q / "pid" / "master.pid").read_text())
    system.sessions.append(pid)
    system.main.write_text(system.good_main + "broken line\n")
    status = system.cli("status")
    assert status.returncode == 0
    assert status.stderr.startswith(f"qmgr-master: warning: {system.main}, line 5: missing")
    assert f"running: pid {pid}" in status.stderr
    assert system.cli("stop").returncode == 0
    assert system.cli("status").returncode == 3
    system.main.write_text(system.good_main + "queue_directory = $queue_directory\n")
    unknown = system.cli("status")
    assert unknown.returncode == 1 and "cannot find the queue directory" in unknown.stderr


def test_child_config_error_is_one_fatal_line(system: System) -> None:
    (system.q / "private").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "tests.services.echo_agent", "-c", str(system.etc), "-n",
         "echo", "-t", "unix", "-o", "daemon_timeout=soon", "-l", str(system.q / "e.sock")],
        env=child_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
        check=False)
    assert proc.returncode == 1
    lines = log_lines(system.base)
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        'fatal: -o daemon_timeout=soon: bad time value for parameter daemon_timeout: "soon"')


def test_reload_reports_the_masters_own_verdict(system: System, tmp_path: Path) -> None:
    """The master checks the files again in its own environment: a transport module the
    reloading shell can import but the master cannot is refused by the master, and
    qmgr-master reload says so (exit 1) instead of reporting success."""
    mods = tmp_path / "mods"
    (mods / "reload_only").mkdir(parents=True)
    (mods / "reload_only" / "__init__.py").write_text("")
    (mods / "reload_only" / "here.py").write_text("")
    pid = system.start()
    good = system.master_cf.read_text()
    system.master_cf.write_text(good + "mine unix - - n - - reload_only.here\n")
    result = system.cli("reload", pythonpath=str(mods))
    assert result.returncode == 1, result.stderr
    assert "the master refused the reload and keeps its configuration" in result.stderr
    assert 'command "reload_only.here": no module named reload_only' in result.stderr
    assert system.grep("reload failed, keeping the current configuration")
    system.master_cf.write_text(good)
    result = system.cli("reload")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ("qmgr-master: refreshing the qmgrd mail system (master pid "
                             f"{pid})\n")
    assert system.grep("reload -- version")


def test_reload_leaves_the_module_check_to_the_master(system: System, tmp_path: Path) -> None:
    """A transport module that only the master can import (it was started with the
    PYTHONPATH the module needs, the reloading shell was not) is accepted: the master
    judges the modules in its own environment. A syntax error is still caught first."""
    mods = tmp_path / "mods"
    (mods / "master_only").mkdir(parents=True)
    (mods / "master_only" / "__init__.py").write_text("")
    (mods / "master_only" / "agent.py").write_text("")
    pid = system.start(pythonpath=str(mods))
    generation = system.echo().split()[2]
    good = system.master_cf.read_text()
    system.master_cf.write_text(good + "mine unix - - n - - master_only.agent\n")
    result = system.cli("reload")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ("qmgr-master: refreshing the qmgrd mail system (master pid "
                             f"{pid})\n")
    wait_for(lambda: system.grep("reload -- version"), what="reload")
    assert system.echo().split()[2] != generation
    system.master_cf.write_text(good + "mine unix - - n - - master_only.agent -o x\n")
    result = system.cli("reload")
    assert result.returncode == 1 and "line 2" in result.stderr, result.stderr
    system.master_cf.write_text(good)


@pytest.mark.parametrize("log_typo", [False, True])
def test_start_refuses_a_mistyped_queue_directory_and_creates_nothing(
        tmp_path: Path, log_typo: bool) -> None:
    """queue_directory (and maillog_file) under a directory that does not exist: start
    fails naming the parameter, and neither path is created (making the log's
    directories would have made the typo's parent exist)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "master.cf").write_text(MASTER_CF)
    typo = tmp_path / "tpyo"
    log = typo / "log" if log_typo else tmp_path
    (etc / "main.cf").write_text(f"queue_directory = {typo}/spool\n"
                                 f"maillog_file = {log}/maillog\n")
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-P", "-m", "master.cli", "-c", str(etc),
                               *args], check=False, env=child_env(), capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)

    result = cli("start")
    if result.returncode == 0:  # a regression started a master: do not leave it running
        cli("stop")
    assert result.returncode == 1
    if log_typo:  # the configuration check finds the log first
        assert f'line 2: cannot open maillog_file "{log}/maillog"' in result.stderr
    else:
        assert f"queue_directory {typo}/spool: parent directory {typo} does not exist" \
            in result.stderr
    assert not typo.exists()


def _master_cli(etc: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """qmgr-master -c etc args, run in ``cwd``; a master it started by mistake is
    stopped again."""
    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-P", "-m", "master.cli", "-c", str(etc),
                               *argv], check=False, env=child_env(), capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=cwd)

    result = cli(*args)
    if args == ("start",) and result.returncode == 0:  # a regression: do not leave it
        cli("stop")
    return result


@pytest.mark.parametrize("command", ["start", "status", "stop", "reload", "check"])
@pytest.mark.parametrize("setting,shown,why", [
    ("queue_directory =", '""', "empty; it must be an absolute path"),
    ("queue_directory = q", '"q"', "not an absolute path"),
    ("queue_directory = $spool_base", '"" (from "$spool_base")',
     "empty; it must be an absolute path"),
])
def test_empty_or_relative_queue_directory_is_fatal(tmp_path: Path, command: str,
                                                    setting: str, shown: str,
                                                    why: str) -> None:
    """Every qmgr-master command names main.cf and the line of an empty or relative
    queue_directory (Postfix: an empty one is fatal) and works nowhere relative to the
    directory it was started in."""
    etc = write_config(tmp_path, MASTER_CF)
    main = etc / "main.cf"
    main.write_text("".join(line + "\n" for line in main.read_text().splitlines()
                            if not line.startswith("queue_directory"))
                    + f"# the queue\n{setting}\n")
    line = len(main.read_text().splitlines())
    result = _master_cli(etc, tmp_path, command)
    problem = f"{main}, line {line}: bad queue_directory parameter value {shown}: {why}"
    if command in ("status", "stop"):  # they also read a broken main.cf, then give up
        problem = f"cannot find the queue directory: {problem}"
    assert (result.returncode, result.stderr) == (1, f"qmgr-master: fatal: {problem}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etc"]  # nothing made here


@pytest.mark.parametrize("command,name,value", [
    ("start", "data_directory", "data"), ("reload", "data_directory", "data"),
    ("check", "data_directory", "data"),  # check makes data_directory
    ("start", "maillog_file", "log/maillog"), ("reload", "maillog_file", "log/maillog"),
])
def test_relative_data_directory_or_maillog_file_is_fatal(tmp_path: Path, command: str,
                                                          name: str, value: str) -> None:
    """A relative data_directory or maillog_file is refused by start and reload (and a
    relative data_directory by check, which makes it), naming main.cf and its line;
    nothing is made relative to the directory the command runs in (the master would
    lock, or log to, a file that depends on it)."""
    etc = write_config(tmp_path, MASTER_CF)
    main = etc / "main.cf"
    main.write_text("".join(line + "\n" for line in main.read_text().splitlines()
                            if not line.startswith(name)) + f"{name} = {value}\n")
    line = len(main.read_text().splitlines())
    result = _master_cli(etc, tmp_path, command)
    problem = f'{main}, line {line}: bad {name} parameter value "{value}": not an absolute path'
    assert (result.returncode, result.stderr) == (1, f"qmgr-master: fatal: {problem}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etc"]  # nothing made here


@pytest.mark.parametrize("command", ["start", "reload"])
def test_bad_relayhost_is_fatal(tmp_path: Path, command: str) -> None:
    """A relayhost port out of range stops start and reload, naming main.cf's line."""
    etc = write_config(tmp_path, MASTER_CF, "relayhost = [relay.example]:99999\n")
    line = len((etc / "main.cf").read_text().splitlines())
    result = _master_cli(etc, tmp_path, command)
    problem = (f'{etc}/main.cf, line {line}: bad relayhost parameter value '
               '"[relay.example]:99999": bad port number "99999" (1-65535)')
    assert (result.returncode, result.stderr) == (1, f"qmgr-master: fatal: {problem}\n")


@pytest.mark.parametrize("command", ["status", "stop", "reload"])
def test_missing_queue_directory_is_said_plainly(tmp_path: Path, command: str) -> None:
    """No queue directory is not "the qmgrd mail system is not running" (status's exit
    3): the directory is named, exit 1."""
    etc = write_config(tmp_path, MASTER_CF)  # queue_directory tmp_path/q, not made
    result = _master_cli(etc, tmp_path, command)
    assert (result.returncode, result.stderr) == (
        1, f"qmgr-master: fatal: queue directory {tmp_path}/q: No such file or directory\n")
    (tmp_path / "q").mkdir()
    result = _master_cli(etc, tmp_path, command)
    assert result.stderr == "qmgr-master: the qmgrd mail system is not running\n"
    assert result.returncode == (3 if command == "status" else 1)


def test_reload_reports_a_new_service_that_could_not_start(system: System) -> None:
    """A service added by reload whose port is taken: the master keeps the rest of the
    new configuration, and qmgr-master reload says which service it could not start
    (exit 1) instead of reporting success."""
    system.start()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        good = system.master_cf.read_text()
        system.master_cf.write_text(
            good + f"127.0.0.1:{port} inet n - n - - tests.services.echo_agent\n")
        result = system.cli("reload")
    assert result.returncode == 1, result.stderr
    assert "the master reloaded, but could not start: 127.0.0.1:" in result.stderr
    assert "Address already in use" in result.stderr
    system.master_cf.write_text(good)
    assert system.cli("reload").returncode == 0


OPEN_RELAY = ("in parameter smtpd_relay_restrictions or smtpd_recipient_restrictions, "
              "specify at least one working instance of: reject_unauth_destination, "
              "defer_unauth_destination, reject, defer or defer_if_permit")


def _smtpd_line(options: str = "") -> str:
    """A master.cf smtpd service on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port} inet n - n - - smtpd{options}\n"


def _greeting(service: str) -> bytes:
    """The first reply line of the smtpd at master.cf service ``host:port``."""
    host, _, port = service.partition(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.settimeout(20)
        return sock.makefile("rb").readline()


@pytest.mark.parametrize("main_extra,options,where", [
    ("smtpd_relay_restrictions = permit_mynetworks, bogus_restriction\n", "", "main.cf, line 5"),
    ("", " -o smtpd_relay_restrictions=permit_mynetworks",
     "master.cf, line 2: -o smtpd_relay_restrictions=permit_mynetworks"),
])
def test_start_refuses_an_smtpd_without_a_relay_guard(system: System, main_extra: str,
                                                      options: str, where: str) -> None:
    """An smtpd whose relay and recipient restrictions hold no reject_unauth_destination
    (or another guard) would exit fatal at every start, with no file or line, while the
    master throttles it and clients hang: start refuses first, naming where to fix it."""
    system.main.write_text(system.good_main + main_extra)
    system.master_cf.write_text(MASTER_CF + _smtpd_line(options))
    result = system.cli("start")
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"qmgr-master: fatal: {system.etc}/{where}: {OPEN_RELAY}\n"
    assert not system.q.exists() and log_lines(system.base) == []  # nothing started


@pytest.mark.parametrize("main_extra", [
    "",  # the default relay list ends in defer_unauth_destination
    "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n",
])
def test_reload_refuses_an_smtpd_without_a_relay_guard(system: System,
                                                       main_extra: str) -> None:
    """A guarded configuration starts and its smtpd greets; a reload to a main.cf
    without a guard is refused with main.cf's line, the master is not signalled and
    smtpd still greets."""
    system.main.write_text(system.good_main + main_extra)
    smtpd = _smtpd_line()
    system.master_cf.write_text(MASTER_CF + smtpd)
    system.start()
    service = smtpd.split()[0]
    assert _greeting(service).startswith(b"220 ")
    guarded = system.main.read_text()
    system.main.write_text(system.good_main + "smtpd_relay_restrictions = permit_mynetworks\n")
    result = system.cli("reload")
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"qmgr-master: fatal: {system.main}, line 5: {OPEN_RELAY}\n"
    assert system.grep("reload") == []  # the master was never signalled
    assert _greeting(service).startswith(b"220 ")
    system.main.write_text(guarded)
    assert system.cli("reload").returncode == 0
    wait_for(lambda: system.grep("reload -- version"), what="reload")


@pytest.mark.parametrize("made", [True, False], ids=["new-dir-exists", "new-dir-missing"])
def test_queue_directory_changed_while_running(system: System, made: bool) -> None:
    """main.cf's queue_directory edited while the master runs: status, stop, reload and
    start no longer disagree ("not running" / "already running") but all name the
    running master, its queue_directory and what to do (exit 1); with the old value
    back, status finds it again."""
    pid = system.start()
    new = system.base / "q2"
    if made:
        new.mkdir()
    system.main.write_text(system.good_main.replace(f"queue_directory = {system.q}",
                                                    f"queue_directory = {new}"))
    said = (f"qmgr-master: fatal: the qmgrd mail system is running (master pid {pid}) "
            f"with queue_directory {system.q}, not main.cf's {new} (changed while it "
            f"ran?): put queue_directory = {system.q} back to stop or reload it, then "
            "change it\n")
    for command in ("status", "stop", "reload", "start"):
        result = system.cli(command)
        assert (result.returncode, result.stderr) == (1, said), (command, result.stderr)
    assert system.proc is not None and system.proc.poll() is None
    system.main.write_text(system.good_main)
    assert system.cli("status").returncode == 0
    system.proc.send_signal(signal.SIGTERM)  # our child: `stop` would wait on a zombie
    assert system.proc.wait(15) == 0


@pytest.mark.parametrize("also_data", [False, True], ids=["queue", "queue-and-data"])
def test_config_refuses_a_queue_directory_change_while_running(
        system: System, also_data: bool) -> None:
    """qmgr-ctl config queue_directory=... while the master runs: reload would refuse
    the result (the master runs with another queue_directory), so config refuses it
    before writing anything, with reload's message and exit 78 (EX_CONFIG); also when
    data_directory changes with it (reload would not even find the master). main.cf is
    unchanged and status still finds the master."""
    pid = system.start()
    new = system.base / "q2"
    new.mkdir()
    changes = [f"queue_directory={new}"]
    if also_data:
        changes.append(f"data_directory={system.base / 'd2'}")
    result = subprocess.run(
        [sys.executable, "-P", "-m", "qmgrd.ctl", "-c", str(system.etc), "config", *changes],
        check=False, env=child_env(), capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stderr) == (78, (
        f"qmgr-ctl: fatal: not changed: the qmgrd mail system is running (master pid "
        f"{pid}) with queue_directory {system.q}, not main.cf's {new} (changed while it "
        f"ran?): put queue_directory = {system.q} back to stop or reload it, then "
        "change it\n")), result.stderr
    assert system.main.read_text() == system.good_main
    assert system.cli("status").returncode == 0


def test_reload_and_stop_of_a_stopped_master_exit_75(system: System) -> None:
    """A master stopped with SIGSTOP gives no verdict: reload warns "no answer from the
    master" and exits 75 (outcome unknown), not 0; stop, whose master is not gone in
    time, exits 75 too. Once continued, the pending SIGTERM ends it. (The waits are
    shortened to 1 s with QMGRD_RELOAD_TIMEOUT and QMGRD_STOP_TIMEOUT: a stopped master
    answers no sooner after 10 or 15 s.)"""
    pid = system.start()
    os.kill(pid, signal.SIGSTOP)
    try:
        result = system.cli("reload", env_extra={"QMGRD_RELOAD_TIMEOUT": "1"})
        assert result.returncode == 75, result.stderr
        assert f"warning: no answer from the master (pid {pid}) within 1s" in result.stderr
        result = system.cli("stop", env_extra={"QMGRD_STOP_TIMEOUT": "1"})
        assert result.returncode == 75, result.stderr
        assert "warning: still running after 1s: " in result.stderr
    finally:
        os.kill(pid, signal.SIGCONT)
    assert system.proc is not None
    system.proc.wait(15)


def test_the_waits_can_be_shortened_from_the_environment(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """QMGRD_START_TIMEOUT / QMGRD_STOP_TIMEOUT / QMGRD_RELOAD_TIMEOUT (seconds) replace
    the defaults; unset or empty: the default; not a positive number: a warning and the
    default."""
    from master.cli import RELOAD_TIMEOUT, START_TIMEOUT, STOP_TIMEOUT, _timeout

    assert (START_TIMEOUT, STOP_TIMEOUT, RELOAD_TIMEOUT) == (10.0, 15.0, 10.0)
    monkeypatch.delenv("QMGRD_STOP_TIMEOUT", raising=False)
    assert _timeout("STOP_TIMEOUT", STOP_TIMEOUT) == 15.0
    monkeypatch.setenv("QMGRD_STOP_TIMEOUT", "")
    assert _timeout("STOP_TIMEOUT", STOP_TIMEOUT) == 15.0
    monkeypatch.setenv("QMGRD_STOP_TIMEOUT", "2.5")
    assert _timeout("STOP_TIMEOUT", STOP_TIMEOUT) == 2.5
    assert capsys.readouterr().err == ""
    for bad in ("soon", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("QMGRD_STOP_TIMEOUT", bad)
        assert _timeout("STOP_TIMEOUT", STOP_TIMEOUT) == 15.0
        assert capsys.readouterr().err == (
            f"qmgr-master: warning: ignoring QMGRD_STOP_TIMEOUT={bad!r}: not a positive "
            "number of seconds; using 15\n")


def test_a_huge_start_timeout_is_waited_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """QMGRD_START_TIMEOUT=1e300 is a positive, finite number of seconds: start waits
    for the master's report as with any other value (select() takes at most
    SELECT_SLICE at a time: 1e300 s overflowed its time_t, an OverflowError traceback
    after ``starting the qmgrd mail system``)."""
    from master.cli import _wait_started

    monkeypatch.setenv("QMGRD_START_TIMEOUT", "1e300")
    r, w = os.pipe()
    try:
        os.write(w, b"ok\n")
        assert _wait_started(r, os.getpid()) == 0
    finally:
        os.close(r)
        os.close(w)
    assert capsys.readouterr().err == ""


def test_a_start_not_reported_in_time_exits_75_not_fatal(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """No report within QMGRD_START_TIMEOUT while the master still runs: the outcome is
    not known yet (the master goes on starting in the background), so start warns,
    names ``qmgr-master status`` and exits 75 (EX_TEMPFAIL), as stop and reload do when
    their wait ends - not "fatal" and 1. A master that exited without a report is
    still a failure (1)."""
    from master.cli import EX_TEMPFAIL, _wait_started

    monkeypatch.setenv("QMGRD_START_TIMEOUT", "0.2")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a master that is still starting: says nothing until killed
        os.close(r)
        signal.pause()
        os._exit(0)
    try:
        assert _wait_started(r, pid) == EX_TEMPFAIL == 75
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    err = capsys.readouterr().err
    assert err == (f"qmgr-master: warning: the master (pid {pid}) did not report start-up "
                   "within 0.2s; it is still starting: see its log, and check with "
                   "'qmgr-master status'\n")
    pid = os.fork()
    if pid == 0:  # a master that exits without a report
        os.close(r)
        os.close(w)
        os._exit(3)
    try:
        os.close(w)
        assert _wait_started(r, pid) == 1
    finally:
        os.close(r)
    assert capsys.readouterr().err == (
        "qmgr-master: fatal: the master exited during start-up (status 3)\n")


def test_check_names_an_unused_main_cf_parameter(system: System) -> None:
    """check warns about a main.cf parameter nothing reads (a misspelt name), naming the
    line, as postconf's "unused parameter"; it is a warning: check goes on, exit 0."""
    lines = system.good_main.count("\n")
    system.main.write_text(system.good_main + "mydestinatoin = foo\n")
    result = system.cli("check")
    assert result.returncode == 0, result.stderr
    assert (f"qmgr-master: warning: {system.main}, line {lines + 1}: unused parameter: "
            "mydestinatoin=foo") in result.stderr.splitlines()
    assert system.q.exists()
