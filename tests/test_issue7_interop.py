"""Issue 7 acceptance: qmgr-ctl against Postfix's own tools.

* ``qshape -c <config dir>`` and ``qmgr-ctl shape`` print the same table on the same
  queue: 540 messages in deferred, hold and active, 30 domains (plus subdomains for
  ``-p``), ages spread over nine days (T records; the files' mtimes are set too);
* ``postcat`` and ``qmgr-ctl show`` print the same file the same way (sender,
  recipients with the done ones, headers, body) for every corpus message;
* Debian's ``pflogsumm`` over our maillog after a mixed run (sent, deferred, bounced)
  reports the counts the test caused.

Under CI=true a missing tool fails these tests (tests.harness.require_tool).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from master.config import Config
from qmgrd.ctl.cli import cli
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from tests.harness import (
    MailSystem,
    MakeSystem,
    inject_many,
    maildir_messages,
    require_tool,
    wait_for,
)
from tests.tools.scenario_smtpd import Scenario
from tests.tools.smtpd_system import smtp, wait_smtpd

CORPUS = Path(__file__).parent / "data" / "corpus"
# Ages (minutes) in the middle of qshape's default buckets (5-minute ticks, doubling),
# so that the seconds between the two runs never move a message across a boundary.
AGES = [2.5, 7.5, 15, 30, 60, 120, 240, 480, 960, 2000, 5000, 13000]


class Q:
    """A queue directory with our main.cf and a Postfix config dir for its tools."""

    def __init__(self, tmp_path: Path) -> None:
        self.qdir = tmp_path / "q"
        self.etc = tmp_path / "qmgrd"
        self.etc.mkdir()
        (self.etc / "main.cf").write_text(
            f"queue_directory = {self.qdir}\nmyhostname = mx.example.org\n"
            "mail_owner = root\n")
        self.pf = tmp_path / "postfix"
        self.pf.mkdir()
        (self.pf / "main.cf").write_text(f"queue_directory = {self.qdir}\n")
        (self.pf / "master.cf").write_text("")
        for cf in ("main.cf", "master.cf"):  # Postfix waits while a config file is "new"
            os.utime(self.pf / cf, (1_600_000_000, 1_600_000_000))
        cfg = Config.load(str(self.etc))
        self.spool = Spool.from_config(cfg)
        self.spool.make_dirs()
        self.cleanup = Cleanup(cfg, self.spool)

    def tool(self, name: str, *args: str) -> str:
        exe = require_tool(name)
        sbin = os.path.dirname(require_tool("postconf"))  # qshape runs postconf
        env = dict(os.environ, PATH=f"{sbin}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        p = subprocess.run([exe, "-c", str(self.pf), *args], capture_output=True,
                           timeout=60, check=False, env=env)
        assert p.returncode == 0, p.stderr
        return p.stdout.decode("utf-8", "replace")

    def ctl(self, *args: str) -> str:
        res = CliRunner().invoke(cli, ["-c", str(self.etc), *args])
        assert res.exit_code == 0, (res.output, res.exception)
        return res.stdout


@pytest.fixture
def q(tmp_path: Path) -> Q:
    return Q(tmp_path)


def build_shape_queue(q: Q, n: int = 540) -> dict[str, int]:
    """n messages over deferred/hold/active, 30 domains; returns messages per queue."""
    rnd = random.Random(7)
    domains = [f"dom{i}.example" for i in range(24)]
    domains += [f"h{i}.sub.example" for i in range(6)]  # a parent with 6 subdomains
    now = time.time()
    per_queue = {"deferred": 0, "hold": 0, "active": 0}
    for i in range(n):
        age = AGES[i % len(AGES)] * 60
        arrival = int(now - age)
        rcpts = [f"user{j}@{rnd.choice(domains)}" for j in range(1 + i % 3)]
        sender = "" if i % 17 == 0 else f"s{i % 5}@sender{i % 4}.example"
        qid = q.cleanup.submit(Envelope(sender, [Recipient(r) for r in rcpts],
                                        arrival=(arrival, 0)),
                               b"Subject: shape\n\nbody\n", origin="smtp")
        if i % 7 == 0 and len(rcpts) > 1:  # a done recipient is not counted
            with QueueFile.open(q.spool, "incoming", qid, lock=None) as qf:
                qf.mark_done(qf.recipients[0].offset)
        queue = ("deferred", "hold", "active")[i % 3]
        path = q.spool.move(qid, "incoming", queue)
        retry = now + 300 if queue == "deferred" else arrival
        os.utime(path, (retry, retry))
        per_queue[queue] += 1
    return per_queue


def lines(text: str) -> tuple[str, list[str]]:
    """(heading line, the other lines sorted: rows with equal totals and name lengths
    come in Perl's hash order in qshape)."""
    out = text.splitlines()
    return out[0], sorted(out[1:])


@pytest.mark.timeout(120)
def test_qshape_and_shape_agree(q: Q) -> None:
    per_queue = build_shape_queue(q)
    assert min(per_queue.values()) >= 100 and sum(per_queue.values()) >= 500
    queues = ["deferred", "hold", "active"]
    for opts in ([], ["-s"], ["-p"], ["-p", "-m", "3"], ["-b", "6", "-t", "10"],
                 ["-l", "-b", "12", "-t", "60"], ["-w", "100"]):
        theirs = q.tool("qshape", *opts, *queues)
        ours = q.ctl("shape", *opts, *queues)
        assert lines(ours) == lines(theirs), (opts, ours, theirs)
    table = q.ctl("shape", *queues)
    total = table.splitlines()[1].split()
    assert total[0] == "TOTAL" and int(total[1]) > 540
    assert sum(1 for x in total[2:] if int(x) > 0) >= 8  # ages really are spread
    assert lines(q.ctl("shape")) == lines(q.tool("qshape"))  # incoming active


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.eml")))
def test_postcat_and_show_agree(q: Q, name: str) -> None:
    data = (CORPUS / name).read_bytes()
    env = Envelope("alice@example.org", [Recipient("bob@example.net"),
                                         Recipient("carol@example.org", notify=8),
                                         Recipient("dave@example.com")],
                   fullname="Alice Example", envid="ENV-7", arrival=(1_700_000_000, 0))
    # over hopcount_limit, smtpd input is refused (554 5.4.0): that one goes in as local
    # input, which cleanup queues with every recipient bounced
    qid = q.cleanup.submit(env, data, origin="local" if name.startswith("10-") else "smtp")
    with QueueFile.open(q.spool, "incoming", qid, lock=None) as qf:
        if qf.recipients:
            qf.mark_done(qf.recipients[0].offset)
    q.spool.move(qid, "incoming", "deferred")
    statuslog.append(q.spool, "defer", qid, Recipient("carol@example.org"),
                     statuslog.Dsn("4.2.0", "delayed", "try later"))
    path = q.spool.path("deferred", qid)
    theirs = q.tool("postcat", path)
    ours = q.ctl("show", qid)
    file_part, _, logs = ours.partition(f"*** MESSAGE FILE END {path} ***\n")
    assert file_part + f"*** MESSAGE FILE END {path} ***\n" == theirs
    assert "*** DEFER LOG" in logs and "carol@example.org" in logs and "try later" in logs
    for flag, theirs_flag in (("--headers", "-h"), ("--body", "-b"), ("--envelope", "-e")):
        mine = q.ctl("show", flag, qid)
        if flag == "--envelope":
            mine = mine.partition(f"*** MESSAGE FILE END {path} ***\n")[0] \
                + f"*** MESSAGE FILE END {path} ***\n"
        assert mine == q.tool("postcat", theirs_flag, path), flag
    done = [x for x in file_part.splitlines() if x.startswith("done_recipient: ")]
    todo = [x for x in file_part.splitlines() if x.startswith("recipient: ")]
    if name.startswith("10-"):  # over hopcount_limit: cleanup bounced every recipient
        assert len(done) == 3 and not todo
    else:
        assert done == ["done_recipient: bob@example.net"]
        assert todo == ["recipient: carol@example.org", "recipient: dave@example.com"]
    assert "sender: alice@example.org" in file_part.splitlines()


# --------------------------------------------------------------------------- pflogsumm
def smtpd_port(ms: MailSystem) -> int:
    """The loopback port of the instance's smtpd (the harness gives it a free one)."""
    m = re.search(r"^127\.0\.0\.1:(\d+)\s+inet\s", (ms.etc / "master.cf").read_text(), re.MULTILINE)
    assert m, "no smtpd in master.cf"
    return int(m.group(1))


def totals(report: str) -> dict[str, int]:
    """pflogsumm's "Grand Totals" message counts by label."""
    out: dict[str, int] = {}
    section = report.split("Grand Totals", 1)[1].split("bytes received", 1)[0]
    for m in re.finditer(r"^\s+(\d+)\s+([a-z][a-z ]*?)(?:\s+\(|\s*$)", section, re.MULTILINE):
        out[m.group(2).strip()] = int(m.group(1))
    return out


@pytest.mark.timeout(60)
def test_pflogsumm_counts_what_we_did(mailsys: MakeSystem, tmp_path: Path) -> None:
    pflogsumm = require_tool("pflogsumm")
    scen = Scenario(tmp_path / "scen", {"ok.example": "accept", "late.example": "defer",
                                        "bad.example": "reject"})
    try:
        # loopback is not in mynetworks here, so relaying through smtpd is refused
        ms = mailsys(main={"mynetworks": "192.0.2.0/24",
                           "smtpd_relay_restrictions":
                               "permit_mynetworks, reject_unauth_destination"})
        table = ms.etc / "transport"
        table.write_text(scen.transport_lines())
        ms.write_main(transport_maps=f"texthash:{table}")
        ms.start()
        port = smtpd_port(ms)
        wait_smtpd(port)
        rejected = 2
        with smtp(port) as c:
            c.ehlo()
            c.mail("carol@client.test.example")
            for i in range(rejected):
                code, text = c.rcpt(f"r{i}@foreign.example")
                assert code == 554 and b"5.7.1" in text, (code, text)
        sent, deferred, bounced = 6, 3, 2
        jobs = [(["-i", "-f", "alice@mail.test.example", f"u{i}@ok.example"],
                 f"Subject: s{i}\n\nbody\n".encode()) for i in range(sent)]
        jobs += [(["-i", "-f", "alice@mail.test.example", f"d{i}@late.example"],
                  f"Subject: d{i}\n\nbody\n".encode()) for i in range(deferred)]
        jobs += [(["-i", "-f", "alice@mail.test.example", f"b{i}@bad.example"],
                  f"Subject: b{i}\n\nbody\n".encode()) for i in range(bounced)]
        inject_many(ms, jobs)
        wait_for(lambda: len(scen.messages("ok.example")) == sent, 30, "the sent mail")
        wait_for(lambda: len(maildir_messages(ms, "alice")) == bounced, 30,
                 "the non-delivery notices")
        wait_for(lambda: len(ms.queue_files("deferred")) == deferred
                 and not ms.queue_files("incoming", "active", "maildrop"), 30,
                 "only the deferred mail left")
        p = subprocess.run([pflogsumm, "--syslog-name=qmgrd", str(ms.maillog)],
                           capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 0, p.stderr
        got = totals(p.stdout)
        # received: every message picked up; delivered: the sent ones plus the notices
        # delivered to alice's mailbox; deferred: messages; bounced: recipients
        assert got["received"] == sent + deferred + bounced, p.stdout
        assert got["delivered"] == sent + bounced, p.stdout
        assert got["deferred"] == deferred, p.stdout
        assert got["bounced"] == bounced, p.stdout
        assert got["rejected"] == rejected, p.stdout
    finally:
        scen.stop()
