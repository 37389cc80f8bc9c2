"""qmgr-sendmail's fast start (issue 8, scenario B): what a run imports, the small main.cf
reader and plain-address check against the full parsers they stand in for, the maildrop
writer's own record framing, and the durability order (fsync before exit 0).

These are behavioural guards: nothing here is timed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from master.config import PARAMS, Config, ConfigError
from qmgrd import sendmail as sm
from qmgrd.spool import maildrop as md
from qmgrd.spool import records as R
from qmgrd.spool.envelope import parse_recipient_arg, parse_sender_arg
from qmgrd.spool.maildrop import MaildropMessage, MaildropWriter, read_maildrop
from qmgrd.spool.queue import Spool
from tests.harness import MakeSystem, wait_for

REPO = Path(__file__).resolve().parent.parent

# What one run may not pull in: each of these costs a run milliseconds (typing brings
# re and collections) or belongs to a rare path only.
HEAVY = ("typing", "re", "collections", "dataclasses", "inspect", "socket", "email",
         "asyncio", "click", "dns", "argparse", "pathlib", "master", "qmgrd.spool.envelope",
         "qmgrd.spool.records", "qmgrd.spool.cleanup")

# Runs qmgrd.sendmail.main in an interpreter started with -S (no site: only what the
# interpreter itself needs is loaded beforehand) and reports the modules it added.
_PROBE = """\
import sys
sys.path.insert(0, sys.argv.pop(1))
before = set(sys.modules)
from qmgrd import sendmail
try:
    sendmail.main()
except SystemExit as exc:
    code = exc.code
added = sorted(set(sys.modules) - before)
print(__import__("json").dumps([code, added]))
"""


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n")
    Spool(str(tmp_path / "q")).make_dirs()
    return tmp_path


def probe(confdir: Path, args: list[str], data: bytes = b"Subject: s\n\nbody\n"
          ) -> tuple[int, list[str]]:
    p = subprocess.run([sys.executable, "-S", "-c", _PROBE, str(REPO), "-c", str(confdir),
                        *args], input=data, capture_output=True, timeout=30, check=False)
    assert p.returncode == 0, p.stderr
    code, added = json.loads(p.stdout)
    return int(code), list(added)


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


# ------------------------------------------------------------------------------ imports

@pytest.mark.timeout(120)
def test_console_script_runs_are_picked_up_on_their_trigger(mailsys: MakeSystem) -> None:
    """Sequential runs of the installed console script (the issue-8 scenario B load):
    each exits 0 without a warning, and pickup takes every file on the W trigger, not on
    its 60 s timer (every message is gone within 45 s of the first run)."""
    script = Path(sys.executable).parent / "qmgr-sendmail"
    if not script.exists():
        pytest.skip("qmgr-sendmail console script not installed (make install)")
    ms = mailsys(main={"default_transport": "discard"})
    ms.start()
    for i in range(10):
        p = subprocess.run([str(script), "-c", str(ms.etc), f"u{i}@d.example"],
                           input=f"Subject: {i}\n\nbody\n".encode(), capture_output=True,
                           env=ms.env, timeout=30, check=False)
        assert (p.returncode, p.stderr) == (0, b"")
    wait_for(lambda: ms.log().count(": removed") >= 10 and ms.queue_empty(), 45,
             "ten messages through pickup, cleanup, qmgr and discard")
    assert ms.log().count(" uid=") == 10



def test_common_run_imports_only_the_spool_writer(confdir: Path) -> None:
    code, added = probe(confdir, ["-f", "a@example.org", "-oi", "b@example.net", "c"])
    assert code == 0
    assert heavy(added) == []
    assert "qmgrd.spool.maildrop" in added and "qmgrd.spool.queue" in added
    assert len(list((confdir / "q" / "maildrop").iterdir())) == 1


def test_main_cf_with_expansion_falls_back_to_the_full_parser(confdir: Path) -> None:
    (confdir / "main.cf").write_text(f"base = {confdir}\nqueue_directory = $base/q\n")
    code, added = probe(confdir, ["b@example.net"])
    assert code == 0 and "master.config.maincf" in added
    assert len(list((confdir / "q" / "maildrop").iterdir())) == 1


@pytest.mark.parametrize("args", [["-N", "success", "b@example.net"], ['"a b"@example.net'],
                                  ["-f", "<a@example.org>", "b@example.net"]])
def test_rare_options_still_load_the_address_parser(confdir: Path, args: list[str]) -> None:
    code, added = probe(confdir, args)
    assert code == 0 and "qmgrd.spool.envelope" in added


def test_errors_need_no_heavy_module_either(confdir: Path) -> None:
    code, added = probe(confdir, [])
    assert code == sm.EX_USAGE and heavy(added) == []


# ----------------------------------------------------------------- the small main.cf reader

def test_reader_defaults_match_the_parameter_table() -> None:
    for name, (default, minimum) in sm._PARAMS.items():
        assert PARAMS[name].default == default
        if name != "queue_directory":
            assert PARAMS[name].min == minimum


MAIN_CF = [
    "",
    "queue_directory = /q\n",
    "queue_directory=/q\nline_length_limit = 600\nmessage_size_limit = 0\n",
    "# c\nqueue_directory =\n  /q\n# between\n  tail\nline_length_limit = 700  \n",
    "queue_directory = /a\nqueue_directory = /b\n",
    "myhostname = x\n  continued = still x\nqueue_directory = /q # not a comment\n",
    "queue_directory = /q\r\nmessage_size_limit = 0012\r\n",
    "  indented = continuation of nothing\n",
    "queue_directory /q\n",
    "= x\n",
    "bad-name.x = 1\nqueue_directory = /q\n",
    "queue_directory = $data_directory/q\n",
    "queue_directory = /q\nline_length_limit = ${x}\n",
    "line_length_limit = 0\n",
    "line_length_limit = -1\n",
    "message_size_limit = 10k\n",
    "message_size_limit = \u0661\u0662\n",
    "line_length_limit = x\n",
    "queue_directory = /q\n line_length_limit = 5\n",
    "queue_directory\n  = /q\n",
    "queue_directory = /q\n# note\x0cqueue_directory = /elsewhere\n",  # FF: no line end
    "queue_directory = /q\x1e\nline_length_limit = 10\x85\n",
    "queue_directory =\n",  # empty, relative: Config reports them
    "queue_directory = q\n",
    "queue_directory = ./q\nline_length_limit = 100\n",
    "queue_directory = /q/../r//\n",  # normalised alike
    "line_length_limit = 511\n",  # under Postfix's minimum (512): Config reports it
    "line_length_limit = 512\n",
]


def full(confdir: Path) -> tuple[str, int, int] | str:
    try:
        cfg = Config.load(str(confdir))
        return (cfg.queue_directory(), cfg.get_int("line_length_limit"),
                cfg.get_int("message_size_limit"))
    except ConfigError as exc:
        return f"error: {exc}"


@pytest.mark.parametrize("text", MAIN_CF)
def test_reader_agrees_with_config_or_defers_to_it(tmp_path: Path, text: str) -> None:
    (tmp_path / "main.cf").write_text(text)
    quick = sm._quick_config(str(tmp_path))
    expected = full(tmp_path)
    if quick is not None:
        assert quick == expected
    else:  # the full parser decides: same values, or the error reported as EX_CONFIG
        if isinstance(expected, str):
            with pytest.raises(sm._Fatal) as info:
                sm._config(str(tmp_path))
            assert info.value.code == sm.EX_CONFIG
            assert f"error: {info.value.text}" == expected
        else:
            assert sm._config(str(tmp_path)) == expected


def test_reader_takes_the_plain_files(tmp_path: Path) -> None:
    for text in MAIN_CF[:7]:
        (tmp_path / "main.cf").write_text(text)
        assert sm._quick_config(str(tmp_path)) is not None, text
    (tmp_path / "main.cf").write_bytes(b"queue_directory = /\xff\n")
    assert sm._quick_config(str(tmp_path)) is None
    assert sm._quick_config(str(tmp_path / "missing")) is None


_LINE = st.sampled_from(["queue_directory", "line_length_limit", "message_size_limit",
                         "other_name", " ", "\t", "#", "", "x.y"])
_VALUE = st.text(alphabet="=/ab 0129#$\t", max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_LINE, st.sampled_from(["=", " = ", "", "= "]), _VALUE),
                max_size=6))
def test_reader_never_disagrees_with_config(lines: list[tuple[str, str, str]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Path(d, "main.cf").write_text("".join(f"{a}{b}{c}\n" for a, b, c in lines))
        quick = sm._quick_config(d)
        if quick is not None:
            assert quick == full(Path(d))


@pytest.mark.parametrize("setting,shown", [
    ("queue_directory =", '""'),
    ("queue_directory = q", '"q"'),
    ("queue_directory = $spool_base", '"" (from "$spool_base")'),
])
def test_empty_or_relative_queue_directory_is_a_config_error(
        confdir: Path, monkeypatch: pytest.MonkeyPatch, setting: str, shown: str) -> None:
    """Neither the small reader nor the full parser takes an empty or relative
    queue_directory: EX_CONFIG naming main.cf and the line, and nothing is queued in a
    maildrop/ relative to the current directory (here: one for "" and one for "q")."""
    monkeypatch.chdir(confdir)
    Spool(str(confdir)).make_dirs()
    (confdir / "main.cf").write_text(f"# the queue\n{setting}\n")
    why = "empty; it must be an absolute path" if shown.startswith('""') else \
        "not an absolute path"
    err = io.StringIO()
    assert sm.run(["-c", str(confdir), "r@example.net"], io.BytesIO(b"x\n"), err) \
        == sm.EX_CONFIG
    assert err.getvalue() == (f"qmgr-sendmail: fatal: {confdir}/main.cf, line 2: bad "
                              f"queue_directory parameter value {shown}: {why}\n")
    assert list((confdir / "maildrop").iterdir()) == []
    assert list((confdir / "q" / "maildrop").iterdir()) == []


@pytest.mark.parametrize("setting", ["queue_directory = {missing}",  # the small reader
                                     "base = {missing}\nqueue_directory = $base"])
def test_missing_queue_directory_is_said_plainly(tmp_path: Path, setting: str) -> None:
    """As Postfix's sendmail (fatal "chdir <dir>: No such file or directory",
    EX_UNAVAILABLE): the directory is named, not "cannot create a file in maildrop"."""
    missing = tmp_path / "nowhere" / "spool"
    (tmp_path / "main.cf").write_text(setting.format(missing=missing) + "\n")
    err = io.StringIO()
    assert sm.run(["-c", str(tmp_path), "r@example.net"], io.BytesIO(b"x\n"), err) \
        == sm.EX_UNAVAILABLE == 69
    assert err.getvalue() == (f"qmgr-sendmail: fatal: queue directory {missing}: "
                              "No such file or directory\n")


def test_missing_maildrop_alone_is_still_cannot_create(confdir: Path) -> None:
    (confdir / "q" / "maildrop").rmdir()
    err = io.StringIO()
    assert sm.run(["-c", str(confdir), "r@example.net"], io.BytesIO(b"x\n"), err) \
        == sm.EX_CANTCREAT
    assert err.getvalue() == (f"qmgr-sendmail: fatal: create file in {confdir}/q/maildrop: "
                              "No such file or directory\n")


# ------------------------------------------------------------------- plain addresses

_ADDR = st.text(alphabet='ab@.<>" ,;:\\()\t\f\v\x01\x7f-', max_size=10)


@settings(max_examples=300, deadline=None)
@given(_ADDR)
def test_plain_address_check_matches_the_parser(text: str) -> None:
    if sm._plain_address(text):
        assert parse_recipient_arg(text) == [text]
        assert parse_sender_arg(text) == text


@pytest.mark.parametrize("text", ["a@b", "a", "a.b-c@d.e", "user@localhost"])
def test_plain_addresses(text: str) -> None:
    assert sm._plain_address(text)


@pytest.mark.parametrize("text", ["", "@b", "a@", "a b@c", "<a@b>", "a\x01@b", "a,b"])
def test_not_plain_addresses(text: str) -> None:
    assert not sm._plain_address(text)


# ------------------------------------------------------------------ the maildrop writer

def test_writer_record_types_are_the_records_constants() -> None:
    for name in ("FULL", "FROM", "ATTR", "RCPT", "MESG", "CONT", "NORM", "XTRA", "END"):
        assert getattr(md, f"_REC_{name}") == getattr(R, f"REC_{name}")


@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 16383, 16384, 70000])
def test_writer_framing_is_records_encode(n: int) -> None:
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    assert md._frame(b"N", data) == R.encode(b"N", data)


def test_written_file_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "w+b") as f:
        w = MaildropWriter(f, line_limit=130)
        w.envelope("s@x", ["r@y", "q@z"], fullname="S", notify=2, ret=1, envid="e1",
                   extract_recipients=True)
        w.line(b"Subject: t")
        w.line(b"")
        w.line(b"z" * 300)
        w.finish()
        f.seek(0)
        types = b"".join(r.rtype for r in R.RecordReader(f, max_len=130))
        msg = read_maildrop(f, max_record=130)
    assert types == b"FSAAAAARARMNNLLNXE"
    assert (msg.sender, msg.fullname, msg.envid, msg.ret) == ("s@x", "S", "e1", 1)
    assert [(r.address, r.notify) for r in msg.recipients] == [("r@y", 2), ("q@z", 2)]
    assert msg.extract_recipients and msg.content == b"Subject: t\n\n" + b"z" * 300 + b"\n"


def test_message_compares_by_value() -> None:
    assert MaildropMessage() == MaildropMessage()
    assert MaildropMessage(sender="a") != MaildropMessage(sender="b")
    assert MaildropMessage().recipients is not MaildropMessage().recipients
    assert repr(MaildropMessage(content=b"x")).startswith("MaildropMessage(sender='', ")
    assert "content=b'x'" in repr(MaildropMessage(content=b"x"))


# ------------------------------------------------------------------------- durability

def test_exit_0_only_after_the_file_is_ready_and_synced(
        confdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fchmod, real_fsync = os.fchmod, os.fsync

    def fchmod(fd: int, mode: int) -> None:
        calls.append(f"fchmod {mode:o}")
        real_fchmod(fd, mode)

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(sm.os, "fchmod", fchmod)
    monkeypatch.setattr(sm.os, "fsync", fsync)
    assert sm.run(["-c", str(confdir), "r@example.net"], io.BytesIO(b"x\n"),
                  io.StringIO()) == 0
    assert calls[-2:] == ["fchmod 744", "fsync"]


def test_fsync_failure_is_a_temporary_error_and_leaves_no_file(
        confdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sm.os, "fsync", fsync)
    err = io.StringIO()
    assert sm.run(["-c", str(confdir), "r@example.net"], io.BytesIO(b"x\n"), err) == 75
    assert "Input/output error" in err.getvalue()
    assert list((confdir / "q" / "maildrop").iterdir()) == []
