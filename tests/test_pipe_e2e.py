"""pipe(8) end to end: Postfix master.cf pipe lines pasted into a running qmgrd, mail
routed to them by transport_maps, the commands run as their user= account."""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import REPO, MailSystem, wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody")
MESSAGE = (b"From: Alice <alice@localhost>\nSubject: pipe test\n\nFrom the start\n"
           b".a dot line\nlast line\n")
# dump.sh writes its standard input, argv and uid under out/, then says something
DUMP = """#!/bin/sh
out=%(out)s
cat > $out/msg
printf '%%s\\n' "$@" > $out/argv
id -u > $out/uid
echo "queued as 4XYZ"
"""
EXIT = "#!/bin/sh\ncat >/dev/null\necho \"exit $1\"\nexit $1\n"
# slow.sh: takes the message, says so, then outlives the time anyone waits for it
SLOW = "#!/bin/sh\ncat >/dev/null\necho $$ > %(out)s/slow\nexec sleep 120\n"


def pipe_system(mailsys: Callable[..., MailSystem]) -> tuple[MailSystem, Path]:
    """A mail system with three pipe services (Postfix master.cf syntax, continuation
    lines, ``-f ${sender} -- ${recipient}``) and the domains routed to them."""
    ms = mailsys()
    bin_dir = ms.root / "bin"
    out = ms.root / "out"
    bin_dir.mkdir(mode=0o755)
    out.mkdir()
    out.chmod(0o777)
    (bin_dir / "dump.sh").write_text(DUMP % {"out": out})
    (bin_dir / "exit.sh").write_text(EXIT)
    (bin_dir / "slow.sh").write_text(SLOW % {"out": out})
    for name in ("dump.sh", "exit.sh", "slow.sh"):
        (bin_dir / name).chmod(0o755)
    master = (REPO / "etc" / "master.cf").read_text()
    master = master.replace("\n127.0.0.1:2525 ", "\n#127.0.0.1:2525 ")  # no smtpd needed
    master += (
        f"filter    unix  -       n       n       -       -       pipe\n"
        f"  flags=DROX user=nobody argv={bin_dir}/dump.sh -f ${{sender}} -- ${{recipient}}\n"
        f"tempfail  unix  -       n       n       -       -       pipe\n"
        f"  user=nobody argv={bin_dir}/exit.sh 75\n"
        f"nouser    unix  -       n       n       -       -       pipe\n"
        f"  user=nobody argv={bin_dir}/exit.sh 67\n"
        f"slow      unix  -       n       n       -       -       pipe\n"
        f"  user=nobody argv={bin_dir}/slow.sh\n")
    (ms.etc / "master.cf").write_text(master)
    table = ms.etc / "transport"
    table.write_text("pipe.example filter:\ntemp.example tempfail:\nnouser.example nouser:\n"
                     "slow.example slow:\n")
    ms.write_main(transport_maps=f"texthash:{table}", filter_destination_recipient_limit="1")
    ms.start()
    return ms, out


def send(ms: MailSystem, *rcpts: str, sender: str = "alice@localhost") -> None:
    r = ms.sendmail("-f", sender, *rcpts, data=MESSAGE)
    assert r.returncode == 0, r.stderr


def test_pipe_delivery_end_to_end(mailsys: Callable[..., MailSystem]) -> None:
    ms, out = pipe_system(mailsys)
    try:
        # the same message to a local mailbox and to the pipe: the copies must differ
        # only by the headers each agent adds
        send(ms, "user@localhost", "Bob@pipe.example")
        wait_for(lambda: "status=sent (delivered via filter service" in ms.log(), 30,
                 "the pipe delivery")
        wait_for(lambda: ms.maildir("user"), 30, "the local delivery")
        wait_for(ms.queue_empty, 30, "the queue to empty")
        local = ms.maildir("user")[0].read_bytes()
        assert local.startswith(b"Return-Path: <alice@localhost>\n"
                                b"Delivered-To: user@localhost\n")
        content = local.split(b"\n", 2)[2]
        assert (out / "msg").read_bytes() == (
            b"Return-Path: <alice@localhost>\nX-Original-To: Bob@pipe.example\n"
            b"Delivered-To: Bob@pipe.example\n" + content)
        assert content.endswith(b"\n\nFrom the start\n.a dot line\nlast line\n")
        # argv=... -f ${sender} -- ${recipient} reaches the command intact
        assert (out / "argv").read_text() == "-f\nalice@localhost\n--\nBob@pipe.example\n"
        assert int((out / "uid").read_text()) == (NOBODY.pw_uid if ROOT else os.geteuid())
        line = next(ln for ln in ms.log().splitlines() if "relay=filter" in ln)
        assert re.search(r": to=<Bob@pipe\.example>, relay=filter, delay=[\d.]+, "
                         r"delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, status=sent "
                         r"\(delivered via filter service \(queued as 4XYZ\)\)$", line), line
        assert re.search(r"qmgrd/pipe\[\d+\]: ", line), line
        # flags=D with filter_destination_recipient_limit = 1: the qmgr sends one
        # recipient per delivery, so none is deferred "4.3.5 mail system configuration"
        send(ms, "a@pipe.example", "b@pipe.example")
        for rcpt in ("a@pipe.example", "b@pipe.example"):
            wait_for(lambda r=rcpt: f"to=<{r}>, relay=filter" in ms.log(), 30, rcpt)
        wait_for(ms.queue_empty, 30, "the queue to empty")
        assert "4.3.5" not in ms.log()
        assert ms.log().count("status=sent (delivered via filter service") == 3
        if ROOT:  # between deliveries the agent has mail_owner's effective ids, as
            # Postfix's pipe (real and saved uid 0: root again only to run a command)
            owner = pwd.getpwnam("qmgrd")
            agents = ms.children("filter")
            assert agents
            for agent in agents:
                status = Path(f"/proc/{agent.pid}/status").read_text().splitlines()
                uids = next(ln for ln in status if ln.startswith("Uid:")).split()
                gids = next(ln for ln in status if ln.startswith("Gid:")).split()
                assert uids[1:] == ["0", str(owner.pw_uid), "0", str(owner.pw_uid)], uids
                assert gids[2] == str(owner.pw_gid), gids
    finally:
        ms.stop()


def test_pipe_tempfail_stays_queued_and_nouser_bounces(
        mailsys: Callable[..., MailSystem]) -> None:
    ms, _ = pipe_system(mailsys)
    try:
        send(ms, "carol@temp.example")
        wait_for(lambda: "status=deferred (temporary failure. Command output: exit 75 )"
                 in ms.log(), 30, "the deferral")
        wait_for(lambda: ms.queue_files("deferred"), 30, "the message in deferred/")
        assert "relay=tempfail, " in ms.log() and "dsn=4.3.0" in ms.log()
        send(ms, "dave@nouser.example")
        wait_for(lambda: "status=bounced (user unknown. Command output: exit 67 )"
                 in ms.log(), 30, "the bounce")
        wait_for(lambda: ms.maildir("alice"), 30, "the notice to the sender")
        notice = ms.maildir("alice")[0].read_bytes()
        assert b"<dave@nouser.example>: user unknown. Command output: exit 67" in notice
        assert b"Diagnostic-Code: x-unix; exit 67" in notice
        # the output's newline (a space in the log line) does not end the notice's lines
        assert b"exit 67 \n" not in notice and b"exit 67 \r\n" not in notice
        assert b"Status: 5.1.1" in notice
        # the deferred message is still there, and only it
        assert len(ms.queue_files("deferred")) == 1
        assert len(ms.queue_files()) == 1
    finally:
        ms.stop()


def test_a_bad_pipe_line_refuses_to_start(mailsys: Callable[..., MailSystem]) -> None:
    """A pasted line with a flag qmgrd's (and Postfix's) pipe does not know: nothing
    starts, and the error names master.cf's line and the service."""
    ms = mailsys()
    with open(ms.etc / "master.cf", "a") as f:
        f.write("maildrop  unix  -       n       n       -       -       pipe\n"
                "  flags=DRXhuZ user=nobody argv=/usr/bin/maildrop -d ${recipient}\n")
    lines = (ms.etc / "master.cf").read_text().count("\n")
    r = ms.master("start")
    assert r.returncode == 1
    assert (f"{ms.etc}/master.cf, line {lines - 1}: service maildrop: unknown flag: Z "
            "(ignored)") in r.stderr
    assert not ms.processes()


def test_stop_does_not_wait_for_a_command_still_running(
        mailsys: Callable[..., MailSystem]) -> None:
    """``qmgr-master stop`` waits for the master and its services, not for a pipe(8)
    command, which is the user's and outlives its agent as under Postfix (a fresh-eyes
    finding: stop waited 15 s for it, then exit 75 naming the command's pids)."""
    ms, out = pipe_system(mailsys)
    try:
        send(ms, "u@slow.example")
        wait_for(lambda: (out / "slow").exists() and (out / "slow").read_text().strip(),
                 30, "the slow command to start")
        command = int((out / "slow").read_text())
        r = ms.master("stop", timeout=60)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "still running" not in r.stdout + r.stderr
        os.kill(command, 0)  # the command itself was left alone
    finally:
        ms.stop()
        if (out / "slow").exists() and (out / "slow").read_text().strip():
            try:
                os.kill(int((out / "slow").read_text()), 9)
            except ProcessLookupError:
                pass
