"""transports.pipe: macro expansion, content per flag, outcome mapping, rights.

Each test runs real commands (small shell scripts in a world-readable temporary
directory, so that ``nobody`` can run them when the suite runs as root) through the
agent's serve() over a socketpair (test_agent_support.round_trip).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_agent_support import (
    Env,
    close_log,  # noqa: F401 - autouse fixture
    make_env,
    round_trip,
)

from master.config import ConfigError
from qmgrd.delivery import DeliverRequest, DeliverStatus, RecipientInfo
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import DSN_NOTIFY_SUCCESS, Recipient
from qmgrd.spool.message import QueueFile
from tests.harness import wait_for
from transports.mailcopy import mail_copy
from transports.pipe import PipeAgent, UnknownMacro, expand_argv, split_addr

ROOT = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody")
CONTENT = (b"From: a@example.com\r\nSubject: hi\r\n\r\nFrom the start\r\n.dot\r\n"
           b"..two\r\nbody\r\n")
# dump.sh <name> args...: stdin, argv, ids, cwd, umask and environment into <out>/<name>.*
DUMP = """#!/bin/sh
n=$1; shift
out=%(out)s
cat > $out/$n.msg
printf '%%s\\n' "$@" > $out/$n.argv
id -u > $out/$n.uid; id -G > $out/$n.groups
pwd > $out/$n.pwd; umask > $out/$n.umask
env | grep -v '^PWD=' | grep -v '^SHLVL=' | grep -v '^_=' | sort > $out/$n.env
printf "${SAY:-}"
exit ${CODE:-0}
"""


@pytest.fixture
def pub() -> Iterator[Path]:
    """A directory every user can enter: scripts in bin/, their output in out/."""
    base = Path(tempfile.mkdtemp(prefix="qmgrd-pipe-"))
    base.chmod(0o755)
    (base / "bin").mkdir(mode=0o755)
    (base / "out").mkdir()
    (base / "out").chmod(0o777)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def script(pub: Path, name: str, body: str) -> str:
    path = pub / "bin" / name
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path, recipient_delimiter="+")


def agent_for(env: Env, args: list[str], service: str = "filter") -> PipeAgent:
    agent = PipeAgent(args)
    agent.configure(env.cfg, service)
    return agent


def deliver(env: Env, args: list[str], rcpts: list[str | Recipient],
            content: bytes = CONTENT, sender: str = "Alice@example.com",
            service: str = "filter", nexthop: str = "example.net",
            ) -> tuple[str, DeliverStatus]:
    qid = env.queue(rcpts, content, sender=sender)
    agent = agent_for(env, args, service)
    _, reply = round_trip(agent, env.request(qid, nexthop), env.ctx(service))
    assert reply is not None
    return qid, reply


def dump_args(pub: Path, *extra: str, flags: str = "", say: str = "", code: int = 0
              ) -> list[str]:
    dump = script(pub, "dump.sh", DUMP % {"out": pub / "out"})
    envs = [f"SAY={say}", f"CODE={code}"]
    head = [f"flags={flags}"] if flags else []
    return [*head, "user=nobody", f"directory={pub}",
            "argv=/usr/bin/env", *envs, dump, *extra]


def out(pub: Path, name: str) -> bytes:
    return (pub / "out" / name).read_bytes()


def bounce_or_defer(env: Env, qid: str, log_name: str) -> list[tuple[str, str]]:
    return [(d.status, d.reason) for _, d in statuslog.read(env.spool, log_name, qid)]


# --------------------------------------------------------------------------- expansion

def request(*rcpts: str | RecipientInfo, sender: str = "s@example.org",
            nexthop: str = "Next.Example") -> DeliverRequest:
    return DeliverRequest(
        queue_name="active", queue_id="4abcDEF", offset=0, size=1234, nexthop=nexthop,
        sender=sender, recipients=[r if isinstance(r, RecipientInfo) else RecipientInfo(r)
                                   for r in rcpts],
        client_address="192.0.2.1", client_name="client.example", helo_name="helo.example",
        protocol_name="ESMTP", client_port="4321")


def test_request_macros_and_recipient_arguments_repeat() -> None:
    req = request("a@x.example", "b+ext@y.example")
    argv = expand_argv(["/bin/cmd", "-f", "${sender}", "--", "${recipient}", "$nexthop",
                        "$(size)", "${queue_id}", "${client_address}", "${client_hostname}",
                        "${client_helo}", "${client_protocol}", "${client_port}",
                        "u=${user},e=${extension},m=${mailbox},d=${domain}", "x$$y"],
                       req, frozenset(), "+")
    assert argv == ["/bin/cmd", "-f", "s@example.org", "--", "a@x.example",
                    "b+ext@y.example", "Next.Example", "1234", "4abcDEF", "192.0.2.1",
                    "client.example", "helo.example", "ESMTP", "4321",
                    "u=a,e=,m=a,d=x.example", "u=b,e=ext,m=b+ext,d=y.example", "x$y"]


def test_folding_quoting_null_sender_and_empty_user() -> None:
    req = request(RecipientInfo("Q U+Ext@MAC.Example", orig_rcpt="Orig@Old.Example"),
                  "+board@x.example", sender="")
    flags = frozenset("hqu")
    assert expand_argv(["${sender}", "${recipient}", "${original_recipient}", "${nexthop}"],
                       req, flags, "+") == [
        "MAILER-DAEMON", '"q u+ext"@mac.example', "+board@x.example", "orig@old.example",
        "+board@x.example", "next.example"]
    # ${user} of "+board" (nothing before the delimiter) is the whole local part, as
    # Postfix's split_addr(); a recipient with an empty user part is left out
    assert expand_argv(["${user}", "${extension}"], req, frozenset("h"), "+") == [
        "Q U", "+board", "Ext", ""]
    assert expand_argv(["${user}"], request("@x.example"), frozenset(), "") == []
    assert expand_argv(["-f", "${sender}"], req, flags, "+", null_sender="") == ["-f", ""]
    assert expand_argv(["${sender}"], request("a@b", sender="a b@c"), frozenset("q"), "") == [
        '"a b"@c']
    with pytest.raises(UnknownMacro, match="nosuch"):
        expand_argv(["ok", "${nosuch}"], req, flags, "+")
    # not recursive: a $ in an address stays
    assert expand_argv(["${recipient}"], request("$user@x"), frozenset(), "") == ["$user@x"]


def test_h_and_u_flags_casefold_as_postfix() -> None:
    """Postfix casefold() (ICU full case folding with smtputf8_enable = yes), not
    str.lower(): a fresh-eyes finding (Postfix 3.7.11 gives strasse@lda.test and
    σασ@lda.test)."""
    from transports import pipe

    for rcpt, folded in (("Straße@LDA.test", "strasse@lda.test"),
                         ("ΣΑΣ@LDA.test", "σασ@lda.test")):
        assert expand_argv(["${recipient}"], request(rcpt), frozenset("hu"), "") == [folded]
    assert expand_argv(["${recipient}"], request("Straße@LDA.test"), frozenset("h"),
                       "") == ["Straße@lda.test"]
    try:
        pipe.casefold = pipe._casefold_ascii  # smtputf8_enable = no: ASCII letters only
        assert expand_argv(["${recipient}"], request("Straße@LDA.test"), frozenset("hu"),
                           "") == ["straße@lda.test"]
    finally:
        pipe.casefold = pipe._casefold_utf8


def test_split_addr_as_postfix() -> None:
    assert split_addr("bob+lists", "+") == ("bob", "lists")
    assert split_addr("bob-x+y", "+-") == ("bob", "x+y")
    assert split_addr("+only", "+") == ("+only", None)
    assert split_addr("owner-list", "-") == ("owner-list", None)
    assert split_addr("list-request", "-") == ("list-request", None)
    assert split_addr("MAILER-DAEMON", "-") == ("MAILER-DAEMON", None)
    assert split_addr("postmaster+x", "+") == ("postmaster", "x")
    assert split_addr("bob+x", "") == ("bob+x", None)


# --------------------------------------------------------------------------- content

def test_mail_copy_every_flag() -> None:
    lines = [b"Subject: x", b"", b"From here", b".dot", b"body"]
    data = mail_copy(lines, "BDFORX.>", sender="Bob@Example.com", orig_rcpt="O@x",
                     rcpt="R@x", eol=b"\r\n", now=0)
    first, rest = data.split(b"\r\n", 1)
    assert re.fullmatch(rb"From Bob@Example\.com  \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}",
                        first)
    assert rest == (b"Return-Path: <Bob@Example.com>\r\nX-Original-To: O@x\r\n"
                    b"Delivered-To: R@x\r\nSubject: x\r\n\r\n>From here\r\n..dot\r\n"
                    b"body\r\n\r\n")
    assert mail_copy(lines, "", sender="") == b"Subject: x\n\nFrom here\n.dot\nbody\n"
    assert mail_copy([b"x"], "FR", sender="", now=0).split(b"\n")[1:] == [
        b"Return-Path: <>", b"x", b""]
    assert mail_copy([b"x"], "F", sender="", now=0).startswith(b"From MAILER-DAEMON  ")


def test_content_reaches_the_command_byte_exact(env: Env, pub: Path) -> None:
    qid, reply = deliver(env, dump_args(pub, "plain"), ["Bob@example.net"])
    assert reply.status == 0
    with QueueFile.open(env.spool, "active", qid, lock=None, readonly=True) as qf:
        lines = list(qf.iter_lines())
    assert out(pub, "plain.msg") == b"".join(line + b"\n" for line in lines)
    assert out(pub, "plain.msg").endswith(b"\n\nFrom the start\n.dot\n..two\nbody\n")


def test_flags_and_eol_reach_the_command(env: Env, pub: Path) -> None:
    args = dump_args(pub, "flg", flags="BDFORX.>")
    args.insert(1, r"eol=\r\n")
    _, reply = deliver(env, args, ["Bob@Example.NET"], sender="")
    assert reply.status == 0
    data = out(pub, "flg.msg")
    first, rest = data.split(b"\r\n", 1)
    assert first.startswith(b"From MAILER-DAEMON  ")
    assert rest.startswith(b"Return-Path: <MAILER-DAEMON>\r\nX-Original-To: Bob@Example.NET"
                           b"\r\nDelivered-To: Bob@Example.NET\r\n")
    assert rest.endswith(b"\r\n\r\n>From the start\r\n..dot\r\n...two\r\nbody\r\n\r\n")
    assert b"\n" not in rest.replace(b"\r\n", b"")


# --------------------------------------------------------------------------- delivery

def test_sent_log_line_argv_and_rights(env: Env, pub: Path) -> None:
    args = dump_args(pub, "ok", "-f", "${sender}", "--", "${recipient}", say="queued as X1\\n")
    qid, reply = deliver(env, args, ["Bob@example.net", "carol+x@example.net"])
    assert reply.status == 0 and env.undone(qid) == []
    assert out(pub, "ok.argv") == (b"-f\nAlice@example.com\n--\nBob@example.net\n"
                                   b"carol+x@example.net\n")
    lines = [ln for ln in env.log().splitlines() if "status=sent" in ln]
    assert len(lines) == 2
    assert re.search(rf"{qid}: to=<Bob@example.net>, relay=filter, delay=[\d.]+, "
                     r"delays=[\d./]+, dsn=2\.0\.0, status=sent \(delivered via filter "
                     r"service \(queued as X1\)\)$", lines[0]), lines[0]
    uid = int(out(pub, "ok.uid"))
    if ROOT:
        assert uid == NOBODY.pw_uid != 0
        assert out(pub, "ok.groups").split() == [str(NOBODY.pw_gid).encode()]
    else:
        assert uid == os.geteuid()
    assert out(pub, "ok.pwd").strip() == str(pub).encode()
    assert out(pub, "ok.umask").strip() == b"0077"
    environ = out(pub, "ok.env").decode().splitlines()
    want = {f"MAIL_CONFIG={env.cfg.config_directory}", "PATH=/usr/bin:/bin", "CODE=0",
            "SAY=queued as X1\\n"}
    assert want <= set(environ)
    assert {line.split("=")[0] for line in environ} <= {"MAIL_CONFIG", "PATH", "CODE",
                                                         "SAY", "LANG", "TZ"}
    # import_environment's LANG=C sets LANG whatever the starting shell had (Postfix)
    assert "LANG=C" in environ


def test_success_text_keeps_100_bytes_of_output(env: Env, pub: Path) -> None:
    """Postfix "%.100s": bytes, not characters (cut here at a character boundary)."""
    say = "é" * 99 + "ü"
    _, reply = deliver(env, dump_args(pub, "u8", say=say), ["bob@example.net"])
    assert reply.status == 0
    [line] = [ln for ln in env.log().splitlines() if "status=sent" in ln]
    assert line.endswith(f"(delivered via filter service ({'é' * 50}))")


def test_x_flag_reports_delivered_and_success_notice_action(env: Env, pub: Path) -> None:
    for flags, action in (("X", "delivered"), ("R", "relayed")):
        rcpt = Recipient("bob@example.net", notify=DSN_NOTIFY_SUCCESS)
        qid, reply = deliver(env, dump_args(pub, "x", flags=flags), [rcpt])
        assert reply.status == 0
        [(_, dsn)] = statuslog.read(env.spool, "trace", qid)
        assert (dsn.status, dsn.action, dsn.reason) == ("2.0.0", action,
                                                        "delivery via filter: delivered via filter service")


@pytest.mark.parametrize("code,say,log_name,status,reason", [
    (75, "busy\\n", "defer", "4.3.0", "temporary failure. Command output: busy "),
    (71, "", "defer", "4.3.0", "system resource problem"),
    (67, "no\\tsuch user\\n", "bounce", "5.1.1", "user unknown. Command output: no such user "),
    (78, "", "bounce", "5.3.5", "local configuration error"),
    (1, "", "bounce", "5.3.0", 'Command died with status 1: "/usr/bin/env"'),
    (2, "oops\\n", "bounce", "5.3.0",
     'Command died with status 2: "/usr/bin/env". Command output: oops '),
    (1, "4.7.1 not now\\n", "defer", "4.7.1", "not now "),
    (75, "5.1.1 gone away\\n", "bounce", "5.1.1", "gone away "),
    (1, "2.0.0 fine\\n", "bounce", "5.0.0", "fine "),
])
def test_exit_status_mapping(env: Env, pub: Path, code: int, say: str, log_name: str,
                             status: str, reason: str) -> None:
    qid, reply = deliver(env, dump_args(pub, "x", say=say, code=code), ["bob@example.net"])
    assert bounce_or_defer(env, qid, log_name) == [(status, reason)]
    assert reply.status == (1 if log_name == "defer" else 0)
    assert env.undone(qid) == (["bob@example.net"] if log_name == "defer" else [])
    word = "deferred" if log_name == "defer" else "bounced"
    assert "relay=filter, " in env.log() and f"status={word} ({reason})" in env.log()
    [(_, dsn)] = statuslog.read(env.spool, log_name, qid)
    assert dsn.diag_type == "x-unix"


def test_killed_by_a_signal_defers(env: Env, pub: Path) -> None:
    sig = script(pub, "sig.sh", "#!/bin/sh\ncat >/dev/null\necho boom\nkill -9 $$\n")
    qid, reply = deliver(env, ["user=nobody", f"directory={pub}", f"argv={sig}"],
                         ["bob@example.net"])
    assert reply.status == 1 and env.undone(qid) == ["bob@example.net"]
    assert bounce_or_defer(env, qid, "defer") == [
        ("4.3.0", f'Command died with signal 9: "{sig}". Command output: boom ')]


def test_time_limit_kills_the_process_group_and_bounces(env: Env, pub: Path) -> None:
    pidfile = pub / "out" / "grandchild.pid"
    slow = script(pub, "slow.sh", f"#!/bin/sh\necho slowpoke\nsleep 60 &\necho $! > {pidfile}\n"
                                  "wait\n")
    env.cfg = env.cfg.with_overrides({"slow_time_limit": "1"})
    qid, reply = deliver(env, ["user=nobody", f"directory={pub}", f"argv={slow}"],
                         ["bob@example.net"], service="slow")
    assert reply.status == 0 and env.undone(qid) == []
    assert bounce_or_defer(env, qid, "bounce") == [
        ("5.3.0", f'Command time limit exceeded: "{slow}". Command output: slowpoke ')]
    assert "warning: pipe_command_read: read time limit exceeded" in env.log()
    grandchild = int(pidfile.read_text())

    def gone() -> bool:  # killed with its process group (a zombie of init's counts)
        try:
            return psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, 10, "the command's background process to be killed")


def test_missing_command_defers(env: Env, pub: Path) -> None:
    qid, reply = deliver(env, ["user=nobody", f"directory={pub}", "argv=/nonexistent/cmd"],
                         ["bob@example.net"])
    assert reply.status == 1 and env.undone(qid) == ["bob@example.net"]
    assert bounce_or_defer(env, qid, "defer") == [
        ("4.3.0", ("temporary failure. Command output: pipe: fatal: pipe_command: execvp "
                  "/nonexistent/cmd: No such file or directory "))]


def test_a_directory_the_user_cannot_enter_defers(env: Env, pub: Path) -> None:
    closed = pub / "closed"
    closed.mkdir(mode=0o700)
    qid, reply = deliver(env, dump_args(pub, "x")[:1] + [f"directory={closed}"]
                         + dump_args(pub, "x")[2:], ["bob@example.net"])
    if ROOT:  # nobody cannot enter root's 0700 directory
        assert reply.status == 1
        assert bounce_or_defer(env, qid, "defer") == [("4.3.0", "temporary failure")]
        assert (f'warning: cannot change directory to "{closed}" for uid={NOBODY.pw_uid} '
                f"gid={NOBODY.pw_gid}: Permission denied") in env.log()
    else:
        assert reply.status == 0
    qid, reply = deliver(env, ["user=nobody", "directory=/nonexistent", "argv=/bin/true"],
                         ["bob@example.net"])
    assert bounce_or_defer(env, qid, "defer") == [("4.3.0", "temporary failure")]


def test_size_loop_multi_recipient_flags_and_unknown_macro(env: Env, pub: Path) -> None:
    args = dump_args(pub, "x")
    qid, _ = deliver(env, ["size=10", *args], ["bob@example.net"])
    assert bounce_or_defer(env, qid, "bounce") == [("5.2.3", "message too large")]
    looped = b"Delivered-To: <BOB@example.net>\r\n" + CONTENT
    qid, _ = deliver(env, dump_args(pub, "x", flags="D"), ["bob@example.net"], looped)
    assert bounce_or_defer(env, qid, "bounce") == [
        ("5.4.6", "mail forwarding loop for bob@example.net")]
    assert not (pub / "out" / "x.msg").exists()
    for flag in "DO":
        qid, reply = deliver(env, dump_args(pub, "x", flags=flag),
                             ["a@example.net", "b@example.net"])
        assert reply.status == 1
        assert bounce_or_defer(env, qid, "defer") == [
            ("4.3.5", "mail system configuration error")] * 2
        assert (f"warning: pipe flag `{flag}' requires filter_destination_recipient_limit "
                "= 1") in env.log()
    qid, _ = deliver(env, dump_args(pub, "x", "${nosuch}"), ["bob@example.net"])
    assert bounce_or_defer(env, qid, "defer") == [("4.3.5", "mail system configuration error")]
    assert (f"warning: file {env.cfg.config_directory}/master.cf: service filter: unknown "
            'macro name: "nosuch"') in env.log()
    assert not (pub / "out" / "x.msg").exists()


def test_bad_attributes_are_fatal_naming_the_service(env: Env) -> None:
    with pytest.raises(ConfigError, match=r"^service dovecot: unknown flag: Z \(ignored\)$"):
        agent_for(env, ["flags=Z", "user=nobody", "argv=cat"], "dovecot")
    with pytest.raises(ConfigError, match="^service dovecot: missing argv= command-line "
                                          "attribute$"):
        agent_for(env, ["user=nobody"], "dovecot")



def test_pre_jail_takes_the_service_arguments_and_refuses_unpriv(env: Env) -> None:
    ctx = env.ctx("filter")
    ctx.args = ["flags=R", "user=nobody", "argv=/bin/cat", "-f", "${sender}"]
    agent = PipeAgent()
    agent.pre_jail(ctx)
    assert agent.attrs is not None and agent.attrs.command == ("/bin/cat", "-f", "${sender}")
    ctx.unpriv = True
    with pytest.raises(ConfigError, match="^service filter requires privileged operation$"):
        PipeAgent().pre_jail(ctx)
