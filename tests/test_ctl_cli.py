"""qmgr-ctl flush (postqueue -f), exit codes, configuration handling, --help."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from qmgrd.ctl.cli import EX_CONFIG, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, cli
from qmgrd.spool.queue import Spool

DOWN = "qmgr-ctl: fatal: Cannot flush mail queue - mail system is down\n"


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, list(args), env=env)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir()
    (d / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n")
    Spool(str(tmp_path / "q")).make_dirs()
    return d


def public(etc: Path, name: str) -> str:
    return str(etc.parent / "q" / "public" / name)


@pytest.fixture
def readers(etc: Path) -> Iterator[dict[str, int]]:
    """FIFOs public/qmgr and public/pickup, each held open O_RDWR as the master does."""
    fds: dict[str, int] = {}
    try:
        for name in ("qmgr", "pickup"):
            os.mkfifo(public(etc, name), 0o622)
            fds[name] = os.open(public(etc, name), os.O_RDWR | os.O_NONBLOCK)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def drain(fd: int) -> bytes:
    try:
        return os.read(fd, 1024)
    except BlockingIOError:
        return b""


# ------------------------------------------------------------------ flush

def test_flush_sends_postqueue_f_triggers(etc: Path, readers: dict[str, int]) -> None:
    assert run("-c", str(etc), "flush") == (0, "", "")
    assert drain(readers["qmgr"]) == b"FADI"
    assert drain(readers["pickup"]) == b"W"


def test_flush_without_reader_is_mail_system_down(etc: Path) -> None:
    os.mkfifo(public(etc, "qmgr"), 0o622)
    os.mkfifo(public(etc, "pickup"), 0o622)
    assert run("-c", str(etc), "flush") == (EX_UNAVAILABLE, "", DOWN)


def test_flush_without_fifo_is_mail_system_down(etc: Path) -> None:
    assert run("-c", str(etc), "flush") == (EX_UNAVAILABLE, "", DOWN)


def test_flush_needs_pickup_too(etc: Path) -> None:
    os.mkfifo(public(etc, "qmgr"), 0o622)
    fd = os.open(public(etc, "qmgr"), os.O_RDWR | os.O_NONBLOCK)
    try:
        assert run("-c", str(etc), "flush") == (EX_UNAVAILABLE, "", DOWN)
        assert drain(fd) == b"FADI"  # qmgr first, as postqueue
    finally:
        os.close(fd)


def test_flush_exit_status_of_a_process(etc: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "qmgrd.ctl", "-c", str(etc), "flush"],
                         capture_output=True, timeout=30, check=False)
    assert res.returncode == EX_UNAVAILABLE
    assert res.stderr.decode() == DOWN and res.stdout == b""


# ------------------------------------------------------------------ exit codes

@pytest.mark.parametrize("args", [["bogus"], ["list", "--bogus"], [], ["flush", "extra"]])
def test_usage_errors_exit_64(etc: Path, args: list[str]) -> None:
    code, out, err = run("-c", str(etc), *args)
    assert code == EX_USAGE
    assert "Usage: qmgr-ctl" in out + err


@pytest.mark.parametrize("args", [
    ["flush", "--site", "x.example", "--pace", v] for v in ("inf", "nan", "1e300", "-1")] + [
    ["resume", "x.example", "--pace", v] for v in ("inf", "nan")] + [
    [cmd, "--wait", v, "ALL"] for cmd in ("hold", "delete") for v in ("nan", "inf")])
def test_seconds_options_refuse_nan_inf_and_huge_values_with_a_usage_error(
        etc: Path, args: list[str]) -> None:
    """--pace and --wait are finite seconds in a range: ``--pace inf`` (or 1e300) got
    past click's FloatRange and ended in time.sleep()'s OverflowError, a traceback,
    after the first batch; ``nan`` passed every range check."""
    code, out, err = run("-c", str(etc), *args)
    assert code == EX_USAGE, (code, out, err)
    assert "Invalid value for" in err and "Traceback" not in out + err


def test_config_syntax_error_exits_78(etc: Path) -> None:
    (etc / "main.cf").write_text("# comment\nthis line has no equals sign\n")
    for cmd in ("list", "flush"):
        code, out, err = run("-c", str(etc), cmd)
        assert code == EX_CONFIG and out == ""
        assert err.startswith(f"qmgr-ctl: fatal: {etc}/main.cf, line 2: ")


def test_bad_parameter_value_exits_78(etc: Path) -> None:
    with open(etc / "main.cf", "a") as f:
        f.write("hash_queue_depth = lots\n")
    code, _, err = run("-c", str(etc), "list")
    assert code == EX_CONFIG
    assert f"{etc}/main.cf, line 2: " in err and "hash_queue_depth" in err


def test_missing_main_cf_exits_78(tmp_path: Path) -> None:
    code, _, err = run("-c", str(tmp_path / "nowhere"), "list")
    assert code == EX_CONFIG and "main.cf" in err and err.startswith("qmgr-ctl: fatal: ")


def test_config_dir_from_environment(etc: Path) -> None:
    assert run("list", env={"QMGRD_CONFIG_DIR": str(etc)}) == (0, "Mail queue is empty\n", "")


def test_missing_queue_directory_exits_75(etc: Path) -> None:
    (etc / "main.cf").write_text(f"queue_directory = {etc.parent}/nonexistent\n")
    code, out, err = run("-c", str(etc), "list")
    assert (code, out) == (EX_TEMPFAIL, "")
    assert err == (f"qmgr-ctl: fatal: open queue directory {etc.parent}/nonexistent: "
                   "No such file or directory\n")
    (etc / "main.cf").write_text(f"queue_directory = {etc}/main.cf\n")
    assert run("-c", str(etc), "list")[0] == EX_TEMPFAIL


QID = "4XZnqS1dxVz3Fgq"  # a well-formed long queue id


@pytest.mark.parametrize("args", [
    ["flush"], ["flush", "--site", "example.com"], ["flush", "--id", QID], ["list"],
    ["show", QID], ["shape"], ["hold", "ALL"], ["release", QID], ["delete", "ALL"],
    ["requeue", QID], ["status"], ["suspend", "example.com"], ["resume", "example.com"],
])
@pytest.mark.parametrize("setting,shown", [
    ("queue_directory =", '""'),
    ("queue_directory = q", '"q"'),
    ("spool_base =\nqueue_directory = $spool_base", '"" (from "$spool_base")'),
])
def test_empty_or_relative_queue_directory_exits_78(
        etc: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], setting: str,
        shown: str) -> None:
    """Every command that uses the queue directory refuses an empty or relative one,
    naming main.cf and the line (EX_CONFIG), instead of working relative to the current
    directory (here one holding a queue, ``q``, with FIFOs that have readers)."""
    monkeypatch.chdir(etc.parent)
    (etc / "main.cf").write_text(f"# the queue\n{setting}\n")
    line = setting.count("\n") + 2
    why = "empty; it must be an absolute path" if shown.startswith('""') else \
        "not an absolute path"
    (etc.parent / "public").mkdir()  # what an empty value would name
    paths = [str(etc.parent / "public" / name) for name in ("qmgr", "pickup")]
    paths += [public(etc, name) for name in ("qmgr", "pickup")]  # and "q"
    for path in paths:
        os.mkfifo(path, 0o622)
    fds = [os.open(path, os.O_RDWR | os.O_NONBLOCK) for path in paths]
    try:
        code, out, err = run("-c", str(etc), *args)
        assert (code, out) == (EX_CONFIG, "")
        assert err == (f"qmgr-ctl: fatal: {etc}/main.cf, line {line}: bad queue_directory "
                       f"parameter value {shown}: {why}\n")
        assert [drain(fd) for fd in fds] == [b""] * 4
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("args", [["flush"], ["status"]])
def test_missing_queue_directory_is_not_a_mail_system_down(etc: Path,
                                                           args: list[str]) -> None:
    """flush and status find no qmgr; when that is because the queue directory does not
    exist they say so (EX_UNAVAILABLE, as postqueue's fatal "chdir <dir>: ...")."""
    missing = etc.parent / "nonexistent"
    (etc / "main.cf").write_text(f"queue_directory = {missing}\n")
    assert run("-c", str(etc), *args) == (
        EX_UNAVAILABLE, "",
        f"qmgr-ctl: fatal: queue directory {missing}: No such file or directory\n")


def test_unreadable_queue_exits_77(etc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qmgrd.ctl import showq

    def denied(spool: Spool, queue: str) -> Iterator[tuple[str, str]]:
        raise PermissionError(13, "Permission denied", queue)

    monkeypatch.setattr(showq, "walk", denied)  # the listing's directory walk
    code, out, err = run("-c", str(etc), "list", "--json")
    assert (code, out) == (77, "")  # EX_NOPERM, with what to do
    assert err.startswith("qmgr-ctl: fatal: list: read the mail queue: permission denied")
    assert "run qmgr-ctl as root or as the mail queue owner" in err


def test_help_documents_exit_codes(tmp_path: Path) -> None:
    for args in ([], ["list"], ["flush"]):
        # --help needs no configuration
        code, out, _ = run("-c", str(tmp_path / "nowhere"), *args, "--help")
        assert code == 0
        for text in ("64", "69", "75", "78", "usage error", "mail system down",
                     "queue directory unreadable", "configuration error"):
            assert text in out, (args, text)
    assert "QMGRD_CONFIG_DIR" in run("--help")[1]


def test_config_prints_like_postconf(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text("queue_directory = ${config_directory}/q\n"
                                      "myhostname = mx.example\n")
    code, out, _ = run("-c", str(tmp_path), "config", "-n")
    assert code == 0
    assert out.splitlines() == ["myhostname = mx.example",
                                "queue_directory = ${config_directory}/q"]
    code, out, _ = run("-c", str(tmp_path), "config", "-x", "queue_directory", "myorigin")
    assert out.splitlines() == [f"queue_directory = {tmp_path}/q", "myorigin = mx.example"]
    code, out, _ = run("-c", str(tmp_path), "config", "-d", "minimal_backoff_time")
    assert out.splitlines() == ["minimal_backoff_time = 300s"]
    code, out, err = run("-c", str(tmp_path), "config", "no_such_parameter", "myhostname")
    assert code == 0 and out == "myhostname = mx.example\n"  # as postconf: a warning
    assert err == "qmgr-ctl: warning: no_such_parameter: unknown parameter\n"


def test_config_x_with_a_value_that_does_not_expand(tmp_path: Path) -> None:
    """A fresh-eyes finding: ``config -x`` ended in a traceback. Now one fatal line
    naming file and line (EX_CONFIG), and the names asked for that do expand print."""
    (tmp_path / "main.cf").write_text("a6 = ${mail_name\n"
                                      "a7 = ${mail_name?{x}:{y}}\n")
    code, out, err = run("-c", str(tmp_path), "config", "-x", "a6")
    assert code == 78 and out == ""
    assert err == (f'qmgr-ctl: fatal: {tmp_path}/main.cf, line 1: missing \'}}\' in '
                   '"${mail_name"\n')
    code, out, err = run("-c", str(tmp_path), "config", "-x", "a7")
    assert (code, out, err) == (0, "a7 = x\n", "")


def test_config_prints_per_transport_parameters_like_postconf(tmp_path: Path) -> None:
    """postconf shows a transport's parameters that fall back to a global one as
    ``$default_...`` (a fresh-eyes finding: "unknown parameter")."""
    (tmp_path / "main.cf").write_text("relay_destination_recipient_limit = 7\n")
    code, out, err = run("-c", str(tmp_path), "config", "smtp_destination_recipient_limit",
                         "relay_destination_recipient_limit",
                         "smtp_initial_destination_concurrency")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "smtp_destination_recipient_limit = $default_destination_recipient_limit",
        "relay_destination_recipient_limit = 7",
        "smtp_initial_destination_concurrency = $initial_destination_concurrency"]
    code, out, _ = run("-c", str(tmp_path), "config", "-x", "smtp_destination_recipient_limit")
    assert out == "smtp_destination_recipient_limit = 50\n"


def test_config_names_unused_main_cf_parameters_as_postconf(tmp_path: Path) -> None:
    """A misspelt name in main.cf (a fresh-eyes finding: ``mydestinatoin`` went
    unnoticed) is named by ``config`` and ``config -n``, with its line, as postconf's
    "unused parameter" warning; a name that a value or a master.cf ``-o`` refers to as
    ``$name`` is used, and so is every parameter a qmgrd program reads."""
    (tmp_path / "main.cf").write_text("queue_directory = ${config_directory}/q\n"
                                      "mydestinatoin = foo\n"
                                      "my_nets = 10.0.0.0/8\n"
                                      "mynetworks = 127.0.0.0/8 $my_nets\n"
                                      "for_override = yes\n"
                                      "smtp_destination_recipient_limit = 5\n")
    (tmp_path / "master.cf").write_text(
        "smtp unix - - n - - smtp -o smtp_tls_loglevel=$for_override\n")
    unused = (f"qmgr-ctl: warning: {tmp_path}/main.cf, line 2: unused parameter: "
              "mydestinatoin=foo\n")
    for flags in ([], ["-n"]):
        code, out, err = run("-c", str(tmp_path), "config", *flags)
        assert code == 0 and err == unused, (flags, err)
        assert "mydestinatoin = foo" in out
    code, out, err = run("-c", str(tmp_path), "config", "mynetworks")
    assert (code, err) == (0, "")  # a lookup stays quiet
