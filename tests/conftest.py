"""Suite-wide fixtures.

* every test starts with the process-wide log closed (stderr);
* as root, the ``qmgrd`` system account (mail_owner of the test configurations) exists
  for the whole session: created the way ``make run`` does when it is missing;
* ``mailsys(**kw)`` makes whole qmgrd instances (tests.harness.MailSystem) in a temporary
  directory that an unprivileged ``mail_owner`` can traverse (pytest's tmp_path is 0700,
  which matters when the suite runs as root and children drop privileges), stopped at
  teardown;
* ``peers.sink(*args)`` / ``peers.capture(mode)`` start SMTP peers on 127.0.0.1;
* ``confdir``: a main.cf (queue_directory, myhostname mx.example.org) and its queue
  directories in tmp_path, for the qmgr-sendmail tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from master import log
from qmgrd.spool.queue import Spool
from tests.harness import CaptureServer, MailSystem, MakeSystem, ScenarioSetup, SmtpSink
from tests.services.procs import make_base, remove_base
from tests.tools.scenario_smtpd import Scenario

MAIL_OWNER = "qmgrd"


@pytest.fixture(scope="session", autouse=True)
def _mail_owner_account() -> None:
    """As root: make sure the mail_owner account of the tests exists (CI's fresh machine
    has none).  Not root: nothing to do (everything runs as the invoking user)."""
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                        "/nonexistent", "--shell", "/usr/sbin/nologin", MAIL_OWNER],
                       check=True, capture_output=True, timeout=60)


@pytest.fixture(autouse=True)
def _reset_log() -> Iterator[None]:
    log.close()
    yield
    log.close()


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    (tmp_path / "main.cf").write_text(
        f"queue_directory = {tmp_path}/q\nmyhostname = mx.example.org\n")
    Spool(str(tmp_path / "q")).make_dirs()
    return tmp_path


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item (``item.rep_call``), for fixtures' teardown."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


LOG_TAIL = 80  # lines of each system's mail log shown when a test fails


@pytest.fixture
def mailsys(request: pytest.FixtureRequest) -> Iterator[Callable[..., MailSystem]]:
    """Factory of private qmgrd instances, stopped at teardown. When the test failed, the
    last LOG_TAIL lines of each instance's mail log (and the master's stderr) are printed
    in teardown, so that a failure seen once (a flake in CI) shows what the system did."""
    base = Path(tempfile.mkdtemp(prefix="qmgrd-test-"))
    os.chmod(base, 0o755)
    systems: list[MailSystem] = []

    def make(**kw: Any) -> MailSystem:
        ms = MailSystem(base / f"ms{len(systems)}", **kw)
        os.chmod(ms.root, 0o755)
        systems.append(ms)
        return ms

    yield make
    rep = getattr(request.node, "rep_call", None)
    for ms in systems:
        if rep is not None and rep.failed:
            print(f"--- {ms.root}: the last {LOG_TAIL} lines of the mail log")
            print("\n".join(ms.log().splitlines()[-LOG_TAIL:]))
            err = ms.root / "master.stderr"
            if err.exists():
                print(f"--- {err}")
                print(err.read_text(errors="replace")[-4000:])
        ms.stop(check=False)
    shutil.rmtree(base, ignore_errors=True)


class Peers:
    """Factory of SMTP peers; everything made is stopped at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[SmtpSink | CaptureServer] = []

    def sink(self, *extra: str) -> SmtpSink:
        s = SmtpSink(self.root, extra)
        self.made.append(s)
        return s

    def capture(self, mode: str = "accept") -> CaptureServer:
        c = CaptureServer(self.root, mode)
        self.made.append(c)
        return c


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    p = Peers(tmp_path)
    yield p
    for peer in p.made:
        peer.stop()


@pytest.fixture
def base() -> Iterator[Path]:
    """A fresh 0755 temporary directory for a test master (tests.services.procs)."""
    path = make_base()
    yield path
    remove_base(path)


@pytest.fixture
def scenario(mailsys: MakeSystem, tmp_path: Path) -> Iterator[ScenarioSetup]:
    """setup(behaviours, **main) -> (started MailSystem, Scenario peer): one
    tests/tools/scenario_smtpd.py peer with a port per behaviour, and a mail system whose
    ``transport_maps`` (texthash) routes each behaviour's name (a domain) to its port."""
    made: list[Scenario] = []

    def setup(behaviours: dict[str, str], routes: dict[str, str] | None = None,
              **main: str) -> tuple[MailSystem, Scenario]:
        """``routes``: extra domains routed to the port of a behaviour's name."""
        scen = Scenario(tmp_path / f"scenario{len(made)}", behaviours)
        made.append(scen)
        ms = mailsys(main=main)
        table = ms.etc / "transport"
        table.write_text(scen.transport_lines() + "".join(
            f"{d} smtp:[127.0.0.1]:{scen.ports[n]}\n" for d, n in (routes or {}).items()))
        ms.write_main(transport_maps=f"texthash:{table}")
        ms.start()
        return ms, scen

    yield setup
    for s in made:
        s.stop()
