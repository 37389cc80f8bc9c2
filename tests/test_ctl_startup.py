"""What ``qmgr-ctl`` loads when it starts (issue 8: ``qmgr-ctl flush`` starts once per flush).

Importing qmgrd.ctl.cli, ``qmgr-ctl --help`` and a plain ``qmgr-ctl flush`` (postqueue -f)
must not import the modules only the other commands need: asyncio (qmgr-control and
qmgr-status clients), json, the queue readers (showq, shape, show), the changing half
(qmgrd.ctl.admin, qmgrd.qmgr.control); nor must a change refused for a bad queue id.
Each case runs in a fresh interpreter and lists sys.modules; nothing is timed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Loaded lazily, by the commands that need them.
HEAVY = (
    "asyncio",
    "concurrent.futures",
    "json",
    "ssl",
    "qmgrd.ctl.admin",
    "qmgrd.ctl.format",
    "qmgrd.ctl.postconf",
    "qmgrd.ctl.qread",
    "qmgrd.ctl.select",
    "qmgrd.ctl.shape",
    "qmgrd.ctl.show",
    "qmgrd.ctl.showq",
    "qmgrd.qmgr.admin",
    "qmgrd.qmgr.control",
    "qmgrd.qmgr.status",
    "qmgrd.qmgr.suspend",
    "qmgrd.spool.message",
    "qmgrd.spool.statuslog",
)

_PROBE = """
import sys
out = sys.argv[1]
try:
    from qmgrd.ctl import cli
    if len(sys.argv) > 2:
        cli.main(sys.argv[2:])
finally:
    with open(out, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
"""


def _loaded(tmp_path: Path, *argv: str) -> tuple[int, set[str], str]:
    """(exit status, modules loaded, stderr) of qmgr-ctl ``argv`` in a fresh interpreter
    (``argv`` empty: only ``import qmgrd.ctl.cli``)."""
    out = tmp_path / "modules.txt"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("QMGRD_CONFIG_DIR", None)
    r = subprocess.run([sys.executable, "-c", _PROBE, str(out), *argv], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60, check=False,
                       stdin=subprocess.DEVNULL)
    return r.returncode, set(out.read_text().split("\n")), r.stderr


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules for h in HEAVY if m == h or m.startswith(h + "."))


@pytest.fixture()
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir()
    (d / "main.cf").write_text(f"queue_directory = {tmp_path / 'spool'}\n")
    return d


def test_importing_the_cli_loads_no_command_modules(tmp_path: Path) -> None:
    code, modules, err = _loaded(tmp_path)
    assert code == 0, err
    assert "click" in modules and "qmgrd.ctl.cli" in modules
    assert _heavy(modules) == []


def test_help_loads_no_command_modules(tmp_path: Path) -> None:
    code, modules, err = _loaded(tmp_path, "--help")
    assert code == 0, err
    assert _heavy(modules) == []


def test_plain_flush_loads_only_config_and_trigger(tmp_path: Path, etc: Path) -> None:
    code, modules, err = _loaded(tmp_path, "-c", str(etc), "flush")
    # no master running: postqueue -f's message and EX_UNAVAILABLE, as before
    assert code == 69, err
    assert "Cannot flush mail queue - mail system is down" in err
    assert "qmgrd.trigger" in modules and "master.config" in modules
    assert _heavy(modules) == []


def test_refused_change_loads_no_work_modules(tmp_path: Path, etc: Path) -> None:
    # the arguments are checked (qmgrd.ctl.guard) before qmgrd.ctl.admin is loaded
    code, modules, err = _loaded(tmp_path, "-c", str(etc), "hold", "../../etc/passwd")
    assert code == 65, err
    assert "invalid queue id" in err
    assert "qmgrd.ctl.guard" in modules
    assert _heavy(modules) == ["qmgrd.ctl.select"]  # the selectors are checked too


@pytest.mark.parametrize("command", ["list", "show", "shape", "hold", "status", "config",
                                     "suspend", "resume", "flush"])
def test_command_help_loads_no_command_modules(tmp_path: Path, command: str) -> None:
    code, modules, err = _loaded(tmp_path, command, "--help")
    assert code == 0, err
    assert _heavy(modules) == []
