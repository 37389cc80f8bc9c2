"""Golden interop tests: Postfix's own postcat and qshape read qmgrd queue files.

Under CI=true a missing tool fails these tests instead of skipping them.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from master.config import Config
from qmgrd.sendmail import run as sendmail_run
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool

CORPUS = Path(__file__).parent / "data" / "corpus"


def need(name: str) -> str:
    for d in ("/usr/sbin", "/usr/bin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required when CI=true (install Debian's postfix)")
        pytest.skip(f"{name} not installed")
    return found


class Q:
    """A queue directory plus a Postfix config dir (main.cf with queue_directory)."""

    def __init__(self, tmp_path: Path) -> None:
        self.qdir = tmp_path / "q"
        ours = tmp_path / "qmgrd"
        ours.mkdir()
        (ours / "main.cf").write_text(
            f"queue_directory = {self.qdir}\nmyhostname = mx.example.org\n")
        self.ours = ours
        self.pf = tmp_path / "postfix"
        self.pf.mkdir()
        (self.pf / "main.cf").write_text(f"queue_directory = {self.qdir}\n")
        (self.pf / "master.cf").write_text("")
        for cf in ("main.cf", "master.cf"):  # Postfix waits while a config file is "new"
            os.utime(self.pf / cf, (1_600_000_000, 1_600_000_000))
        cfg = Config.load(str(ours))
        self.spool = Spool.from_config(cfg)
        self.spool.make_dirs()
        self.cleanup = Cleanup(cfg, self.spool)

    def run(self, tool: str, *args: str) -> str:
        exe = need(tool)
        if tool == "qshape":  # qshape runs postconf from $PATH for queue_directory
            sbin = os.path.dirname(need("postconf"))
            env = dict(os.environ, PATH=f"{sbin}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        else:
            env = None
        p = subprocess.run([exe, "-c", str(self.pf), *args], capture_output=True,
                           timeout=30, check=False, env=env)
        assert p.returncode == 0, p.stderr
        return p.stdout.decode("utf-8", "replace")


@pytest.fixture
def q(tmp_path: Path) -> Q:
    return Q(tmp_path)


@pytest.mark.parametrize("name", ["01-plain.eml", "04-long-lines.eml", "03-utf8-8bit.eml",
                                  "06-no-final-newline.eml", "12-headers-only.eml"])
def test_postcat_decodes_cleanup_file(q: Q, name: str) -> None:
    data = (CORPUS / name).read_bytes()
    e = Envelope("alice@example.org", [Recipient("bob@example.net"),
                                       Recipient("carol@example.org", notify=8)],
                 fullname="Alice Example", envid="ENV-7")
    qid = q.cleanup.submit(e, data, origin="smtp")
    with QueueFile.open(q.spool, "incoming", qid, lock="sh") as qf:
        qf.mark_done(qf.recipients[0].offset)
    out = q.run("postcat", str(q.spool.path("incoming", qid)))
    lines = out.split("\n")
    assert "sender: alice@example.org" in lines
    assert "sender_fullname: Alice Example" in lines
    assert "done_recipient: bob@example.net" in lines
    assert "recipient: carol@example.org" in lines
    assert "named_attribute: envelope_id=ENV-7" in lines
    assert "named_attribute: notify_flags=8" in lines
    assert any(x.startswith("message_arrival_time: ") for x in lines)
    start = lines.index(f"*** MESSAGE CONTENTS {q.spool.path('incoming', qid)} ***")
    end = lines.index(f"*** HEADER EXTRACTED {q.spool.path('incoming', qid)} ***")
    body = "\n".join(lines[start + 1 : end]).encode()
    want = data.replace(b"\r\n", b"\n").rstrip(b"\n")
    assert body.replace(b"\n", b"") == want.replace(b"\n", b"")
    assert body.split(b"\n")[:3] == want.split(b"\n")[:3]
    assert lines[-2] == f"*** MESSAGE FILE END {q.spool.path('incoming', qid)} ***"


def test_postcat_queue_id_lookup_and_offsets(q: Q) -> None:
    qid = q.cleanup.submit(Envelope("a@example.org", [Recipient("b@example.net")]),
                           b"Subject: s\n\nbody\n")
    out = q.run("postcat", "-o", "-q", qid)
    with QueueFile.open(q.spool, "incoming", qid) as qf:
        r = qf.recipients[0]
        assert f"{r.offset:9d} recipient: b@example.net" in out
        assert f"{qf.data_offset - 2:9d} *** MESSAGE CONTENTS" in out
    assert "Received: by mx.example.org (qmgrd, from userid" in out
    assert f"Message-ID: <{qid}@mx.example.org>" in out


def test_postcat_reads_maildrop_file(q: Q) -> None:
    err = io.StringIO()
    assert sendmail_run(["-c", str(q.ours), "-f", "s@example.org", "-F", "Full N", "-N",
                         "delay", "r@example.net"], io.BytesIO(b"Subject: s\n\nbody\n"),
                        err) == 0
    [name] = os.listdir(q.spool.queue_path("maildrop"))
    out = q.run("postcat", q.spool.path("maildrop", name))
    for want in ("sender_fullname: Full N", "sender: s@example.org",
                 "named_attribute: notify_flags=8", "recipient: r@example.net",
                 "Subject: s", "body"):
        assert want in out.split("\n")


def test_qshape_counts_our_queue(q: Q) -> None:
    q.cleanup.submit(Envelope("a@example.com", [Recipient("x@example.net"),
                                                 Recipient("y@example.org"),
                                                 Recipient("z@example.org")]), b"x\n")
    qid = q.cleanup.submit(Envelope("", [Recipient("w@example.org"),
                                         Recipient("v@example.net")]), b"x\n")
    with QueueFile.open(q.spool, "incoming", qid) as qf:
        qf.mark_done(qf.recipients[1].offset)  # D records are not counted
    f, _, _ = q.spool.create("incoming")  # not ready: ignored
    with f:
        f.write(b"garbage")
    q.spool.move(qid, "incoming", "deferred")  # hashed subdirectory

    def rows(out: str) -> dict[str, list[int]]:
        res = {}
        for line in out.strip().split("\n")[1:]:
            name, *nums = line.split()
            res[name] = [int(n) for n in nums]
        return res

    r = rows(q.run("qshape", "incoming", "deferred"))
    assert r["TOTAL"][0] == 4
    assert r["example.org"][0] == 3 and r["example.net"][0] == 1
    s = rows(q.run("qshape", "-s", "incoming", "deferred"))
    assert s["example.com"][0] == 1 and s["MAILER-DAEMON"][0] == 1
