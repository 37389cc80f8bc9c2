"""qmgr-ctl / qmgr-master hardening: FIFOs and links in the queue, permission errors,
honest output for changes still waiting for a delivery, damaged suspension file, small
postconf/postsuper compatibility points."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
from click.testing import CliRunner

from master import cli as master_cli
from master.config import Config
from qmgrd.ctl import admin as ctl_admin
from qmgrd.ctl import cli as ctl_cli
from qmgrd.ctl.cli import cli
from qmgrd.qmgr import admin as qmgr_admin
from qmgrd.qmgr.suspend import load, suspend_path
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.queue import Spool
from qmgrd.spool.queueid import new_long_id as _new_long_id

pytestmark = pytest.mark.timeout(20)
_SEQ = iter(range(1, 1 << 20))


def new_long_id() -> str:
    return _new_long_id(1700000100, next(_SEQ), 4242)


class Q:
    def __init__(self, tmp_path: Path) -> None:
        self.etc = tmp_path / "etc"
        self.etc.mkdir()
        (self.etc / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n"
                                          "myhostname = mx.example.org\n")
        cfg = Config.load(str(self.etc))
        self.spool = Spool.from_config(cfg)
        self.spool.make_dirs()
        self.cleanup = Cleanup(cfg, self.spool)

    def submit(self, queue: str = "incoming") -> str:
        env = Envelope("a@example.org", [Recipient("b@example.net")], arrival=(1700000000, 0))
        qid = self.cleanup.submit(env, b"Subject: t\n\nhi\n", origin="smtp")
        if queue != "incoming":
            self.spool.move(qid, "incoming", queue)
        return qid

    def run(self, *args: str, input: bytes | None = None) -> tuple[int, str, str]:
        res = CliRunner().invoke(cli, ["-c", str(self.etc), *args], input=input)
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        return res.exit_code, res.stdout, res.stderr


@pytest.fixture
def q(tmp_path: Path) -> Q:
    return Q(tmp_path)


# 1. FIFOs and symbolic links ------------------------------------------------------
def test_fifo_in_maildrop_does_not_block_list(q: Q) -> None:
    qid = q.submit()
    fifo = q.spool.path("maildrop", new_long_id())
    os.mkfifo(fifo, 0o700)
    for args in (("list",), ("list", "--json")):
        code, out, err = q.run(*args)
        assert code == 0 and qid in out
        assert err.count("not a regular file") == 1


def test_show_refuses_fifo_and_symlink(q: Q) -> None:
    fid = new_long_id()
    os.mkfifo(q.spool.path("maildrop", fid), 0o700)
    code, out, err = q.run("show", fid)
    assert code == 65 and "not a regular file" in err and out == ""
    lid = new_long_id()
    link = q.spool.path("deferred", lid)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink("/dev/urandom", link)
    code, out, err = q.run("show", lid)
    assert code == 65 and "not a regular file" in err and out == ""


def test_shape_skips_fifo_with_a_warning(q: Q) -> None:
    q.submit()
    os.mkfifo(q.spool.path("incoming", new_long_id()), 0o700)
    code, out, err = q.run("shape")
    assert code == 0 and out.splitlines()[1].split()[:2] == ["TOTAL", "1"]
    assert err.count("not a regular file") == 1


# 2. permission errors -------------------------------------------------------------
def _deny(monkeypatch: pytest.MonkeyPatch, name: str, part: str) -> None:
    real = getattr(os, name)

    def fake(path: Any, *a: Any, **k: Any) -> Any:
        if part in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, name, fake)


def test_list_permission_denied_says_what_to_do(q: Q, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    _deny(monkeypatch, "scandir", "/defer")
    code, _, err = q.run("list")
    assert code == 77 and "permission denied" in err and "root" in err


def test_shape_permission_denied_is_an_error_not_zero(q: Q,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    q.submit("deferred")
    _deny(monkeypatch, "scandir", "/deferred")
    code, out, err = q.run("shape", "deferred")
    assert code == 77 and "TOTAL" not in out and "permission denied" in err
    monkeypatch.undo()
    _deny(monkeypatch, "open", "/deferred/")
    code, out, err = q.run("shape", "deferred")
    assert code == 77 and "TOTAL" not in out


def test_show_permission_denied_is_not_no_such_message(q: Q,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    qid = q.submit("deferred")
    _deny(monkeypatch, "lstat", "/deferred/")
    code, _, err = q.run("show", qid)
    assert code == 77 and "permission denied" in err and "no such" not in err


def test_status_permission_denied(q: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    def fetch(path: str) -> dict[str, Any]:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(ctl_cli, "fetch", fetch)
    code, _, err = q.run("status")
    assert code == 77 and "permission denied" in err


def _master(q: Q, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(master_cli.main, ["-c", str(q.etc), *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.stderr


def test_master_stop_reload_permission_denied(q: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(master_cli, "_running", lambda qdir: 4242)

    class Proc:
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def children(self, recursive: bool = False) -> list[Any]:
            return []

        def send_signal(self, sig: int) -> None:
            raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(master_cli.psutil, "Process", Proc)
    code, err = _master(q, "stop")
    assert code == 1 and err.strip().splitlines() == [
        ("qmgr-master: fatal: stop: permission denied (the master runs as root; "
        "run as root)")]

    def kill(pid: int, sig: int) -> None:
        assert sig == signal.SIGHUP
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(master_cli, "_checked_config",
                        lambda ctx, warn=True, modules=True: (Config.load(str(q.etc)), []))
    monkeypatch.setattr(master_cli.os, "kill", kill)
    code, err = _master(q, "reload")
    assert code == 1 and "reload: permission denied" in err and "Traceback" not in err


def test_master_missing_config_directory(tmp_path: Path) -> None:
    res = CliRunner().invoke(master_cli.main, ["-c", str(tmp_path / "nope"), "status"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [
        (f"qmgr-master: fatal: configuration directory {tmp_path}/nope: no such directory "
        "(give -c DIR or set QMGRD_CONFIG_DIR)")]


# 3. changes waiting for a delivery in progress ------------------------------------
@pytest.mark.parametrize(("action", "word"), [("hold", "held"), ("delete", "deleted"),
                                              ("requeue", "requeued")])
def test_pending_is_reported_honestly(q: Q, monkeypatch: pytest.MonkeyPatch, action: str,
                                      word: str) -> None:
    qid = q.submit("active")

    def request(path: str, req: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        if req["cmd"] == "act":
            return {"results": {i: "pending" for i in req["ids"]}}
        return {"pid": 1, "restarting": False}

    monkeypatch.setattr(ctl_admin.control, "request", request)
    code, out, err = q.run(action, "--wait", "0", qid)
    assert code == 75 and out == ""
    assert f"{qid}: in delivery; will be {word} when the delivery in progress ends" in err
    assert ": 0 messages" in err


def test_qmgr_logs_a_moot_change(q: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[str] = []
    monkeypatch.setattr(qmgr_admin.log, "info", logged.append)
    for action in ("hold", "delete"):
        qid = q.submit("active")
        act = qmgr_admin.AdminAction(action, q.spool, lambda: None)
        act.finish(SimpleNamespace(qid=qid, deferred=False))  # type: ignore[arg-type]
        assert not os.path.exists(q.spool.path("active", qid))
        assert any(line.startswith(f"{qid}: {action}") and "delivered" in line
                   for line in logged), logged


# 4. damaged suspension file --------------------------------------------------------
def test_damaged_suspension_file_is_replaced(q: Q) -> None:
    path = suspend_path(q.spool.queue_directory)
    Path(path).write_bytes(b"\xff\xfe junk \x00")
    code, _, err = q.run("suspend", "example.com")
    assert code == 0 and err.count("warning") == 1 and path in err
    assert [s.domain for s in load(path, 0)] == ["example.com"]
    code, out, err = q.run("resume", "example.com")
    assert code == 0 and err == "" and "resumed" in out


# 5. small compatibility points -----------------------------------------------------
def test_config_unknown_name_warns_and_prints_the_rest(q: Q) -> None:
    code, out, err = q.run("config", "myhostname", "fallback_relayx")
    assert code == 0 and out == "myhostname = mx.example.org\n"
    assert err == "qmgr-ctl: warning: fallback_relayx: unknown parameter\n"
    code, _, err = q.run("config", "nosuch=1")
    assert code == 0 and "nosuch: unknown parameter" in err
    assert "nosuch = 1" in (q.etc / "main.cf").read_text()


def test_hold_of_held_message_is_silent(q: Q) -> None:
    qid = q.submit("hold")
    code, out, err = q.run("hold", qid)
    assert code == 0 and out == "" and qid not in err
    code, out, err = q.run("hold", "-", input=qid.encode() + b"\n")
    assert code == 0 and qid not in err


def test_garbage_ids_are_escaped_and_bounded(q: Q) -> None:
    junk = b"\x1b]0;owned\x07\xff\xfe" + b"A" * 500
    code, out, err = q.run("hold", "-", input=junk)
    assert code == 65 and out == ""
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err
    assert "\\xff\\xfe" in err and "udc" not in err  # the bytes typed, not surrogates
    assert len(err) < 200


def test_suspend_for_is_bounded(q: Q) -> None:
    code, _, err = q.run("suspend", "example.com", "--for", "99999w")
    assert code == 64 and "at most 365d" in err
    assert not os.path.exists(suspend_path(q.spool.queue_directory))
    code, _, _ = q.run("suspend", "example.com", "--for", "365d")
    assert code == 0
    assert json.loads(Path(suspend_path(q.spool.queue_directory)).read_text())["version"] == 1
