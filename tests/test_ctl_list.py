"""qmgr-ctl list: a queue built with Cleanup, read back as mailq text and postqueue -j."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from master.config import Config
from qmgrd.ctl.cli import cli
from qmgrd.spool import records as R
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from qmgrd.spool.queueid import new_long_id

CORPUS = Path(__file__).parent / "data" / "corpus"
T0 = 1700000000  # Tue Nov 14 22:13:20 2023 UTC
DATE0 = "Tue Nov 14 22:13:20"
REASON = "host mx.example.net[192.0.2.1] said: 450 4.2.0 try later"
LINE = "%-17s %8ld %19.19s %s\n"  # Postfix's long-id L_SENDER_FORMAT
RCPT = "%-17s %8s %-19s %s\n"  # L_STRING_FORMAT
REASON_FMT = "%*s(%s)\n"  # showq_compat reason line


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@dataclass
class Q:
    etc: Path
    spool: Spool
    cleanup: Cleanup

    def submit(self, sender: str, rcpts: list[str], when: int, body: bytes = b"hi\n") -> str:
        content = b"Subject: test\nFrom: " + sender.encode() + b"\n\n" + body
        env = Envelope(sender, [Recipient(r) for r in rcpts], arrival=(when, 0))
        return self.cleanup.submit(env, content, origin="smtp")

    def size(self, queue: str, qid: str) -> int:
        with QueueFile.open(self.spool, queue, qid, lock=None, readonly=True) as qf:
            return qf.data_size

    def run(self, *args: str) -> tuple[int, str, str]:
        res = CliRunner().invoke(cli, ["-c", str(self.etc), *args])
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        return res.exit_code, res.stdout, res.stderr


@pytest.fixture
def q(tmp_path: Path) -> Q:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(
        f"queue_directory = {tmp_path}/q\nmyhostname = mx.example.org\n")
    cfg = Config.load(str(etc))
    spool = Spool.from_config(cfg)
    spool.make_dirs()
    return Q(etc, spool, Cleanup(cfg, spool))


def defer(q: Q, qid: str, addr: str, reason: str) -> None:
    statuslog.append(q.spool, "defer", qid, Recipient(addr),
                     statuslog.Dsn("4.2.0", "delayed", reason))


def build_queue(q: Q) -> dict[str, str]:
    """One message per queue: active, incoming, deferred (with defer log), hold (+expire)."""
    ids: dict[str, str] = {}
    ids["deferred"] = d = q.submit(
        "alice@example.org",
        ["bob@example.net", "carol@example.net", "eve@example.net", "dave@example.net",
         "john smith@example.net"], T0, body=b"x" * 3000 + b"\n")
    with QueueFile.open(q.spool, "incoming", d, lock=None) as qf:
        eve = next(r for r in qf.recipients if r.address == "eve@example.net")
        qf.mark_done(eve.offset)
    q.spool.move(d, "incoming", "deferred")
    defer(q, d, "bob@example.net", REASON)
    defer(q, d, "carol@example.net", REASON)
    ids["active"] = a = q.submit("", ["postmaster@example.org"], T0 + 60)
    q.spool.move(a, "incoming", "active")
    ids["hold"] = h = q.submit("held@example.org", ["x@example.com"], T0 + 120)
    q.spool.move(h, "incoming", "hold")
    os.chmod(q.spool.path("hold", h), 0o710)  # postsuper -e: forced expiration
    ids["incoming"] = q.submit("new@example.org", ["y@example.com"], T0 + 180)
    return ids


def expected_mailq(q: Q, ids: dict[str, str]) -> str:
    sz = {k: q.size(k, v) for k, v in ids.items()}
    blank = RCPT % ("", "", "", "")
    out = RCPT % ("----Queue ID-----", "--Size--", "---Arrival Time----",
                  "--Sender/Recipient------")
    # showq order: maildrop, active, incoming, deferred, hold
    out += LINE % (ids["active"] + "*", sz["active"], "Tue Nov 14 22:14:20", "MAILER-DAEMON")
    out += blank[:-1] + "postmaster@example.org\n"
    out += "\n"
    out += LINE % (ids["incoming"], sz["incoming"], "Tue Nov 14 22:16:20", "new@example.org")
    out += blank[:-1] + "y@example.com\n"
    out += "\n"
    out += LINE % (ids["deferred"], sz["deferred"], DATE0, "alice@example.org")
    out += REASON_FMT % (76 - len(REASON), "", REASON)
    out += blank[:-1] + "bob@example.net\n"
    out += blank[:-1] + "carol@example.net\n"
    out += REASON_FMT % (76 - len("reason unavailable"), "", "reason unavailable")
    out += blank[:-1] + "dave@example.net\n"
    out += blank[:-1] + '"john smith"@example.net\n'
    out += "\n"
    out += LINE % (ids["hold"] + "!#", sz["hold"], "Tue Nov 14 22:15:20", "held@example.org")
    out += blank[:-1] + "x@example.com\n"
    total = sum(sz.values())
    out += f"\n-- {total // 1024} Kbytes in 4 Requests.\n"
    return out


def test_list_mailq_format(q: Q) -> None:
    ids = build_queue(q)
    code, out, err = q.run("list")
    assert code == 0, err
    assert out == expected_mailq(q, ids)
    assert out.startswith("----Queue ID----- --Size-- ---Arrival Time---- "
                          "--Sender/Recipient------\n")
    assert f"\n{ids['active']}*" in out and f"\n{ids['hold']}!#" in out
    assert "eve@example.net" not in out  # done recipient
    assert out.count(f"({REASON})") == 1  # reason shown once for bob and carol
    assert sum(q.size(k, v) for k, v in ids.items()) >= 3000
    assert out.endswith(" Kbytes in 4 Requests.\n") and "-- 0 Kbytes" not in out


def test_list_json(q: Q) -> None:
    ids = build_queue(q)
    code, out, err = q.run("list", "--json")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4 and out.endswith("\n")
    objs = [json.loads(line, object_pairs_hook=list) for line in lines]
    for obj in objs:
        assert [k for k, _ in obj] == ["queue_name", "queue_id", "arrival_time",
                                       "message_size", "forced_expire", "sender",
                                       "recipients"]
    msgs = [json.loads(line) for line in lines]
    assert [m["queue_name"] for m in msgs] == ["active", "incoming", "deferred", "hold"]
    by_q = {m["queue_name"]: m for m in msgs}
    for name, qid in ids.items():
        assert by_q[name]["queue_id"] == qid
        assert by_q[name]["message_size"] == q.size(name, qid)
    assert by_q["active"]["sender"] == "MAILER-DAEMON"
    assert by_q["active"]["arrival_time"] == T0 + 60
    assert by_q["hold"]["forced_expire"] is True
    assert by_q["deferred"]["forced_expire"] is False
    assert by_q["deferred"]["recipients"] == [
        {"address": "bob@example.net", "delay_reason": REASON},
        {"address": "carol@example.net", "delay_reason": REASON},
        {"address": "dave@example.net"},
        {"address": '"john smith"@example.net'},
    ]


def test_json_keeps_utf8(q: Q) -> None:
    qid = q.submit("alice@example.org", ["bob@example.net"], T0)
    defer(q, qid, "bob@example.net", "Zustellung verzögert")
    code, out, _ = q.run("list", "--json")
    assert code == 0
    assert '"delay_reason": "Zustellung verzögert"' in out
    code, out, _ = q.run("list")
    assert " " * (76 - len("Zustellung verzögert".encode())) + "(Zustellung verzögert)\n" in out


def test_empty_queue(q: Q) -> None:
    assert q.run("list") == (0, "Mail queue is empty\n", "")
    assert q.run("list", "--json") == (0, "", "")


def test_corrupt_and_unready_files_are_skipped(q: Q) -> None:
    good = q.submit("alice@example.org", ["bob@example.net"], T0)
    path = q.spool.path("incoming", good)
    data = Path(path).read_bytes()
    # garbage with a valid name, ready mode
    junk = q.spool.path("incoming", new_long_id(T0, 1, 4242))
    Path(junk).write_bytes(b"\xff\x85\x85\x85\x85\x85\x85 not a queue file")
    os.chmod(junk, 0o700)
    # a truncated copy in hold (hash-free queue), ready mode
    trunc = q.spool.path("hold", new_long_id(T0, 2, 4343))
    Path(trunc).write_bytes(data[: len(data) // 2])
    os.chmod(trunc, 0o700)
    # a complete copy that is not ready yet (mode 0600)
    embryo = q.spool.path("incoming", new_long_id(T0, 3, 4444))
    Path(embryo).write_bytes(data)
    os.chmod(embryo, 0o600)
    # a file with a name that is not a queue id
    Path(q.spool.queue_path("incoming"), "12345.678").write_bytes(data)
    code, out, err = q.run("list")
    assert code == 0
    assert "Traceback" not in out + err
    assert out.count("Request") == 1 and "-- 0 Kbytes in 1 Request.\n" in out
    assert good in out
    for name in (junk, trunc, embryo):
        assert os.path.basename(name) not in out
    # the damaged ones are named on stderr, with why (as showq's msg_warn); the one
    # still being written (not ready) is no damage and is not named
    warnings = {
        (f"qmgr-ctl: warning: incoming/{os.path.basename(junk)}: damaged queue file: "
         "bad record length; skipped"),
        (f"qmgr-ctl: warning: hold/{os.path.basename(trunc)}: damaged queue file: "
         "truncated: a record runs past the end of the file; skipped")}
    assert set(err.splitlines()) == warnings, err
    code, out, err = q.run("list", "--json")
    assert code == 0 and [json.loads(x)["queue_id"] for x in out.splitlines()] == [good]
    assert set(err.splitlines()) == warnings


def test_damaged_deferred_file_among_many_is_named(q: Q) -> None:
    """One of 50 deferred files cut in half: 49 listed, exit 0, and one warning on
    stderr naming deferred/<id> and why; --json stays one parseable object a line."""
    ids = [q.submit("alice@example.org", [f"r{i}@example.net"], T0) for i in range(50)]
    for qid in ids:
        q.spool.move(qid, "incoming", "deferred")
    cut = q.spool.path("deferred", ids[17])
    data = Path(cut).read_bytes()
    Path(cut).write_bytes(data[: len(data) // 2])
    for args in (["list"], ["list", "--json"]):
        code, out, err = q.run(*args)
        assert code == 0
        assert err.splitlines() == [(
            f"qmgr-ctl: warning: deferred/{ids[17]}: damaged queue file: truncated: "
            "a record runs past the end of the file; skipped")], err
    listed = [json.loads(x)["queue_id"] for x in out.splitlines()]
    assert sorted(listed) == sorted(i for i in ids if i != ids[17])


def test_show_of_a_damaged_file_says_so(q: Q) -> None:
    """show ID of a damaged file: 'damaged queue file' and exit 65 (EX_DATAERR, which
    the help documents for show as a damaged queue file - not only a bad id)."""
    from qmgrd.ctl.common import EX_DATAERR, EXIT_HELP

    qid = q.submit("alice@example.org", ["bob@example.net"], T0)
    path = q.spool.path("incoming", qid)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    for args in (["show", qid], ["show", "--json", qid]):
        code, _, err = q.run(*args)
        assert code == EX_DATAERR
        assert err.startswith(f"qmgr-ctl: fatal: {path}: damaged queue file: "), err
    assert "show: the message's queue file\n      is damaged" in EXIT_HELP


def maildrop_file(q: Q, qid: str, records: list[tuple[bytes, bytes]]) -> str:
    path = q.spool.path("maildrop", qid)
    Path(path).write_bytes(b"".join(R.encode(t, d) for t, d in records))
    os.chmod(path, 0o744)
    return path


def test_maildrop_listed_first_with_file_size(q: Q) -> None:
    q.submit("alice@example.org", ["bob@example.net"], T0)
    mid = new_long_id(T0, 7, 777)
    path = maildrop_file(q, mid, [
        (R.REC_TIME, b"%d 0" % (T0 + 5)), (R.REC_FROM, b"carol"),
        (R.REC_RCPT, b"dan@example.com"), (R.REC_DONE, b"gone@example.com"),
        (R.REC_MESG, b""), (R.REC_NORM, b"Subject: hi"), (R.REC_NORM, b""),
        (R.REC_NORM, b"body"), (R.REC_XTRA, b""), (R.REC_RCPT, b"erin@example.com"),
        (R.REC_END, b"")])
    nid = new_long_id(T0, 8, 888)  # no T record: the file's mtime is shown
    path2 = maildrop_file(q, nid, [(R.REC_FROM, b""), (R.REC_RCPT, b"f@example.com"),
                                   (R.REC_END, b"")])
    os.utime(path2, (T0 + 30, T0 + 30))
    code, out, _ = q.run("list", "--json")
    assert code == 0
    msgs = [json.loads(x) for x in out.splitlines()]
    assert [m["queue_name"] for m in msgs] == ["maildrop", "maildrop", "incoming"]
    md = {m["queue_id"]: m for m in msgs}
    assert md[mid]["message_size"] == os.path.getsize(path)
    assert md[mid]["arrival_time"] == T0 + 5
    assert md[mid]["sender"] == "carol"
    assert md[mid]["recipients"] == [{"address": "dan@example.com"},
                                     {"address": "erin@example.com"}]
    assert md[nid]["arrival_time"] == T0 + 30 and md[nid]["sender"] == "MAILER-DAEMON"
    code, text, _ = q.run("list")
    assert LINE % (mid, os.path.getsize(path), "Tue Nov 14 22:13:25", "carol") in text


def test_defer_log_order_and_only_undone_recipients(q: Q) -> None:
    qid = q.submit("a@example.org", ["r1@example.net", "r2@example.net", "r3@example.net"], T0)
    q.spool.move(qid, "incoming", "deferred")
    defer(q, qid, "r3@example.net", "busy")
    defer(q, qid, "r1@example.net", "busy")
    code, out, _ = q.run("list")
    assert code == 0
    body = out.splitlines()[2:]
    pad = " " * 47
    assert body[:5] == [" " * 72 + "(busy)", pad + "r3@example.net", pad + "r1@example.net",
                        " " * 58 + "(reason unavailable)", pad + "r2@example.net"]


def test_same_output_as_a_process(q: Q) -> None:
    ids = build_queue(q)
    expected = expected_mailq(q, ids)
    env = dict(os.environ, TZ="UTC")
    cmds = [[sys.executable, "-m", "qmgrd.ctl"]]
    script = Path(sys.executable).parent / "qmgr-ctl"
    if script.exists() or shutil.which("qmgr-ctl", path=str(script.parent)):
        cmds.append([str(script)])
    for cmd in cmds:
        res = subprocess.run([*cmd, "-c", str(q.etc), "list"], capture_output=True,
                             env=env, timeout=30, check=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout.decode() == expected
    if len(cmds) == 1:
        pytest.skip("qmgr-ctl console script not installed in the venv yet")


def test_reader_going_away_stops_quietly(q: Q, tmp_path: Path) -> None:
    """qmgr-ctl list | head: EPIPE ends the listing with exit 0 and no traceback."""
    src = q.spool.path("incoming", q.submit("alice@example.org", ["bob@example.net"], T0))
    data = Path(src).read_bytes()
    for i in range(1500):  # about 190 KB of listing, well over a pipe buffer
        path = q.spool.path("incoming", new_long_id(T0, i, 10000 + i))
        Path(path).write_bytes(data)
        os.chmod(path, 0o700)
    with open(tmp_path / "stderr", "wb") as err, subprocess.Popen(
            [sys.executable, "-m", "qmgrd.ctl", "-c", str(q.etc), "list"],
            stdout=subprocess.PIPE, stderr=err) as proc:
        assert proc.stdout is not None
        assert proc.stdout.read(100).startswith(b"----Queue ID-----")
        proc.stdout.close()
        assert proc.wait(timeout=30) == 0
    assert (tmp_path / "stderr").read_bytes() == b""
