"""Delivery agents with master.cf's chroot column ``y`` (Debian's stock master.cf has it on
smtp, relay, error, retry, discard, bounce/defer/trace and pickup): as root the agent
chroots into queue_directory and must open queue files, status logs and the cleanup
path of its notices inside the jail, as the qmgr does.  A pipe service's command then
runs inside the jail too (Postfix's behaviour); local refuses a chroot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import REPO, MailSystem, wait_for

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="only a root master chroots its children"),
]

MESSAGE = b"From: Alice <alice@mail.test.example>\nSubject: chroot\n\nFrom the jail\nbye\n"
BUNDLED = (REPO / "etc" / "master.cf").read_text()


def chrooted(master_cf: str, *services: str) -> str:
    """``master_cf`` with the chroot column of ``services`` set to y."""
    for name in services:
        master_cf, n = re.subn(rf"(?m)^({re.escape(name)}\s+\S+\s+\S+\s+\S+\s+)n(\s)",
                               r"\1y\2", master_cf)
        assert n == 1, name
    return master_cf


def jail_of(ms: MailSystem, service: str) -> list[str]:
    """The root directory of each live child of ``service``."""
    roots = []
    for p in ms.children(service):
        try:
            roots.append(os.readlink(f"/proc/{p.pid}/root"))
        except OSError:
            continue
    return roots


def clean_log(ms: MailSystem) -> None:
    text = ms.log()
    assert "cannot open queue file" not in text
    assert "imported after the jail" not in text
    assert not re.search(r"\]: fatal:", text)


def send(ms: MailSystem, *args: str) -> None:
    r = ms.sendmail("-f", "alice@mail.test.example", *args, data=MESSAGE)
    assert r.returncode == 0, r.stderr


def test_chrooted_smtp_delivers(mailsys: Callable[..., MailSystem], peers) -> None:  # type: ignore[no-untyped-def]
    """Debian's ``smtp unix - - y - - smtp`` line (and its chrooted pickup): the mail
    reaches the peer."""
    sink = peers.sink()
    ms = mailsys(main={"relayhost": f"[127.0.0.1]:{sink.port}"},
                 master_cf=chrooted(BUNDLED, "smtp", "pickup"))
    ms.start()
    send(ms, "bob@remote.example")
    wait_for(lambda: sink.count() == 1 and ms.queue_empty(), 30, "delivery via smtp")
    assert re.search(r"to=<bob@remote\.example>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, "
                     r".*dsn=2\.0\.0, status=sent", ms.log()), ms.log()
    assert jail_of(ms, "smtp") == [str(ms.spool)]
    assert jail_of(ms, "pickup") == [str(ms.spool)]
    assert b"From the jail" in sink.messages()[0]
    clean_log(ms)


def test_chrooted_error_and_bounce_send_a_notice(
        mailsys: Callable[..., MailSystem]) -> None:
    """error, discard and bounce/defer/trace chrooted: the error agent bounces, the
    bounce service writes the notice into incoming/ through the jail and wakes the qmgr
    through public/qmgr; the trace service reports a discard asked for with -N success."""
    ms = mailsys(master_cf=chrooted(BUNDLED, "bounce", "defer", "trace", "error",
                                    "discard"))
    table = ms.etc / "transport"
    table.write_text("nowhere.example error:5.1.2 no such domain here\n"
                     "void.example discard:gone\n")
    ms.write_main(transport_maps=f"texthash:{table}")
    ms.start()
    send(ms, "bob@nowhere.example")
    wait_for(lambda: ms.maildir("alice") and ms.queue_empty(), 30, "the bounce notice")
    notice = ms.maildir("alice")[0].read_bytes()
    assert b"bob@nowhere.example" in notice and b"no such domain here" in notice
    assert re.search(r"to=<bob@nowhere\.example>.*dsn=5\.1\.2, status=bounced", ms.log())
    send(ms, "-N", "success", "carol@void.example")
    wait_for(lambda: len(ms.maildir("alice")) == 2 and ms.queue_empty(), 30,
             "the success notice")
    assert re.search(r"to=<carol@void\.example>.*status=sent \(gone\)", ms.log())
    assert str(ms.spool) in jail_of(ms, "error")
    clean_log(ms)


def _copy_with_libraries(binary: str, root: Path, as_name: str) -> None:
    """``binary`` as ``root/as_name`` plus the shared libraries ldd names for it."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    dest = root / as_name.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(binary), dest)
    for line in out.splitlines():
        words = line.split()
        lib = words[2] if "=>" in words and len(words) > 2 else words[0] if words else ""
        if lib.startswith("/"):
            target = root / lib.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(lib), target)


DELIVER = """#!/bin/sh
# runs inside the chroot: /out is <queue_directory>/out
while IFS= read -r line; do printf '%s\\n' "$line"; done > /out/msg
printf '%s\\n' "$PWD" > /out/pwd
echo "stored in the jail"
"""


def test_chrooted_pipe_runs_its_command_inside_the_jail(
        mailsys: Callable[..., MailSystem]) -> None:
    """As Postfix's pipe(8) under chroot y: the command is looked up inside the jail.
    /bin/cat is not there: the mail is deferred with execvp's error (nothing lost);
    a script whose /bin/sh was copied into the jail delivers, run in "/" (the queue
    directory as the jail sees it: directory='s default)."""
    sh = shutil.which("dash") or "/bin/sh"
    if shutil.which("ldd") is None or not os.path.exists(sh):
        pytest.skip("needs ldd and a /bin/sh to copy into the chroot")
    master_cf = BUNDLED + (
        "chr       unix  -       n       y       -       -       pipe\n"
        "  user=nobody argv=/bin/cat\n"
        "jsh       unix  -       n       y       -       -       pipe\n"
        "  flags=R user=nobody argv=/bin/deliver.sh ${recipient}\n")
    ms = mailsys(master_cf=master_cf)
    table = ms.etc / "transport"
    table.write_text("cat.example chr:\nsh.example jsh:\n")
    ms.write_main(transport_maps=f"texthash:{table}")
    ms.spool.mkdir(mode=0o755)
    _copy_with_libraries(sh, ms.spool, "/bin/sh")
    (ms.spool / "bin" / "deliver.sh").write_text(DELIVER)
    (ms.spool / "bin" / "deliver.sh").chmod(0o755)
    (ms.spool / "out").mkdir()
    (ms.spool / "out").chmod(0o777)
    ms.start()

    send(ms, "bob@cat.example")
    wait_for(lambda: "status=deferred" in ms.log(), 30, "the deferral")
    assert re.search(
        r"to=<bob@cat\.example>, relay=chr, .*dsn=4\.3\.0, status=deferred \(temporary "
        r"failure\. Command output: pipe: fatal: pipe_command: execvp /bin/cat: No such "
        r"file or directory", ms.log()), ms.log()
    assert "warning: pipe_command: execvp /bin/cat: No such file or directory" in ms.log()
    assert len(ms.queue_files("deferred")) == 1

    send(ms, "dave@sh.example")
    wait_for(lambda: "delivered via jsh service" in ms.log(), 30, "the pipe delivery")
    assert re.search(r"to=<dave@sh\.example>, relay=jsh, .*dsn=2\.0\.0, status=sent "
                     r"\(delivered via jsh service \(stored in the jail\)\)", ms.log())
    copy = (ms.spool / "out" / "msg").read_bytes()
    assert copy.startswith(b"Return-Path: <alice@mail.test.example>\n")
    assert b"\nFrom the jail\n" in copy
    assert (ms.spool / "out" / "pwd").read_text() == "/\n"
    assert len(ms.queue_files("deferred")) == 1  # the /bin/cat mail, still queued
    clean_log(ms)


def test_chrooted_local_is_refused(mailsys: Callable[..., MailSystem]) -> None:
    """local(8) cannot work in the queue directory (mailboxes, passwd, aliases are
    outside): qmgr-master start refuses the line, naming master.cf's file and line."""
    ms = mailsys(master_cf=chrooted(BUNDLED, "local"))
    text = (ms.etc / "master.cf").read_text()
    line = text[:text.index("\nlocal ")].count("\n") + 2
    r = ms.master("start")
    if r.returncode == 0:  # the refusal is missing: stop the daemon that started
        ms.master("stop")
    assert r.returncode == 1
    assert (f"{ms.etc}/master.cf, line {line}: service local: the local delivery agent "
            "cannot run chrooted (set its chroot column to n)") in r.stderr
    assert not ms.processes()


def test_local_agent_refuses_a_chroot_itself(tmp_path: Path) -> None:
    """Started chrooted anyway (a master.cf edited behind a running master's back):
    the agent's pre-jail init refuses, before any jail (fatal, exit 1, throttled)."""
    from master.config import Config, ConfigError
    from master.server.skeleton import ServerContext
    from transports.local import LocalAgent

    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}\n")
    cfg = Config.load(str(tmp_path), {})
    ctx = ServerContext(service="local", config=cfg, queue_directory=str(tmp_path),
                        listen_fds=[], generation=0, args=[], chroot=True)
    with pytest.raises(ConfigError, match="service local: the local delivery agent "
                       r"cannot run chrooted \(set its chroot column to n\)"):
        LocalAgent().pre_jail(ctx)


def test_reload_refuses_a_chrooted_local(mailsys: Callable[..., MailSystem]) -> None:
    """The same line at reload: refused, the running configuration kept."""
    ms = mailsys()
    ms.start()
    (ms.etc / "master.cf").write_text(chrooted((ms.etc / "master.cf").read_text(), "local"))
    r = ms.master("reload")
    assert r.returncode != 0
    assert "service local: the local delivery agent cannot run chrooted" in r.stderr
    assert not ms.proc_dead()
    send(ms, "alice@mail.test.example")
    wait_for(lambda: ms.maildir("alice") and ms.queue_empty(), 30, "local delivery")
    assert all(root == "/" for root in jail_of(ms, "local"))  # not chrooted
