"""qmgr-ctl shape: qshape's rules on odd files, its table layout, and --json."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from click.testing import CliRunner

from master.config import Config
from qmgrd.ctl.cli import cli
from qmgrd.ctl.shape import Shape, Table, count, format_table
from qmgrd.spool import records as R
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.queue import Spool
from qmgrd.spool.queueid import new_long_id
from tests.harness import require_tool


def make(tmp_path: Path) -> tuple[Path, Path, Spool, Cleanup]:
    qdir = tmp_path / "q"
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {qdir}\nmyhostname = mx.example.org\n")
    pf = tmp_path / "pf"
    pf.mkdir()
    (pf / "main.cf").write_text(f"queue_directory = {qdir}\n")
    (pf / "master.cf").write_text("")
    for cf in ("main.cf", "master.cf"):
        os.utime(pf / cf, (1_600_000_000, 1_600_000_000))
    cfg = Config.load(str(etc))
    spool = Spool.from_config(cfg)
    spool.make_dirs()
    return etc, pf, spool, Cleanup(cfg, spool)


def ctl(etc: Path, *args: str) -> str:
    res = CliRunner().invoke(cli, ["-c", str(etc), *args])
    assert res.exit_code == 0, res.output
    return res.stdout


def qshape(pf: Path, *args: str) -> str:
    exe = require_tool("qshape")
    sbin = os.path.dirname(require_tool("postconf"))
    env = dict(os.environ, PATH=f"{sbin}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    p = subprocess.run([exe, "-c", str(pf), *args], capture_output=True, timeout=60,
                       check=False, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode()


def test_odd_files_counted_as_qshape_counts_them(tmp_path: Path) -> None:
    etc, pf, spool, cleanup = make(tmp_path)
    now = int(time.time())
    long_dom = "a-really-long-subdomain-name-for-truncation." * 2 + "example"
    for i, (rcpts, sender) in enumerate([
            (["u@one.example", "v@ONE.example."], "s@a.example"),
            ([f"w@{long_dom}"], ""),
            (["x@.dots..example."], "t@b.example"),
            (["root"], "s@a.example")]):
        cleanup.submit(Envelope(sender, [Recipient(r) for r in rcpts],
                                arrival=(now - 600 * i, 0)), b"x\n", origin="smtp")
    flagged = cleanup.submit(Envelope("s@a.example", [Recipient("f@flag.example")]), b"x\n")
    os.chmod(spool.path("incoming", flagged), 0o740)  # g+r: not counted by qshape
    expired = cleanup.submit(Envelope("s@a.example", [Recipient("e@exp.example")]), b"x\n")
    os.chmod(spool.path("incoming", expired), 0o710)
    # a maildrop file (postdrop format, no C/T): its time is the file's mtime
    md = spool.path("maildrop", new_long_id(now, 5, 99))
    Path(md).write_bytes(b"".join(R.encode(t, d) for t, d in [
        (R.REC_FROM, b"m@drop.example"), (R.REC_RCPT, b"d@drop.example"),
        (R.REC_MESG, b""), (R.REC_NORM, b"hi"), (R.REC_XTRA, b""), (R.REC_END, b"")]))
    os.chmod(md, 0o700)
    os.utime(md, (now - 4000, now - 4000))
    Path(spool.queue_path("hold"), "junk").write_bytes(b"garbage")  # short name
    bad = spool.path("hold", new_long_id(now, 6, 98))
    Path(bad).write_bytes(b"Cgarbage")  # a broken record: not counted
    os.chmod(bad, 0o700)
    queues = ["incoming", "maildrop", "hold"]
    for opts in ([], ["-p", "-m", "1"], ["-w", "120"], ["-b", "3", "-t", "1"]):
        assert sorted(ctl(etc, "shape", *opts, *queues).splitlines()) == sorted(
            qshape(pf, *opts, *queues).splitlines()), opts
    # qshape -s counts the broken file as MAILER-DAEMON (its "return undef"); qmgrd
    # does not (see qmgrd.ctl.shape), so -s is compared without it
    assert sorted(ctl(etc, "shape", "-s", "incoming", "maildrop").splitlines()) == sorted(
        qshape(pf, "-s", "incoming", "maildrop").splitlines())


def test_table_layout_and_json(tmp_path: Path) -> None:
    etc, _, spool, cleanup = make(tmp_path)
    cleanup.submit(Envelope("a@x.example", [Recipient("u@one.example")]), b"x\n")
    doc = json.loads(ctl(etc, "shape", "--json"))
    assert doc["buckets"] == ["5", "10", "20", "40", "80", "160", "320", "640", "1280",
                              "1280+"]
    assert doc["rows"][0] == {"domain": "TOTAL", "total": 1, "counts": [1] + [0] * 9}
    assert doc["rows"][1]["domain"] == "one.example"
    table = count(spool, Shape(linear=True, buckets=4, bucket_time=30))
    assert table.headings == ["T", "30", "60", "90", "90+"]
    empty = Table(["T", "5", "5+"], [("TOTAL", [0, 0, 0])])
    assert format_table(empty) == " " * 71 + "  T  5 5+\n" + " " * 66 + "TOTAL  0  0  0\n"


def test_damaged_file_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """shape skips a damaged queue file as before, but says so on stderr (queue/<id>,
    why); the table (and --json) on stdout stays valid, exit 0. Files in the corrupt
    queue are known to be damaged: no warning for them."""
    etc, _, spool, cleanup = make(tmp_path)
    ids = [cleanup.submit(Envelope("a@x.example", [Recipient(f"u{i}@one.example")]),
                          b"x\n" * 40) for i in range(3)]
    for qid in ids:
        spool.move(qid, "incoming", "deferred")
    cut = spool.path("deferred", ids[1])
    data = Path(cut).read_bytes()
    Path(cut).write_bytes(data[: len(data) // 2])
    Path(spool.queue_path("corrupt")).mkdir(exist_ok=True)
    bad = Path(spool.queue_path("corrupt"), new_long_id(int(time.time()), 1, 97))
    bad.write_bytes(b"Cgarbage")
    os.chmod(bad, 0o700)
    for args in (["deferred", "corrupt"], ["--json", "deferred", "corrupt"]):
        res = CliRunner().invoke(cli, ["-c", str(etc), "shape", *args])
        assert res.exit_code == 0
        assert res.stderr.splitlines() == [(
            f"qmgr-ctl: warning: deferred/{ids[1]}: damaged queue file: no "
            "extracted-envelope record (X) after the message content (truncated?); "
            "skipped")], res.stderr
    assert json.loads(res.stdout)["rows"][0]["total"] == 2


def test_a_huge_bucket_count_is_a_usage_error_not_a_memory_error(tmp_path: Path) -> None:
    """-b takes 1 to 100 buckets (each twice the previous one): -b 999999999999 was a
    MemoryError traceback; 100 still works."""
    etc, _, _, cleanup = make(tmp_path)
    cleanup.submit(Envelope("a@x.example", [Recipient("u@one.example")]), b"x\n")
    res = CliRunner().invoke(cli, ["-c", str(etc), "shape", "-b", "999999999999"])
    assert res.exit_code == 64 and "Invalid value for '-b'" in res.stderr, res.exception
    doc = json.loads(ctl(etc, "shape", "--json", "-b", "100"))
    assert len(doc["buckets"]) == 100
