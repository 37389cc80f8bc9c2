"""master.config.pipeattr and its check at start/reload (master.config.validate): a pipe
service's command attributes, with Postfix pipe(8)'s fatal messages."""

from __future__ import annotations

import grp
import os
import pwd
import re
from pathlib import Path

import pytest

from master.config import ConfigError
from master.config.pipeattr import (
    PipeAttrError,
    parse_macros,
    parse_pipe_args,
    unescape,
    unknown_macros,
)
from master.config.validate import load_configuration

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name
DAEMON = pwd.getpwnam("daemon")


def test_a_dovecot_line() -> None:
    attrs = parse_pipe_args(["flags=DRXhu", "user=nobody", "argv=/usr/lib/dovecot/deliver",
                             "-f", "${sender}", "-d", "${recipient}"])
    assert attrs.command == ("/usr/lib/dovecot/deliver", "-f", "${sender}", "-d",
                             "${recipient}")
    assert attrs.flags == frozenset("DRXhu")
    assert (attrs.user, attrs.uid, attrs.gid) == ("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    assert (attrs.directory, attrs.eol, attrs.null_sender, attrs.size_limit, attrs.umask) == (
        "", b"\n", "MAILER-DAEMON", 0, 0o077)


def test_every_attribute_and_case_insensitive_names() -> None:
    attrs = parse_pipe_args([
        "FLAGS=BDFORXhqu.>", f"User=nobody:{grp.getgrgid(DAEMON.pw_gid).gr_name}",
        "directory=/tmp", r"eol=\r\n", "null_sender=", "size=1000", "umask=022",
        "ARGV=cat", "user=root", "flags=Z"])  # everything after argv= is the command's
    assert attrs.flags == frozenset("BDFORXhqu.>")
    assert (attrs.uid, attrs.gid) == (NOBODY.pw_uid, DAEMON.pw_gid)
    assert (attrs.directory, attrs.eol, attrs.null_sender, attrs.size_limit, attrs.umask) == (
        "/tmp", b"\r\n", "", 1000, 0o022)
    assert attrs.command == ("cat", "user=root", "flags=Z")


@pytest.mark.parametrize("args,message", [
    (["flags=Rz", "user=nobody", "argv=cat"], "unknown flag: z (ignored)"),
    (["user=nobody", "bogus=1", "argv=cat"], "unknown attribute name: bogus=1"),
    (["user=nobody", "-f", "argv=cat"], "unknown attribute name: -f"),
    (["flags=R", "argv=cat"], "missing user= command-line attribute"),
    (["user=nobody"], "missing argv= command-line attribute"),
    (["user=nobody", "argv="], "argv= names no command"),
    (["user=no-such-user-x", "argv=cat"], "get_service_attr: unknown username: no-such-user-x"),
    (["user=nobody:no-such-group-x", "argv=cat"], ("get_service_attr: unknown group: "
                                                  "no-such-group-x")),
    (["user=root", "argv=cat"], "user= command-line attribute specifies root privileges"),
    (["user=nobody:root", "argv=cat"], ("user= command-line attribute specifies privileged "
                                       "group id 0")),
    (["user=nobody", "size=10k", "argv=cat"], "get_service_attr: bad size= value: 10k"),
    (["user=nobody", "umask=999", "argv=cat"], "bad umask= value: 999"),
    (["user=nobody", "chroot=/x", "argv=cat"], "chroot= is not supported"),
])
def test_bad_attributes_are_fatal_with_postfix_messages(args: list[str], message: str) -> None:
    with pytest.raises(PipeAttrError) as ei:
        parse_pipe_args(args)
    assert str(ei.value).startswith(message)


def test_mail_owner_is_refused() -> None:
    owner = (DAEMON.pw_uid, DAEMON.pw_gid, "daemon")
    with pytest.raises(PipeAttrError, match="^user= command-line attribute specifies mail "
                                            "system owner daemon$"):
        parse_pipe_args(["user=daemon", "argv=cat"], owner)
    with pytest.raises(PipeAttrError, match="^user= command-line attribute specifies mail "
                                            f"system owner daemon group id {DAEMON.pw_gid}$"):
        parse_pipe_args([f"user=nobody:{grp.getgrgid(DAEMON.pw_gid).gr_name}", "argv=cat"],
                        owner)
    assert parse_pipe_args(["user=nobody", "argv=cat"], owner).uid == NOBODY.pw_uid


def test_unescape_and_macros() -> None:
    assert unescape(r"\r\n") == b"\r\n"
    assert unescape(r"\a\b\f\t\v\\\101\0x") == b"\a\b\f\t\v\\A\x00x"
    assert unescape("plain") == b"plain" and unescape("end\\") == b"end\\"
    assert parse_macros("x$$y-${user}-$(recipient)$sender.${open $-") == [
        (False, "x$y-"), (True, "user"), (False, "-"), (True, "recipient"),
        (True, "sender"), (False, ".${open $-")]
    assert unknown_macros(["${sender}", "$nosuch", "${recipient}x${nosuch}", "$$x"]) == [
        "nosuch"]


# --------------------------------------------------------------------------- start/reload

GOOD_MASTER = """\
pickup    fifo  n       -       n       60      1       pickup
qmgr      fifo  n       -       n       300     1       qmgr
"""


def write(tmp_path: Path, master: str) -> str:
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\nmail_owner = daemon\n")
    (tmp_path / "master.cf").write_text(GOOD_MASTER + master)
    return str(tmp_path)


def test_an_unknown_user_is_a_warning_at_start_as_debian_stock_lines_need(
        tmp_path: Path) -> None:
    """Debian's stock master.cf has pipe lines for accounts a box rarely has
    (user=vmail, ftn, bsmtp, scalemail): Postfix's master starts with them, so qmgrd's
    start/reload warns instead of refusing the whole configuration (a fresh-eyes
    finding); a bad flag is still refused."""
    warnings: list[str] = []
    etc = write(tmp_path, "maildrop unix - n n - - pipe\n"
                          "  flags=DRXhu user=no-such-vmail argv=/usr/bin/maildrop -d ${recipient}\n"
                          "bsmtp unix - n n - - pipe\n"
                          "  flags=Fq. user=bsmtp:no-such-group argv=/usr/lib/bsmtp/bsmtp\n")
    load_configuration(etc, warn=warnings.append)
    assert warnings == [
        (f"{etc}/master.cf, line 3: service maildrop: get_service_attr: unknown username: "
        "no-such-vmail (its pipe processes exit fatal and mail for it stays queued until "
        "the account exists)"),
        f"{etc}/master.cf, line 5: service bsmtp: get_service_attr: unknown "
        + ("group: no-such-group" if _has_user("bsmtp") else "username: bsmtp")
        + " (its pipe processes exit fatal and mail for it stays queued until the "
        "account exists)"]


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_a_pipe_line_loads_and_unknown_macros_warn(tmp_path: Path) -> None:
    warnings: list[str] = []
    etc = write(tmp_path, "filter unix - n n - 10 pipe flags=Rq user=nobody\n"
                          "  argv=/usr/bin/f -f ${sender} -- ${recipient} ${nosuch}\n")
    _, services = load_configuration(etc, warnings.append)
    assert services[-1].module == "transports.pipe"
    assert services[-1].args[-2:] == ["${recipient}", "${nosuch}"]
    assert warnings == [
        f'{etc}/master.cf, line 3: service filter: unknown macro name: "nosuch"']


@pytest.mark.parametrize("line,message", [
    ("flags=RZ user=nobody argv=cat", "unknown flag: Z (ignored)"),
    ("user=nobody size=x argv=cat", "get_service_attr: bad size= value: x"),
    ("flags=R argv=cat", "missing user= command-line attribute"),
    ("user=nobody wat=1 argv=cat", "unknown attribute name: wat=1"),
    ("user=root argv=cat", "user= command-line attribute specifies root privileges"),
])
def test_a_bad_pipe_line_names_file_line_and_service(tmp_path: Path, line: str,
                                                     message: str) -> None:
    etc = write(tmp_path, f"filter unix - n n - - pipe {line}\n")
    with pytest.raises(ConfigError) as ei:
        load_configuration(etc)
    assert str(ei.value) == f"{etc}/master.cf, line 3: service filter: {message}"


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="mail_owner and unpriv apply only under a root master")
@pytest.mark.parametrize("line,message", [
    # user= mail_owner (the tests' main.cf: daemon)
    ("filter unix - n n - - pipe user=daemon argv=cat",
     "service filter: user= command-line attribute specifies mail system owner daemon"),
    # unpriv y: the service must keep root
    ("filter unix - - n - - pipe user=nobody argv=cat",
     "service filter requires privileged operation (set its unpriv column to n)"),
])
def test_a_pipe_line_that_cannot_keep_its_privileges_is_refused(
        tmp_path: Path, line: str, message: str) -> None:
    etc = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as ei:
        load_configuration(etc)
    assert str(ei.value) == f"{etc}/master.cf, line 3: {message}"


def test_transport_time_limit_falls_back_to_command_time_limit() -> None:
    from master.config import Config

    cfg = Config.from_text("filter_time_limit = 5m\ncommand_time_limit = 20\n", "/etc/q")
    assert cfg.transport_time("filter", "_time_limit") == 300
    assert cfg.transport_time("other", "_time_limit") == 20
    assert Config.from_text("", "/etc/q").transport_time("x", "_time_limit") == 1000
    with pytest.raises(ConfigError, match="filter_time_limit"):
        Config.from_text("filter_time_limit = 5q\n", "/etc/q").check()


def test_the_bundled_examples_parse() -> None:
    """etc/master.cf's commented pipe examples, uncommented (users made nobody), are
    valid pipe services with their arguments intact."""
    from master.config import Config
    from master.config.mastercf import parse_master_cf

    text = (Path(__file__).resolve().parent.parent / "etc" / "master.cf").read_text()
    block = text[text.index("#dovecot"):]
    lines = [ln[1:] for ln in block.splitlines() if ln.startswith("#")]
    uncommented = re.sub(r"user=\w+(:\w+)?", "user=nobody", "\n".join(lines) + "\n")
    services = parse_master_cf(uncommented, "master.cf", Config.from_text("", "/etc/q"))
    assert [s.name for s in services] == ["dovecot", "filter", "mailman"]
    for svc in services:
        assert svc.module == "transports.pipe" and not svc.unpriv
        attrs = parse_pipe_args(svc.args)
        assert not unknown_macros(attrs.command)
    assert parse_pipe_args(services[0].args).command == (
        "/usr/lib/dovecot/deliver", "-f", "${sender}", "-d", "${recipient}")
