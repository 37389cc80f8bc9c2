"""Tests for master.config.mastercf: columns, defaults, -o overrides, errors, equality."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from master.config import Config, ConfigError, Service, load_master_cf, parse_master_cf

DATA = Path(__file__).parent / "data" / "config"
CFG = Config.from_text("myhostname = h.example.com\ndefault_process_limit = 42\n", "/etc/q")


def parse(text: str) -> list[Service]:
    return parse_master_cf(text, "/etc/q/master.cf", CFG)


def test_load_sample_file() -> None:
    cfg = Config.load(str(DATA / "good"))
    services = load_master_cf(str(DATA / "good" / "master.cf"), cfg)
    by_key = {s.service_key: s for s in services}
    assert [s.service_key for s in services] == [
        ("smtp", "inet"), ("qmgr", "fifo"), ("flush", "unix"), ("smtp", "unix"),
        ("pipe", "unix"), ("mine", "unix")]
    smtpd = by_key[("smtp", "inet")]
    assert smtpd.module == "transports.smtpd" and not smtpd.private
    assert smtpd.overrides == {"smtpd_banner": "$myhostname ESMTP test",
                               "syslog_name": "qmgrd/$service_name"}
    assert smtpd.maxproc == 100 and smtpd.line == 2
    child = smtpd.child_config(cfg)
    assert child.get("smtpd_banner") == "host.example.org ESMTP test"
    assert child.get("syslog_name") == "qmgrd/smtp"
    assert child.get("process_name") == "smtpd"
    qmgr = by_key[("qmgr", "fifo")]
    assert (qmgr.wakeup, qmgr.wakeup_if_used, qmgr.maxproc, qmgr.module) == (
        300, False, 1, "qmgrd.qmgr")
    flush = by_key[("flush", "unix")]
    assert (flush.wakeup, flush.wakeup_if_used, flush.maxproc) == (1000, True, 0)
    smtp = by_key[("smtp", "unix")]              # duplicate: last wins
    assert smtp.maxproc == 5 and smtp.overrides == {"smtp_helo_name": "x"}
    assert smtp.line == 8
    pipe = by_key[("pipe", "unix")]
    assert pipe.args == ["flags=R", "argv=/bin/cat -u"] and not pipe.unpriv
    assert pipe.module == "my.pipe"
    mine = by_key[("mine", "unix")]
    assert mine.module == "my.pkg.agent"
    assert (mine.private, mine.unpriv, mine.chroot, mine.wakeup) == (True, True, False, 0)


def test_defaults_and_endpoint() -> None:
    [s] = parse("local unix - - - - - local\n")
    assert (s.private, s.unpriv, s.chroot, s.wakeup, s.wakeup_if_used, s.maxproc) == (
        True, True, False, 0, False, 42)
    assert s.endpoint("/var/spool/q") == "/var/spool/q/private/local"
    [p] = parse("pickup fifo n - n 60 1 pickup\n")
    assert p.endpoint("/var/spool/q") == "/var/spool/q/public/pickup"
    [i] = parse("127.0.0.1:2525 inet y - n - - smtpd\n")
    assert i.private is False                    # inet is never private
    assert i.endpoint("/var/spool/q") == "127.0.0.1:2525"


def test_continuation_comments_and_grouped_override() -> None:
    text = ("# header\n"
            "relay unix - - n - - smtp\n"
            "# a comment between\n"
            "    -o { smtp_helo_name = relay host }\n"
            "\t-o smtp_connect_timeout=5s -v\n")
    [s] = parse(text)
    assert s.overrides == {"smtp_helo_name": "relay host", "smtp_connect_timeout": "5s"}
    assert s.args == ["-v"]
    assert s.line == 2


def test_equality_for_reload() -> None:
    a = parse("smtp unix - - n - - smtp -o a=1\n")[0]
    b = parse("# moved down\n\nsmtp unix - - n - - smtp -o a=1\n")[0]
    c = parse("smtp unix - - n - 3 smtp -o a=1\n")[0]
    d = parse("smtp unix - - n - - smtp -o a=2\n")[0]
    assert a == b and a.line != b.line
    assert a != c and a != d
    assert a.service_key == c.service_key == ("smtp", "unix")


def test_braces_inside_a_word_group_as_postfix_master_does() -> None:
    """Postfix's master (mystrtokq with {}): white space inside braces does not end a
    word, and a word that does not start with "{" keeps its braces (a fresh-eyes
    finding: ``x{y }`` became two arguments)."""
    [svc] = parse("x unix - n n - - pipe user=nobody argv=/bin/echo x{y } { a  b } "
                  "p{q{r s}t}u {}\n")
    assert svc.args[-4:] == ["x{y }", "a  b", "p{q{r s}t}u", ""]


def test_every_bad_line_is_reported_in_one_run() -> None:
    """A pasted stock Postfix master.cf has several lines of programs qmgrd lacks: all
    are reported at once (the first raised, the rest in ``others``), not one per run (a
    fresh-eyes finding); postlogd's unix-dgram line gets the tailored message."""
    text = ("x unix - - n - - error\n"
            "cleanup unix n - y - 0 cleanup\n"
            "tlsmgr unix - - y 1000? 1 tlsmgr\n"
            "y unix - - n - - error\n"
            "postlog unix-dgram n - n - 1 postlogd\n")
    with pytest.raises(ConfigError) as ei:
        parse(text)
    errors = [ei.value, *ei.value.others]
    assert [e.line for e in errors] == [2, 3, 5]
    assert 'command "cleanup"' in str(errors[0]) and 'command "tlsmgr"' in str(errors[1])
    assert str(errors[2]).endswith('command "postlogd": Postfix\'s postlogd(8) is not a '
                                   "service in qmgrd (every process writes maillog_file "
                                   "itself): delete this line")


@pytest.mark.parametrize("text,line,what", [
    ("x unix - - n - - error\ny tcp - - n - - error\n", 2, "service type"),
    ("x unix q - n - - error\n", 1, "bad private field"),
    ("x unix - maybe n - - error\n", 1, "bad unprivileged field"),
    ("x unix - - yes - - error\n", 1, "bad chroot field"),
    ("x unix - - n 5s - error\n", 1, "bad wakeup time"),
    ("x unix - - n - -1 error\n", 1, "bad process limit"),
    ("x unix - - n - ten error\n", 1, "bad process limit"),
    ("# c\nx unix - - n -\n", 2, "too few fields"),
    ("x unix - - n - - error -o\n", 1, "-o without"),
    ("x unix - - n - - error -o novalue\n", 1, "bad -o option"),
    ("x unix - - n - - error -o { bad name = 1 }\n", 1, "bad -o option"),
    ("x unix - - n - - error { unclosed\n", 1, "missing '}'"),
    ("x unix - - n - - error {a}b\n", 1, "syntax error after '}' in \"{a}b\""),
    ("x unix - - n - - error x{y\n", 1, "missing '}' in \"x{y\""),
    ("x unix - - n - - cleanup\n", 1, ('command "cleanup": Postfix\'s cleanup(8) is not a '
                                       "service in qmgrd (smtpd, pickup and bounce do its "
                                       "work in their own process): delete this line")),
    ("vmail unix - n n - - virtual\n", 1,
     'command "virtual": Postfix\'s virtual(8) is not implemented in qmgrd: delete this line'),
    ("x unix - - n - - nosuch\n", 1, "unknown command"),
    ("a/b unix - - n - - error\n", 1, "bad service name"),
    ("  x unix - - n - - error\n", 1, "continuation line with nothing before it"),
])
def test_errors_name_file_and_line(text: str, line: int, what: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse(text)
    assert str(ei.value).startswith(f"/etc/q/master.cf, line {line}: ")
    assert what in str(ei.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="open .*master.cf"):
        load_master_cf(str(tmp_path / "master.cf"), CFG)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("xyn-? {}=o19\n\t#") + ["unix", "fifo", "smtp", "-o"]),
                max_size=40).map("".join))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        parse(text)
    except ConfigError:
        pass


def test_options_end_at_the_first_argument() -> None:
    """As Postfix's daemons (getopt): -o is an override only before the first argument
    that is not an option (or ``--``); after it, every word is the command's, verbatim
    - a pipe line's ``-o`` and ``-f`` included."""
    [s] = parse("p unix - n n - - pipe -o a=1 flags=R user=nobody\n"
                "  argv=/usr/bin/cmd -o b=2 -f ${sender} -- ${recipient}\n")
    assert s.overrides == {"a": "1"}
    assert s.args == ["flags=R", "user=nobody", "argv=/usr/bin/cmd", "-o", "b=2", "-f",
                      "${sender}", "--", "${recipient}"]
    [t] = parse("p unix - n n - - pipe -o a=1 -- -o b=2 argv=x\n")
    assert t.overrides == {"a": "1"} and t.args == ["-o", "b=2", "argv=x"]
    [u] = parse("p unix - n n - - pipe user=x argv=/bin/sh -c { echo a b } -o\n")
    assert u.args == ["user=x", "argv=/bin/sh", "-c", "echo a b", "-o"]
