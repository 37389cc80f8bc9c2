"""qmgr-master start and a long start-up repair (real processes): the master runs
qmgr-ctl repair to its end before any service starts (as postfix start runs postsuper),
however long it takes. It reports the repair as running to the waiting qmgr-master start
(``repairing <pid>`` every second after the first), so start waits for it past
START_TIMEOUT and then reports the start truthfully; a stop meanwhile ends the repair
and the master (nothing orphaned, nothing started). The repair is made slow by a
sitecustomize module on PYTHONPATH that sleeps in ``qmgrd.ctl ... repair`` only."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from tests.services.procs import child_env, session_procs, wait_for
from tests.test_master_cli import System

pytestmark = pytest.mark.timeout(90)

#: qmgr-master start's wait for the master's next report, shortened from 10 s with
#: QMGRD_START_TIMEOUT (well above the 1 s between two reports of a running repair)
START_TIMEOUT = 4.0


def slow_repair(base: Path, seconds: float) -> str:
    """A directory for PYTHONPATH whose sitecustomize makes qmgr-ctl repair take
    ``seconds`` longer (before it starts its work)."""
    site = base / "slow-repair"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys, time\n"
        "if sys.orig_argv[-1:] == ['repair'] and 'qmgrd.ctl' in sys.orig_argv:\n"
        f"    time.sleep({seconds})\n")
    return str(site)


def repair_procs(system: System) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "qmgrd.ctl" in cmd and cmd[-1:] == ["repair"] and str(system.etc) in cmd:
            found.append(proc)
    return found


@pytest.fixture
def system(base: Path) -> Iterator[System]:
    made = System(base)
    yield made
    made.cleanup()


def test_start_waits_for_a_repair_longer_than_the_start_timeout(system: System) -> None:
    site = slow_repair(system.base, START_TIMEOUT + 2)
    began = time.monotonic()
    result = system.cli("start", pythonpath=site,
                        env_extra={"QMGRD_START_TIMEOUT": f"{START_TIMEOUT:g}"})
    took = time.monotonic() - began
    pid = int((system.q / "pid" / "master.pid").read_text())
    system.sessions.append(pid)
    assert result.returncode == 0, result.stderr
    assert took > START_TIMEOUT  # it did wait for the repair
    assert "fatal" not in result.stderr
    said = result.stderr.splitlines()
    assert said[0] == f"qmgr-master: starting the qmgrd mail system (master pid {pid})"
    assert said[1].startswith("qmgr-master: waiting for the queue structure check "
                              "(qmgr-ctl repair, pid ")
    assert system.grep("daemon started")
    assert system.cli("status").returncode == 0
    assert system.echo().endswith(" ping\n")  # the services run
    assert system.cli("stop").returncode == 0
    assert not session_procs(pid)


def test_stop_during_the_start_up_repair_ends_it_and_the_master(system: System) -> None:
    site = slow_repair(system.base, 60)
    env = child_env()
    env["PYTHONPATH"] += ":" + site
    with open(system.base / "start.stderr", "wb") as err:
        start = subprocess.Popen(
            [sys.executable, "-P", "-m", "master.cli", "-c", str(system.etc), "start"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: repair_procs(system), what="the start-up repair")
        pid = int((system.q / "pid" / "master.pid").read_text())
        system.sessions.append(pid)
        repair = repair_procs(system)[0]
        stop = system.cli("stop")
        assert stop.returncode == 0, stop.stderr
        assert start.wait(20) == 1
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    said = (system.base / "start.stderr").read_text()
    assert "qmgr-master: fatal: stopped by signal 15 during the queue structure check " \
        "(qmgr-ctl repair), before any service started\n" in said, said
    try:  # gone, or a zombie not reaped yet (which may happen between two looks)
        assert repair.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass
    assert not session_procs(pid)
    assert system.grep("terminating on signal 15 during the queue structure check "
                       f"(qmgr-ctl repair pid {repair.pid} ended; the next start runs it "
                       "again)")
    assert not system.grep("daemon started")
    assert system.cli("status").returncode == 3
