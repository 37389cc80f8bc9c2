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
from collections.abc import Iterator
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
    """A main.cf whose queue directory (``tmp_path/spool``) exists, with nothing in it:
    a mail system that is down."""
    d = tmp_path / "etc"
    d.mkdir()
    (d / "main.cf").write_text(f"queue_directory = {tmp_path / 'spool'}\n")
    (tmp_path / "spool").mkdir()
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
    assert "invalid mail queue id" in err
    assert "qmgrd.ctl.guard" in modules
    assert _heavy(modules) == ["qmgrd.ctl.select"]  # the selectors are checked too


@pytest.mark.parametrize("command", ["list", "show", "shape", "hold", "status", "config",
                                     "suspend", "resume", "flush"])
def test_command_help_loads_no_command_modules(tmp_path: Path, command: str) -> None:
    code, modules, err = _loaded(tmp_path, command, "--help")
    assert code == 0, err
    assert _heavy(modules) == []


# --------------------------------------------- a plain flush, without click (qmgrd.ctl.entry)

_ENTRY_PROBE = """
import sys
out = sys.argv[1]
sys.argv[1:] = sys.argv[2:]
try:
    from qmgrd.ctl.entry import main
    main()
finally:
    with open(out, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
"""


def _entry(tmp_path: Path, *argv: str, config_env: str | None = None
           ) -> tuple[int, set[str], str]:
    """(exit status, modules loaded, stderr) of the qmgr-ctl command (qmgrd.ctl.entry)."""
    out = tmp_path / "modules.txt"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("QMGRD_CONFIG_DIR", None)
    if config_env is not None:
        env["QMGRD_CONFIG_DIR"] = config_env
    r = subprocess.run([sys.executable, "-c", _ENTRY_PROBE, str(out), *argv], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60, check=False,
                       stdin=subprocess.DEVNULL)
    return r.returncode, set(out.read_text().split("\n")), r.stderr


@pytest.fixture()
def fifos(tmp_path: Path) -> Iterator[dict[str, int]]:
    """public/qmgr and public/pickup of the spool in ``etc``'s main.cf, as FIFOs with a
    reader: {service: the reading descriptor}."""
    public = tmp_path / "spool" / "public"
    public.mkdir(parents=True)
    fds = {}
    for service in ("qmgr", "pickup"):
        os.mkfifo(public / service, 0o622)
        fds[service] = os.open(public / service, os.O_RDONLY | os.O_NONBLOCK)
    yield fds
    for fd in fds.values():
        os.close(fd)


def _received(fds: dict[str, int]) -> dict[str, bytes]:
    got = {}
    for service, fd in fds.items():
        try:
            got[service] = os.read(fd, 1024)
        except BlockingIOError:
            got[service] = b""
    return got


def test_plain_flush_sends_the_triggers_without_click(tmp_path: Path, etc: Path,
                                                      fifos: dict[str, int]) -> None:
    code, modules, err = _entry(tmp_path, "-c", str(etc), "flush")
    assert code == 0, err
    assert err == ""
    assert _received(fifos) == {"qmgr": b"FADI", "pickup": b"W"}  # postqueue -f's
    assert "qmgrd.quickcf" in modules and "qmgrd.trigger" in modules
    assert not {"click", "master.config", "qmgrd.ctl.cli", "re", "typing"} & modules


def test_plain_flush_takes_the_directory_from_the_environment(
        tmp_path: Path, etc: Path, fifos: dict[str, int]) -> None:
    code, modules, err = _entry(tmp_path, "flush", config_env=str(etc))
    assert code == 0, err
    assert _received(fifos) == {"qmgr": b"FADI", "pickup": b"W"}
    assert "click" not in modules


def test_plain_flush_with_the_system_down_reports_as_before(tmp_path: Path,
                                                            etc: Path) -> None:
    code, modules, err = _entry(tmp_path, "-c", str(etc), "flush")
    assert code == 69
    assert err == "qmgr-ctl: fatal: Cannot flush mail queue - mail system is down\n"
    assert "click" in modules  # the full path ran, and reported


def test_flush_with_an_expansion_in_main_cf_goes_through_the_full_parser(
        tmp_path: Path, etc: Path, fifos: dict[str, int]) -> None:
    (etc / "main.cf").write_text(f"base = {tmp_path}\nqueue_directory = $base/spool\n")
    code, modules, err = _entry(tmp_path, "-c", str(etc), "flush")
    assert code == 0, err
    assert _received(fifos) == {"qmgr": b"FADI", "pickup": b"W"}
    assert "master.config" in modules and "click" in modules


def test_a_broken_main_cf_is_reported_by_the_full_parser(tmp_path: Path, etc: Path,
                                                         fifos: dict[str, int]) -> None:
    (etc / "main.cf").write_text(f"queue_directory = {tmp_path / 'spool'}\nno equals\n")
    code, _, err = _entry(tmp_path, "-c", str(etc), "flush")
    assert code == 78, err  # EX_CONFIG, with the file and line, as before
    assert "main.cf" in err and "line 2" in err
    assert _received(fifos) == {"qmgr": b"", "pickup": b""}


def _fifos_in(public: Path) -> dict[str, int]:
    """public/qmgr and public/pickup FIFOs under ``public``, each with a reader."""
    public.mkdir(parents=True, exist_ok=True)
    fds = {}
    for service in ("qmgr", "pickup"):
        os.mkfifo(public / service, 0o622)
        fds[service] = os.open(public / service, os.O_RDONLY | os.O_NONBLOCK)
    return fds


@pytest.mark.parametrize("value,shown,why", [
    ("", '""', "empty; it must be an absolute path"),
    ("spool", '"spool"', "not an absolute path"),
    ("./spool/", '"./spool/"', "not an absolute path"),
    ("$spool_base", '"" (from "$spool_base")', "empty; it must be an absolute path"),
])
def test_plain_flush_never_uses_a_relative_queue_directory(tmp_path: Path, etc: Path,
                                                           value: str, shown: str,
                                                           why: str) -> None:
    """An empty or relative queue_directory (also one that expands to nothing) is not
    taken by the fast path: the full parser reports it with file and line (EX_CONFIG),
    and no trigger goes to the FIFOs it would name relative to the current directory
    (the command runs in tmp_path: ``public/`` and ``spool/public/`` there)."""
    (etc / "main.cf").write_text(f"# the queue\nqueue_directory = {value}\n")
    fds = {**{f"./{k}": v for k, v in _fifos_in(tmp_path / "public").items()},
           **_fifos_in(tmp_path / "spool" / "public")}
    try:
        code, modules, err = _entry(tmp_path, "-c", str(etc), "flush")
        assert code == 78, err
        assert err == (f"qmgr-ctl: fatal: {etc}/main.cf, line 2: bad queue_directory "
                       f"parameter value {shown}: {why}\n")
        assert set(_received(fds).values()) == {b""}
        assert "master.config" in modules
    finally:
        for fd in fds.values():
            os.close(fd)


def test_plain_flush_names_a_missing_queue_directory(tmp_path: Path, etc: Path) -> None:
    """No queue directory at all is said plainly (postqueue: fatal "chdir <dir>: No such
    file or directory", EX_UNAVAILABLE), not as a mail system that is down."""
    missing = tmp_path / "nowhere" / "spool"
    (etc / "main.cf").write_text(f"queue_directory = {missing}\n")
    code, _, err = _entry(tmp_path, "-c", str(etc), "flush")
    assert code == 69
    assert err == f"qmgr-ctl: fatal: queue directory {missing}: No such file or directory\n"
    (etc / "main.cf").write_text(f"queue_directory = {etc / 'main.cf'}\n")  # not a dir
    code, _, err = _entry(tmp_path, "-c", str(etc), "flush")
    assert code == 69
    assert err == f"qmgr-ctl: fatal: queue directory {etc}/main.cf: Not a directory\n"


@pytest.mark.parametrize("argv", [["flush", "--site", "example.com"], ["--help"],
                                  ["-c", "{etc}", "flush", "--help"], ["flush", "-h"]])
def test_other_command_lines_go_to_click(tmp_path: Path, etc: Path, fifos: dict[str, int],
                                         argv: list[str]) -> None:
    for queue in ("maildrop", "incoming", "active", "deferred", "hold"):
        (tmp_path / "spool" / queue).mkdir()
    code, modules, err = _entry(tmp_path, *(a.format(etc=etc) for a in argv),
                                config_env=str(etc))
    assert "click" in modules, err
    assert code == 0, err
    assert _received(fifos)["pickup"] == b""  # no plain flush was sent


def test_the_fast_path_defaults_are_the_cli_and_config_defaults() -> None:
    from master.config import PARAMS
    from qmgrd.ctl import cli, entry

    assert entry.DEFAULT_CONFIG_DIR == cli.DEFAULT_CONFIG_DIR
    assert entry.QUEUE_DIRECTORY_DEFAULT == PARAMS["queue_directory"].default
