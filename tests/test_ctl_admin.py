"""qmgr-ctl hold/release/delete/requeue/flush/suspend/resume and the selectors, without a
running mail system (no qmgr: files, including active ones, are changed directly)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from master.config import Config
from qmgrd.ctl import admin as ctl_admin
from qmgrd.ctl.cli import EX_DATAERR, EX_NOINPUT, EX_TEMPFAIL, EX_USAGE, cli
from qmgrd.ctl.select import Selector, parse_age, parse_domain
from qmgrd.ctl.showq import QueueEntry
from qmgrd.qmgr import suspend as susp
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import Cleanup
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.queue import Spool

T0 = 1_700_000_000


class Q:
    def __init__(self, tmp_path: Path) -> None:
        self.etc = tmp_path / "etc"
        self.etc.mkdir()
        (self.etc / "main.cf").write_text(
            f"queue_directory = {tmp_path}/q\nmyhostname = mx.example.org\n"
            f"maillog_file = {tmp_path}/maillog\n")
        cfg = Config.load(str(self.etc))
        self.spool = Spool.from_config(cfg)
        self.spool.make_dirs()
        self.cleanup = Cleanup(cfg, self.spool)
        self.maillog = tmp_path / "maillog"

    def submit(self, queue: str, sender: str, rcpts: list[str], when: int = T0) -> str:
        qid = self.cleanup.submit(Envelope(sender, [Recipient(r) for r in rcpts],
                                           arrival=(when, 0)), b"Subject: t\n\nhi\n",
                                  origin="smtp")
        if queue != "incoming":
            self.spool.move(qid, "incoming", queue)
        return qid

    def run(self, *args: str, stdin: str | bytes | None = None) -> tuple[int, str, str]:
        res = CliRunner().invoke(cli, ["-c", str(self.etc), *args], input=stdin)
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        return res.exit_code, res.stdout, res.stderr

    def where(self, qid: str) -> list[str]:
        return [q for q in ("maildrop", "incoming", "active", "deferred", "hold")
                if os.path.exists(self.spool.path(q, qid))]


@pytest.fixture
def q(tmp_path: Path) -> Q:
    return Q(tmp_path)


def test_hold_release_delete_by_id(q: Q) -> None:
    a = q.submit("deferred", "a@x.example", ["r@one.example"])
    b = q.submit("incoming", "b@x.example", ["r@two.example"])
    assert q.run("hold", a, b) == (0, f"{a}: placed on hold\n{b}: placed on hold\n",
                                   "qmgr-ctl: Placed on hold: 2 messages\n")
    assert q.where(a) == q.where(b) == ["hold"]
    code, out, _ = q.run("list")
    assert code == 0 and f"{a}!" in out and f"{b}!" in out
    assert q.run("release", a)[:2] == (0, f"{a}: released from hold\n")
    assert q.where(a) == ["deferred"]
    statuslog.append(q.spool, "defer", a, Recipient("r@one.example"),
                     statuslog.Dsn("4.2.0", "delayed", "later"))
    assert q.run("delete", a, b)[0] == 0
    assert q.where(a) == q.where(b) == []
    assert not os.path.exists(q.spool.path("defer", a))
    log = q.maillog.read_text()
    assert "qmgrd/qmgr-ctl[" in log and f"{a}: removed" in log and f"{b}: placed on hold" in log
    # the host field is the one every daemon writes (the system's short name), not
    # myhostname's first label: one log, one host name
    host = socket.gethostname().split(".")[0]
    assert all(line.split()[3] == host for line in log.splitlines()), log


def test_ids_from_stdin_all_and_dry_run(q: Q) -> None:
    ids = [q.submit("deferred", "a@x.example", [f"r{i}@one.example"]) for i in range(3)]
    code, out, err = q.run("delete", "--dry-run", "-", stdin=f"{ids[0]}*\n{ids[1]}!\n")
    assert code == 0 and out == "".join(f"{i}: would be removed (queue deferred)\n"
                                        for i in ids[:2])
    assert err == "qmgr-ctl: dry run: 2 messages would be removed\n"
    assert all(q.where(i) == ["deferred"] for i in ids)
    assert q.run("hold", "ALL")[2] == "qmgr-ctl: Placed on hold: 3 messages\n"
    assert q.run("release", "ALL")[2] == "qmgr-ctl: Released from hold: 3 messages\n"
    assert q.run("hold", "all")[0] == EX_DATAERR  # ALL must be upper case, as postsuper
    assert q.run("hold", "ALL", ids[0])[0] == EX_USAGE
    assert q.run("hold")[0] == EX_USAGE  # no message named


def test_all_skips_mail_gone_since_it_was_selected(q: Q,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """hold ALL while mail flows: a message delivered between the selection and its
    turn is no error (postsuper -h ALL says nothing); a named one still is (66)."""
    from qmgrd.ctl import admin

    ids = [q.submit("deferred", "a@x.example", [f"r{i}@one.example"]) for i in range(3)]
    run = admin.Admin.run

    def delivered_meanwhile(self: admin.Admin, targets: list[tuple[str, str | None]]
                            ) -> list[admin.Report]:
        os.unlink(q.spool.path("deferred", ids[1]))
        return run(self, targets)

    monkeypatch.setattr(admin.Admin, "run", delivered_meanwhile)
    code, out, err = q.run("hold", "ALL")
    assert (code, err) == (0, "qmgr-ctl: Placed on hold: 2 messages\n")
    assert sorted(out.splitlines()) == sorted([f"{ids[0]}: placed on hold",
                                               f"{ids[2]}: placed on hold"])
    monkeypatch.setattr(admin.Admin, "run", run)
    code, _, err = q.run("release", ids[1])
    assert code == EX_NOINPUT and "no such message" in err


def test_dash_with_nothing_on_stdin_names_nothing(q: Q) -> None:
    """``list | grep nomatch | awk ... | delete -``: no id read means nothing is done
    (postsuper -d -), never "every message" - with or without selectors, dry run or
    not."""
    ids = [q.submit("deferred", "a@x.example", [f"r{i}@one.example"]) for i in range(2)]
    held = q.submit("hold", "a@x.example", ["h@one.example"])
    for args, stdin in ((["delete", "-"], ""), (["delete", "-"], "\n  \n"),
                        (["hold", "-"], ""), (["release", "-"], ""),
                        (["requeue", "-"], ""), (["delete", "--dry-run", "-"], ""),
                        (["delete", "-", "--sender", "a@x.example"], "")):
        code, out, err = q.run(*args, stdin=stdin)
        assert (code, out) == (0, ""), (args, err)
        assert " 0 messages" in err, (args, err)
    assert all(q.where(i) == ["deferred"] for i in ids) and q.where(held) == ["hold"]
    code, out, _ = q.run("delete", "-", "--sender", "a@x.example", stdin=f"{ids[0]}\n")
    assert (code, out) == (0, f"{ids[0]}: removed\n")  # the selector narrows the ids read
    assert q.where(ids[1]) == ["deferred"] and q.where(held) == ["hold"]


def test_requeue_moves_to_incoming_now(q: Q) -> None:
    qid = q.submit("deferred", "a@x.example", ["r@one.example"])
    os.utime(q.spool.path("deferred", qid), (T0 + 10**6, T0 + 10**6))
    statuslog.append(q.spool, "defer", qid, Recipient("r@one.example"),
                     statuslog.Dsn("4.2.0", "delayed", "later"))
    assert q.run("requeue", qid)[:2] == (0, f"{qid}: requeued\n")
    assert q.where(qid) == ["incoming"]
    assert abs(os.stat(q.spool.path("incoming", qid)).st_mtime - time.time()) < 5
    assert not os.path.exists(q.spool.path("defer", qid))


def test_invalid_ids_touch_nothing(q: Q) -> None:
    qid = q.submit("deferred", "a@x.example", ["r@one.example"])
    for bad in ("../../etc/passwd", "a\0b", "a\nb", "4SVLCh0sf8z9HdB/x", "", "."):
        code, out, err = q.run("hold", bad)
        assert code == EX_DATAERR and out == "", bad
        assert "warning: invalid mail queue id" in err
    code, _, err = q.run("delete", "-", stdin=b"ok\x00\n")
    assert code == EX_DATAERR
    assert q.where(qid) == ["deferred"]
    code, out, err = q.run("delete", "4SVLCh0sf8z9HdB", qid)
    assert code == EX_NOINPUT and out == f"{qid}: removed\n"
    assert "4SVLCh0sf8z9HdB: no such message in hold, incoming, active, deferred" in err
    assert q.run("show", "../x")[0] == EX_DATAERR
    assert q.run("flush", "--id", "../x")[0] == EX_DATAERR


def test_an_invalid_id_is_warned_about_and_the_valid_ones_are_done(q: Q) -> None:
    """postsuper -d -: "warning: invalid mail queue id: ..." for the bad id, the rest
    deleted; qmgr-ctl exits 65 at the end (it rejected the whole list, exit 65)."""
    one = q.submit("deferred", "a@x.example", ["r@one.example"])
    two = q.submit("deferred", "a@x.example", ["r@two.example"])
    code, out, err = q.run("delete", "-", stdin=f"{one}\n../../etc/passwd\n{two}\n")
    assert code == EX_DATAERR
    assert "qmgr-ctl: warning: invalid mail queue id: '../../etc/passwd'" in err
    assert out == f"{one}: removed\n{two}: removed\n"
    assert q.where(one) == q.where(two) == []
    three = q.submit("deferred", "a@x.example", ["r@three.example"])
    for action, where in (("hold", ["hold"]), ("release", ["deferred"]),
                          ("requeue", ["incoming"])):
        code, out, err = q.run(action, "a/b", three)
        assert code == EX_DATAERR, (action, err)
        assert "invalid mail queue id: 'a/b'" in err and three in out
        assert q.where(three) == where


def test_active_file_locked_by_an_agent_is_busy(q: Q) -> None:
    qid = q.submit("active", "a@x.example", ["r@one.example"])
    fd = os.open(q.spool.path("active", qid), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        code, out, err = q.run("delete", qid)
        assert code == EX_TEMPFAIL and "still being delivered" in err and out == ""
        assert q.where(qid) == ["active"]
    finally:
        os.close(fd)
    assert q.run("delete", qid)[:2] == (0, f"{qid}: removed\n")


def test_selectors_pick_the_messages(q: Q) -> None:
    now = int(time.time())
    old = q.submit("deferred", "alice@x.example", ["r@one.example", "s@two.example"],
                   now - 3 * 86400)
    new = q.submit("deferred", "", ["t@one.example"], now - 60)
    held = q.submit("hold", "bob@y.example", ["u@sub.one.example"], now - 7200)
    statuslog.append(q.spool, "defer", old, Recipient("r@one.example"),
                     statuslog.Dsn("4.4.1", "delayed", "connect to mx.one.example: refused"))

    def ids(*args: str) -> list[str]:
        code, out, err = q.run("list", "--json", *args)
        assert code == 0, err
        return sorted(json.loads(x)["queue_id"] for x in out.splitlines())

    assert ids("--domain", "one.example") == sorted([old, new])
    assert ids("--domain", ".one.example") == [held]
    assert ids("--domain", "two.example", "--domain", "sub.one.example") == sorted(
        [old, held])
    assert ids("--sender", "ALICE@*") == [old]
    assert ids("--sender", "<>") == [new]
    assert ids("--recipient", "?@one.example", "--queue", "deferred") == sorted([old, new])
    assert ids("--older-than", "1d") == [old]
    assert ids("--younger-than", "1h") == [new]
    assert ids("--older-than", "1h", "--younger-than", "1d") == [held]
    assert ids("--reason", r"connect to \S+: refused") == [old]
    assert ids("--queue", "hold", "--sender", "nobody@*") == []
    code, out, _ = q.run("list", "--queue", "hold")
    assert out.endswith("-- 0 Kbytes in 1 Request.\n")
    # nothing selected is not an empty queue
    assert q.run("list", "--recipient", "nobody@*") == (0, "No message matches\n", "")
    for bad in (["--older-than", "ten"], ["--domain", "../etc"], ["--reason", "("],
                ["--queue", "corrupt"]):
        code, _, err = q.run("list", *bad)
        assert code == EX_USAGE and err, bad
    code, out, _ = q.run("hold", "--domain", "one.example", "--older-than", "2d")
    assert out == f"{old}: placed on hold\n" and q.where(new) == ["deferred"]
    assert q.run("delete", "--queue", "active", "--dry-run", held)[0] == 0
    assert q.run("release", "--queue", "deferred", "ALL")[0] == EX_USAGE


def test_selector_unit() -> None:
    assert [parse_age(x) for x in ("90", "90s", "5m", "2h", "1d", "1w")] == [
        90, 90, 300, 7200, 86400, 604800]
    for bad in ("", "-1", "1y", "1.5h", "5 m x"):
        with pytest.raises(ValueError):
            parse_age(bad)
    assert parse_domain("Example.COM.") == "example.com"
    for bad in ("../x", "a b", "a\0", "[127.0.0.1]"):
        with pytest.raises(ValueError):
            parse_domain(bad)
    e = QueueEntry("deferred", "4SVLCh0sf8z9HdB", 100, 1, False, "a", [],
                   raw_sender="A@X.example", raw_recipients=["u@d.example"],
                   last_reason="450 busy")
    assert Selector(senders=("a@x.*",), now=200).match(e)
    assert not Selector(senders=("b@*",), now=200).match(e)
    assert Selector(reason="busy$", older_than=100, now=200).match(e)
    assert not Selector(younger_than=100, now=200).match(e)
    assert not Selector().active and Selector(domains=("d.example",)).active


def test_flush_by_id_and_site(q: Q) -> None:
    a = q.submit("deferred", "a@x.example", ["r@one.example"])
    b = q.submit("deferred", "a@x.example", ["r@two.example"])
    c = q.submit("deferred", "a@x.example", ["r@x.two.example"])
    h = q.submit("hold", "a@x.example", ["r@one.example"])
    for qid in (a, b, c):
        os.utime(q.spool.path("deferred", qid), (T0 + 10**7, T0 + 10**7))
    code, out, err = q.run("flush", "--id", a, "--id", h)
    assert out == f"{a}: flushed\n" and "on hold; release it first" in err
    assert code == 66  # not 75: trying again cannot help until it is released
    assert q.where(a) == ["incoming"]
    mode = os.stat(q.spool.path("incoming", a)).st_mode
    assert mode & stat.S_IRGRP  # postqueue -i: unthrottle this message
    assert abs(os.stat(q.spool.path("incoming", a)).st_mtime - time.time()) < 5
    code, out, err = q.run("flush", "--site", ".two.example", "--pace", "0")
    assert code == 0 and "flushed 1 deferred message for .two.example" in err
    assert q.where(c) == ["incoming"] and q.where(b) == ["deferred"]
    code, out, err = q.run("flush", "--site", "two.example", "--batch", "1", "--pace", "0")
    assert q.where(b) == ["incoming"]
    assert q.run("flush", "--site", "x", "--id", a)[0] == EX_USAGE
    code, _, err = q.run("flush", "--site", "")  # not "flush nothing, exit 0"
    assert code == EX_USAGE and "bad domain ''" in err


def test_suspend_and_resume_edit_the_file(q: Q) -> None:
    code, out, err = q.run("suspend", "Example.COM", "--for", "1h", "--reason", "upgrade")
    assert code == 0, err
    assert "suspended by the administrator until" in out and "upgrade" in out
    assert "the qmgr is not running" in out
    path = susp.suspend_path(q.spool.queue_directory)
    (s,) = susp.load(path, time.time())
    assert s.domain == "example.com" and s.reason == "upgrade"
    assert 3500 < s.until - time.time() <= 3600
    assert q.run("suspend", "[127.0.0.1]:2525")[0] == 0
    assert len(susp.load(path, time.time())) == 2
    qid = q.submit("deferred", "a@x.example", ["r@example.com"])
    statuslog.append(q.spool, "defer", qid, Recipient("r@example.com"),
                     statuslog.Dsn("4.3.2", "delayed", s.text))
    code, out, _ = q.run("resume", "example.com", "--pace", "0")
    assert out == "delivery to example.com resumed; 1 deferred message(s) flushed\n"
    assert q.where(qid) == ["incoming"]
    assert [x.domain for x in susp.load(path, time.time())] == ["[127.0.0.1]:2525"]
    for bad in (["suspend", "../../etc"], ["suspend", "x.example", "--for", "0s"],
                ["suspend", "x.example", "--reason", "a\nb"], ["resume", "a/b"]):
        assert q.run(*bad)[0] == EX_USAGE, bad


def test_suspend_and_resume_on_a_full_disk(q: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    """A suspension file that cannot be written (ENOSPC) is one fatal line naming the
    file and the system's words, not Python's ``[Errno 28]``, exit 75 (EX_TEMPFAIL, as
    the README says); the old file is kept and no temporary file is left behind."""
    path = susp.suspend_path(q.spool.queue_directory)
    assert q.run("suspend", "example.com")[0] == 0
    before = Path(path).read_bytes()
    write = os.write

    def full(fd: int, data: bytes) -> int:
        if "qmgr-suspend" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(os, "write", full)
    code, out, err = q.run("suspend", "other.example")
    assert (code, out, err) == (EX_TEMPFAIL, "", (
        f"qmgr-ctl: fatal: suspend other.example: cannot update {path}: No space left "
        "on device; nothing changed\n"))
    code, out, err = q.run("resume", "example.com", "--pace", "0")
    assert (code, out, err) == (EX_TEMPFAIL, "", (
        f"qmgr-ctl: fatal: resume example.com: cannot update {path}: No space left on "
        "device; the suspension still holds\n"))
    monkeypatch.undo()
    assert Path(path).read_bytes() == before
    assert sorted(os.listdir(os.path.dirname(path))) == ["qmgr-suspend", "qmgr-suspend.lock"]


def test_show_json_and_missing(q: Q) -> None:
    qid = q.submit("deferred", "a@x.example", ["r@one.example", "s@two.example"])
    code, out, _ = q.run("show", "--json", qid)
    assert code == 0
    doc = json.loads(out)
    assert doc["queue_name"] == "deferred" and doc["sender"] == "a@x.example"
    assert [r["address"] for r in doc["recipients"]] == ["r@one.example", "s@two.example"]
    assert doc["headers"].startswith("Subject: t\n") and "\nMessage-ID: <" in doc["headers"]
    assert doc["body"] == "\nhi\n"
    assert q.run("show", "4SVLCh0sf8z9HdB")[0] == EX_NOINPUT


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)), max_size=4),
    junk=st.sampled_from(["", "garbage line\n", "\n\n", "<x>: old style\n", "offset=x\n",
                          "recipient=<>\n", "reason=only\n\n", "ö=1\n", " \n"]))
def test_listing_reads_defer_logs_as_statuslog_does(tmp_path: Path, entries: list[tuple[
        str, str]], junk: str) -> None:
    from qmgrd.ctl.showq import _defer_reasons

    spool = Spool(str(tmp_path / "q"))
    spool.make_dirs()
    qid = "4SVLCh0sf8z9HdB"
    data = b"".join(statuslog.format_entry(Recipient(a), statuslog.Dsn("4.0.0", "delayed", r))
                    for a, r in entries) + junk.encode()
    path = spool.path("defer", qid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Path(path).write_bytes(data)
    want = [(r.address, d.reason) for r, d in statuslog.read(spool, "defer", qid)]
    assert _defer_reasons(spool, qid, path) == want


def test_config_sets_parameters_as_postconf_e(tmp_path: Path) -> None:
    from qmgrd.ctl.postconf import edit_text

    etc = tmp_path / "etc"
    etc.mkdir()
    main = etc / "main.cf"
    main.write_text("# comment\nmyhostname = old.example\nrelayhost =\n  [x.example]\n"
                    "\nmyhostname = twice.example\nmydomain = example\n")
    os.chmod(main, 0o640)

    def run(*args: str) -> tuple[int, str, str]:
        res = CliRunner().invoke(cli, ["-c", str(etc), "config", *args])
        return res.exit_code, res.stdout, res.stderr

    assert run("myhostname=new.example", "relayhost = [y.example]:25",
               "minimal_backoff_time=10s")[0] == 0
    assert main.read_text() == ("# comment\nmyhostname = new.example\n"
                                "relayhost = [y.example]:25\n\nmydomain = example\n"
                                "minimal_backoff_time = 10s\n")
    assert stat.S_IMODE(os.stat(main).st_mode) == 0o640
    assert run("myhostname")[1] == "myhostname = new.example\n"
    before = main.read_text()
    code, _, err = run("minimal_backoff_time=soon")
    assert code == 78 and "not changed" in err and main.read_text() == before
    # the bad value is the one given, not a line of main.cf: no line number is named
    assert err == ('qmgr-ctl: fatal: not changed: bad time value for parameter '
                   'minimal_backoff_time: "soon"\n')
    code, _, err = run("smtp_process_delivery_limit=99999")  # out of range: no line either
    assert (code, err) == (78, ("qmgr-ctl: fatal: not changed: invalid "
                                "smtp_process_delivery_limit parameter value \"99999\": "
                                "maximum is 1000\n"))
    for name in ("data_directory", "maillog_file"):  # a relative path
        code, _, err = run(f"{name}=var/x")
        assert (code, err) == (78, (f"qmgr-ctl: fatal: not changed: bad {name} parameter "
                                    "value \"var/x\": not an absolute path\n"))
    assert run("maillog_file=")[0] == 0 and "\nmaillog_file = \n" in main.read_text()
    before = main.read_text()
    code, _, err = run("line_length_limit=100")  # under Postfix's minimum
    assert (code, err) == (78, ("qmgr-ctl: fatal: not changed: invalid line_length_limit "
                                "parameter value \"100\": minimum is 512\n"))
    code, _, err = run("transport_maps=nosuch:/x")  # a table that would not open
    assert (code, err) == (78, ("qmgr-ctl: fatal: not changed: parameter transport_maps: "
                                "nosuch:/x: unsupported dictionary type: nosuch\n"))
    assert main.read_text() == before
    # a bad line is no refusal (the qmgr skips it, as postmap does): a warning naming
    # file and line, and the change is written
    (etc / "transport").write_text("a.example smtp:\nbadline-without-value\n")
    code, _, err = run(f"transport_maps=hash:{etc}/transport")
    assert (code, err) == (0, (f"qmgr-ctl: warning: {etc}/transport, line 2: expected "
                               "format: key whitespace value -- ignoring this line\n"))
    assert f"\ntransport_maps = hash:{etc}/transport\n" in main.read_text()
    assert run("bad name=1")[0] == EX_USAGE
    assert run("-n", "a=1")[0] == EX_USAGE
    assert run("myhostname=a\nb")[0] == EX_USAGE
    assert edit_text("a = 1", {"b": "2"}) == "a = 1\nb = 2\n"


@pytest.mark.parametrize("setting,what", [
    ("relayhost=[x.example]:99999",
     'bad relayhost parameter value "[x.example]:99999": bad port number "99999" (1-65535)'),
    ("relayhost=[x.example]:smtpx",
     'bad relayhost parameter value "[x.example]:smtpx": unknown service "smtpx"'),
    ("relayhost=[]", 'bad relayhost parameter value "[]": missing host information'),
    ("relayhost=[x.example", 'bad relayhost parameter value "[x.example": missing "]"'),
    ("default_transport=smtp:x.example:0",
     ('bad default_transport parameter value "smtp:x.example:0": nexthop "x.example:0": '
      'bad port number "0" (1-65535)')),
])
def test_config_refuses_a_bad_relayhost(tmp_path: Path, setting: str, what: str) -> None:
    """qmgr-ctl config NAME=VALUE with a relayhost (or an smtp service's nexthop in
    default_transport) that the smtp client cannot use: exit 78 naming it, main.cf
    unchanged; a valid one is written."""
    etc = tmp_path / "etc"
    etc.mkdir()
    main = etc / "main.cf"
    main.write_text(f"queue_directory = {tmp_path}/q\nrelayhost = [old.example]\n")
    (etc / "master.cf").write_text("smtp      unix  -       -       n       -       -"
                                   "       smtp\n")
    before = main.read_text()
    res = CliRunner().invoke(cli, ["-c", str(etc), "config", setting])
    assert (res.exit_code, res.stderr) == (78, f"qmgr-ctl: fatal: not changed: {what}\n")
    assert main.read_text() == before
    name = setting.partition("=")[0]
    res = CliRunner().invoke(cli, ["-c", str(etc), "config", f"{name}=smtp:[new.example]:587"
                                   if name == "default_transport" else
                                   f"{name}=[new.example]:587, backup.example:"])
    assert res.exit_code == 0, res.stderr
    assert main.read_text() != before


class _DyingQmgr:
    """A qmgr on private/qmgr-control that takes one ``act`` request, does ``work`` on
    the files (as the real one does before it is killed) and closes the connection
    without an answer - what ``kill -9`` of the qmgr mid-request looks like."""

    def __init__(self, q: Q, work: Callable[[list[str]], None]) -> None:
        import threading

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(os.path.join(q.spool.queue_path("private"), "qmgr-control"))
        self.sock.listen(1)
        self.work = work
        self.request: dict[str, object] = {}
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                data += conn.recv(65536)
            self.request = json.loads(data)
            self.work([str(i) for i in self.request["ids"]])  # type: ignore[union-attr]

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


@pytest.mark.parametrize("action", ["hold", "delete"])
def test_qmgr_that_stops_before_answering(q: Q, action: str) -> None:
    """hold/delete ALL of active mail; the qmgr changes some, then dies before its
    answer: what it did is counted (held: in hold/ now) or reported as unknown (gone:
    removed, or delivered meanwhile), never as "0 messages"; a file still locked by an
    agent is "still being delivered", an unlocked one is changed directly; exit 75."""
    ids = [q.submit("active", "a@x.example", [f"r{i}@one.example"]) for i in range(5)]
    done_by_qmgr, busy, free = ids[:3], ids[3], ids[4]

    def work(asked: list[str]) -> None:
        for qid in done_by_qmgr:
            if action == "hold":
                q.spool.move(qid, "active", "hold")
            else:
                os.unlink(q.spool.path("active", qid))

    fd = os.open(q.spool.path("active", busy), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a delivery agent still at work
    qmgr = _DyingQmgr(q, work)
    try:
        code, out, err = q.run(action, "--wait", "1", "ALL")
    finally:
        qmgr.close()
        os.close(fd)
    assert sorted(qmgr.request["ids"]) == sorted(ids)  # type: ignore[arg-type]
    assert code == EX_TEMPFAIL, err
    assert ("qmgr-ctl: warning: no answer from the qmgr (control: connection closed "
            "before the reply)") in err
    assert f"{busy}: still being delivered; try again later" in err
    if action == "hold":
        assert sorted(out.splitlines()) == sorted(f"{i}: placed on hold"
                                                  for i in [*done_by_qmgr, free])
        assert err.endswith("qmgr-ctl: Placed on hold: 4 messages\n"), err
        assert all(q.where(i) == ["hold"] for i in [*done_by_qmgr, free])
    else:
        assert out == f"{free}: removed\n"
        for qid in done_by_qmgr:
            assert f"{qid}: outcome unknown: the qmgr stopped before it answered" in err
        assert err.endswith("qmgr-ctl: Deleted: 1 message; outcome unknown: 3 "
                            "messages\n"), err
    assert q.where(busy) == ["active"]


def test_reply_lost_only_after_the_request_was_sent(tmp_path: Path) -> None:
    """jsonsock.exchange: no listener is a plain OSError (nothing was asked); a
    listener that closes without its newline-ended reply is ReplyLost."""
    from qmgrd.qmgr.jsonsock import ReplyLost, exchange

    path = str(tmp_path / "s")
    with pytest.raises(OSError) as info:
        exchange(path, {"cmd": "ping"}, 1000, "control", 5)
    assert not isinstance(info.value, ReplyLost)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(2)
        import threading

        def serve(reply: bytes) -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(1000)
                conn.sendall(reply)

        for reply, lost in ((b"", True), (b'{"results": {', True), (b'{"pid": 1}\n', False)):
            t = threading.Thread(target=serve, args=(reply,))
            t.start()
            try:
                if lost:
                    with pytest.raises(ReplyLost, match="connection closed before the"):
                        exchange(path, {"cmd": "ping"}, 1000, "control", 5)
                else:
                    assert exchange(path, {"cmd": "ping"}, 1000, "control", 5) == {"pid": 1}
            finally:
                t.join(10)


def test_symlinked_queue_file_is_changed_not_followed(tmp_path: Path) -> None:
    """A symbolic link under a queue id's name: apply_file opens it O_NOFOLLOW (no lock
    taken through it, no FIFO blocks it); the change renames or removes the link
    itself, and requeue's new time stamp is the link's, never its target's."""
    from qmgrd.qmgr.admin import DONE, apply_file

    spool = Spool(str(tmp_path / "q"))
    spool.make_dirs()
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    os.utime(target, (1000, 1000))
    f, qid, _ = spool.create("incoming")
    f.close()
    os.unlink(spool.path("incoming", qid))
    os.symlink(target, spool.path("active", qid))
    assert apply_file(spool, "active", qid, "hold") == DONE
    assert os.path.islink(spool.path("hold", qid))
    assert apply_file(spool, "hold", qid, "requeue", now=5000) == DONE
    assert os.path.islink(spool.path("incoming", qid))
    assert target.stat().st_mtime == 1000
    os.rename(spool.path("incoming", qid), spool.path("active", qid))
    assert apply_file(spool, "active", qid, "delete") == DONE
    assert not os.path.lexists(spool.path("active", qid))
    assert target.read_bytes() == b"precious"


#: ANSWER_GRACE (2 s beyond --wait for the qmgr's answer) in the tests of a silent qmgr,
#: which wait it out: the bound is what they check, not its size
SHORT_GRACE = 0.5


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    """qmgrd.ctl.admin.ANSWER_GRACE shortened to SHORT_GRACE (returned)."""
    assert ctl_admin.ANSWER_GRACE == 2.0
    monkeypatch.setattr(ctl_admin, "ANSWER_GRACE", SHORT_GRACE)
    return SHORT_GRACE


@pytest.mark.timeout(25)  # a bound for hanging: the command ends after --wait + 2 s
@pytest.mark.parametrize("action", ["hold", "requeue", "delete"])
def test_qmgr_that_does_not_answer(q: Q, action: str, short_grace: float) -> None:
    """A qmgr that is alive but silent (stopped with SIGSTOP: its socket takes
    connections, nobody reads them): the command ends after --wait + 2 s (ANSWER_GRACE,
    shortened here to SHORT_GRACE) instead of
    --wait + 30 s (plus 10 s of requeue's table check), exit 75; the active file is left
    to the qmgr. A request that was sent is "outcome unknown" (the qmgr carries it out
    when it runs again: it waits, complete, in the socket); requeue's table check timed
    out, so its change was not asked for at all: "nothing was changed". Files outside
    the active queue are changed as usual."""
    qid = q.submit("active", "a@x.example", ["r@one.example"])
    other = q.submit("deferred", "a@x.example", ["r@two.example"])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as frozen:
        frozen.bind(os.path.join(q.spool.queue_path("private"), "qmgr-control"))
        frozen.listen(8)
        code, out, err = q.run(action, "--wait", "0.5", qid, other)
        frozen.setblocking(False)
        conn, _ = frozen.accept()  # what the qmgr finds when it runs again
        with conn:
            first = json.loads(conn.recv(65536))
    assert code == EX_TEMPFAIL, err
    assert q.where(qid) == ["active"]
    # the seconds are what was left of --wait + ANSWER_GRACE when the request went out
    # (0.5 s + the grace, less the time the command took before it): not a fixed figure
    timed_out = re.search(r"control reply timed out after ([0-9.]+)s", err)
    assert timed_out and 0 < float(timed_out[1]) <= 0.5 + short_grace, err
    assert (f"no answer from the qmgr ({timed_out[0]}): it may be "
            "stopped or overloaded; the messages in the active queue were left to it") in err
    assert ("could not confirm that the qmgr uses the current transport maps" in err) \
        == (action == "requeue")
    done = {"hold": "placed on hold", "requeue": "requeued", "delete": "removed"}[action]
    assert out == f"{other}: {done}\n"
    if action == "requeue":
        assert first == {"cmd": "tables"}
        assert (f"{qid}: not requeued: the qmgr did not answer ({timed_out[0]}); nothing "
                "was changed; try again") in err
        assert q.where(other) == ["incoming"]
    else:
        assert first["cmd"] == "act" and first["ids"] == [qid] and first["wait"] <= 0.5
        assert f"{qid}: outcome unknown: the qmgr did not answer" in err
        assert err.endswith("outcome unknown: 1 message\n"), err


@pytest.mark.timeout(25)  # a bound for hanging: the command ends after --wait + 2 s
def test_requeue_with_silent_qmgr_and_no_active_message(q: Q, short_grace: float) -> None:
    """requeue of an incoming message while the qmgr is alive but silent: the table
    check times out; the warning says that the transport maps could not be confirmed,
    and says nothing of the active queue (no active message was involved); the message
    is requeued, exit 0. With an active message as well, that one is named too."""
    qid = q.submit("incoming", "a@x.example", ["r@one.example"])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as frozen:
        frozen.bind(os.path.join(q.spool.queue_path("private"), "qmgr-control"))
        frozen.listen(8)
        code, out, err = q.run("requeue", "--wait", "0.5", qid)
    assert (code, out) == (0, f"{qid}: requeued\n"), err
    assert "could not confirm that the qmgr uses the current transport maps" in err
    assert "active queue" not in err and "left to it" not in err
    assert err.endswith("Requeued: 1 message\n"), err
    assert q.where(qid) == ["incoming"]


def test_exchange_bounds_the_whole_exchange(tmp_path: Path) -> None:
    """jsonsock.exchange: ``timeout`` bounds connect, send and every read together - a
    peer that trickles its reply does not restart it (ReplyTimedOut, a ReplyLost); a
    listen queue nobody takes from and no time left are TimeoutError (nothing asked)."""
    import threading

    from qmgrd.qmgr.jsonsock import ReplyLost, ReplyTimedOut, exchange

    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(0)
        stop = threading.Event()

        def trickle() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(1000)
                conn.sendall(b'{"pid": 1')
                while not stop.wait(0.2):  # a byte now and then, never the newline
                    conn.sendall(b" ")

        t = threading.Thread(target=trickle)
        t.start()
        try:
            with pytest.raises(ReplyTimedOut, match="control reply timed out after 1s"):
                exchange(path, {"cmd": "ping"}, 1000, "control", 1)
        finally:
            stop.set()
            t.join(10)
        assert issubclass(ReplyTimedOut, ReplyLost)
        with pytest.raises(TimeoutError) as info:
            exchange(path, {"cmd": "ping"}, 1000, "control", 0)
        assert not isinstance(info.value, ReplyLost)


def test_exchange_out_of_time_before_the_send_asked_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The time runs out between the connect and the send: nothing was sent, so it is a
    plain TimeoutError ("nothing was changed; try again"), not ReplyTimedOut ("the qmgr
    has the request")."""
    from qmgrd.qmgr import jsonsock

    path = str(tmp_path / "s")
    clock = iter([100.0, 100.1, 200.0, 200.0, 200.0])
    monkeypatch.setattr(jsonsock.time, "monotonic", lambda: next(clock))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)
        with pytest.raises(TimeoutError) as info:
            jsonsock.exchange(path, {"cmd": "ping"}, 1000, "control", 5)
        assert not isinstance(info.value, jsonsock.ReplyLost)
        conn, _ = srv.accept()
        with conn:
            assert conn.recv(100) == b""  # no byte of a request
