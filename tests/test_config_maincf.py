"""Tests for master.config.maincf: main.cf syntax, expansion, typed values, overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from master.config import Config, ConfigError

DATA = Path(__file__).parent / "data" / "config"


def cfg(text: str, overrides: dict[str, str] | None = None) -> Config:
    return Config.from_text(text, "/etc/qmgrd", overrides, path="/etc/qmgrd/main.cf")


def test_load_parses_comments_blank_continuation_and_later_wins() -> None:
    c = Config.load(str(DATA / "good"))
    assert c.get("myhostname") == "host.example.org"
    assert c.get("mydomain") == "example.org"
    assert c.get("mydestination") == "host.example.org, localhost.example.org, localhost"
    assert c.get_list("mydestination") == [
        "host.example.org", "localhost.example.org", "localhost"]
    assert c.get_time("queue_run_delay") == 10
    assert c.get("unknown_thing") == "kept qmgrd"
    assert c.is_set("unknown_thing") and not c.is_set("relayhost")


@pytest.mark.parametrize("sep", ["\x0c", "\x0b", "\x1c", "\x1e", "\x85", "\u2028", "\r"])
def test_only_a_line_feed_ends_a_line(sep: str) -> None:
    """As Postfix reads main.cf: a form feed, a lone CR or a Unicode line separator in a
    comment does not end it, so what follows is no setting; line numbers count LFs."""
    c = cfg(f"myhostname = a.example\n# note{sep}myhostname = b.example\n"
            "mydomain = example.org\n")
    assert c.get("myhostname") == "a.example"
    with pytest.raises(ConfigError, match="line 3"):
        cfg(f"# one{sep}two\nmyhostname = a.example\nno equals sign here\n")


def test_config_directory_comes_from_argument_and_is_absolute(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    (tmp_path / "main.cf").write_text("config_directory = /nowhere\nq = $config_directory\n")
    monkeypatch.chdir(tmp_path.parent)
    c = Config.load(tmp_path.name)
    assert c.config_directory == str(tmp_path)
    assert c.get("config_directory") == str(tmp_path)
    assert c.get("q") == str(tmp_path)
    assert Config.load(str(DATA / "good")).get("queue_directory") == str(DATA / "good/spool")


def test_whitespace_around_equals_and_empty_value() -> None:
    c = cfg("a=1\nb   =    two words   \nrelayhost =\nhash = x # not a comment\n")
    assert c.get("a") == "1"
    assert c.get("b") == "two words"
    assert c.get("relayhost") == ""
    assert c.get("hash") == "x # not a comment"


@pytest.mark.parametrize("text,line,what", [
    ("a = 1\n\nno equals here\n", 3, "missing '='"),
    ("  indented = 1\n", 1, "continuation line with nothing before it"),
    ("# c\n\n   x\n", 3, "continuation line with nothing before it"),
    ("a = 1\nbad name = 2\n", 2, "bad parameter name"),
    ("a = 1\n= 2\n", 2, "missing parameter name"),
])
def test_syntax_errors_name_file_and_line(text: str, line: int, what: str) -> None:
    with pytest.raises(ConfigError) as ei:
        cfg(text)
    assert str(ei.value).startswith(f"/etc/qmgrd/main.cf, line {line}: ")
    assert what in str(ei.value)
    assert ei.value.line == line


def test_load_error_from_file() -> None:
    with pytest.raises(ConfigError, match=r"badline/main.cf, line 4: missing '='"):
        Config.load(str(DATA / "badline"))


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="open .*main.cf: No such file"):
        Config.load(str(tmp_path))
    (tmp_path / "main.cf").write_bytes(b"a = 1\nb = \xff\n")
    with pytest.raises(ConfigError, match=r"main.cf, line 2: invalid UTF-8"):
        Config.load(str(tmp_path))


def test_expansion_forms_and_defaults() -> None:
    c = cfg("myhostname = h.example.com\na = x\nb = $a-${a}-$(a)-$$a-$\nc = $nothing.\n")
    assert c.get("b") == "x-x-x-$a-$"
    assert c.get("c") == "."
    assert c.get("myorigin") == "h.example.com"
    assert c.get("smtpd_banner") == "h.example.com ESMTP qmgrd"
    assert c.get("local_transport") == "local:h.example.com"
    assert c.get("local_recipient_maps") == (
        "proxy:unix:passwd.byname hash:/etc/aliases, nis:mail.aliases")
    assert c.get("no_such_parameter") == ""
    assert c.get_raw("myorigin") == "$myhostname"


def test_conditionals() -> None:
    c = cfg("set = yes\nempty =\na = ${set?on}/${empty?on}/${set:off}/${empty:off}\n"
            "b = ${set?{Y}:{N}} ${empty?{Y}:{N}}\n")
    assert c.get("a") == "on///off"
    assert c.get("b") == "Y N"
    assert c.get_time("smtpd_timeout") == 300
    assert c.get_int("smtpd_hard_error_limit") == 20
    stressed = c.with_overrides({"stress": "yes"})
    assert stressed.get_time("smtpd_timeout") == 10
    assert stressed.get_int("smtpd_hard_error_limit") == 1


def test_braced_conditionals_of_postfix_3() -> None:
    """postconf(5), Postfix 3.0: ${name?{value}}, ${name:{value}} and
    ${name?{value1}:{value2}}, white space around the braced parts ignored."""
    c = cfg("set = yes\nempty =\n"
            "a = ${set?{on val}}|${empty?{on}}|${set:{off}}|${empty:{off val}}\n"
            "b = ${set?  {sp}  :  {no} }|${empty?{x}:{ no }}\n"
            "c = ${empty?{$set}:{${set?{nested}}}}\n")
    assert c.get("a") == "on val|||off val"
    assert c.get("b") == "sp| no "
    assert c.get("c") == "nested"


@pytest.mark.parametrize("value", ["${set:{x}:{y}}", "${set?{x}junk}", "${set?{x}:}",
                                   "${set:{x}y}"])
def test_malformed_braced_conditionals_name_file_and_line(value: str) -> None:
    c = cfg(f"set = yes\nz = {value}\n")
    with pytest.raises(ConfigError, match=r'main.cf, line 2: bad conditional'):
        c.get("z")


def test_raw_parameters_are_not_expanded() -> None:
    c = cfg("mailbox_command = /usr/bin/procmail -a $EXTENSION\n")
    assert c.get("mailbox_command") == "/usr/bin/procmail -a $EXTENSION"
    assert c.get("forward_path").startswith("$home/.forward")


@pytest.mark.parametrize("text,param", [
    ("a = $a\n", "a"),
    ("x = $y\ny = ${z}\nz = $(x)\n", "x"),
    ("myhostname = $mydomain\n", "myhostname"),
])
def test_expansion_loops_raise_naming_the_parameter(text: str, param: str) -> None:
    c = cfg(text)
    with pytest.raises(ConfigError, match=f"expansion loop in parameter {param}"):
        c.get(param)


def test_loop_error_carries_line() -> None:
    c = cfg("# hi\nloop = $loop\n")
    with pytest.raises(ConfigError) as ei:
        c.get("loop")
    assert str(ei.value).startswith("/etc/qmgrd/main.cf, line 2: ")


def test_unbalanced_brace() -> None:
    with pytest.raises(ConfigError, match=r"line 1: missing '}'"):
        cfg("a = ${b\n").get("a")


def test_deep_nesting_is_a_config_error() -> None:
    deep = cfg("b = 1\na = " + "${b?" * 2000 + "x" + "}" * 2000 + "\n")
    with pytest.raises(ConfigError, match="line 2: unreasonable macro nesting"):
        deep.get("a")
    chain = "".join(f"p{i} = $p{i + 1}\n" for i in range(500))
    with pytest.raises(ConfigError, match="unreasonable macro nesting"):
        cfg(chain).get("p0")


def test_typed_values_and_units() -> None:
    c = cfg("t1 = 10\nt2 = 2m\nt3 = 1H\nt4 = 3d\nt5 = 1w\nb1 = YES\nb2 = false\n"
            "maximal_queue_lifetime = 2\ndelay_warning_time = 4\n")
    assert [c.get_time(n) for n in ("t1", "t2", "t3", "t4", "t5")] == [
        10, 120, 3600, 3 * 86400, 604800]
    assert c.get_bool("b1") is True and c.get_bool("b2") is False
    assert c.get_time("maximal_queue_lifetime") == 2 * 86400   # table unit: d
    assert c.get_time("delay_warning_time") == 4 * 3600        # table unit: h
    assert c.get_size("message_size_limit") == 10240000
    assert c.get_int("default_process_limit") == 100
    assert c.get_bool("soft_bounce") is False
    assert c.get_bool("enable_long_queue_ids") is True
    assert c.get_list("hash_queue_names") == ["deferred", "defer"]
    assert c.get_list("notify_classes") == ["resource", "software"]


@pytest.mark.parametrize("text,getter,name,what", [
    ("queue_run_delay = 5x\n", "get_time", "queue_run_delay", "bad time value"),
    ("queue_run_delay = 1h30m\n", "get_time", "queue_run_delay", "bad time value"),
    ("queue_run_delay = 0\n", "get_time", "queue_run_delay", "minimum is 1s"),
    ("hash_queue_depth = 11\n", "get_int", "hash_queue_depth", "maximum is 10"),
    ("line_length_limit = 511\n", "get_int", "line_length_limit", "minimum is 512"),
    ("line_length_limit = 100\n", "get_size", "line_length_limit", "minimum is 512"),
    ("default_process_limit = many\n", "get_int", "default_process_limit", "bad numerical"),
    ("soft_bounce = maybe\n", "get_bool", "soft_bounce", "bad boolean"),
    ("message_size_limit = 10M\n", "get_size", "message_size_limit", "bad size"),
])
def test_bad_values_name_parameter_file_and_line(text: str, getter: str, name: str,
                                                 what: str) -> None:
    c = cfg("# first\n" + text)
    with pytest.raises(ConfigError) as ei:
        getattr(c, getter)(name)
    msg = str(ei.value)
    assert msg.startswith("/etc/qmgrd/main.cf, line 2: ")
    assert name in msg and what in msg


def test_bad_override_value_is_named_as_override() -> None:
    c = cfg("", {"max_idle": "soon"})
    with pytest.raises(ConfigError, match=r"^-o max_idle=soon: bad time value"):
        c.get_time("max_idle")
    with pytest.raises(ConfigError, match="bad parameter name"):
        cfg("", {"bad name": "x"})


def test_transport_param_fallback() -> None:
    c = cfg("smtp_destination_recipient_limit = 7\nrelay_transport_rate_delay = 2m\n"
            "default_destination_concurrency_limit = 30\n")
    assert c.transport_int("local", "_destination_recipient_limit") == 1
    assert c.transport_int("smtp", "_destination_recipient_limit") == 7
    assert c.transport_int("relay", "_destination_recipient_limit") == 50
    assert c.transport_name("relay", "_destination_recipient_limit") == (
        "default_destination_recipient_limit")
    assert c.transport_int("smtp", "_destination_concurrency_limit") == 30
    assert c.transport_int("local", "_destination_concurrency_limit") == 2
    assert c.transport_int("mytr", "_destination_concurrency_limit") == 30
    assert c.transport_time("relay", "_transport_rate_delay") == 120
    assert c.transport_time("smtp", "_transport_rate_delay") == 0
    assert c.transport_param("smtp", "_delivery_slot_cost") == "5"
    assert c.transport_int("local", "_initial_destination_concurrency") == 5
    assert c.transport_name("local", "_initial_destination_concurrency") == (
        "initial_destination_concurrency")
    bad = cfg("# x\nsmtp_destination_recipient_limit = -1\n")
    with pytest.raises(ConfigError, match=r"line 2: invalid smtp_destination_recipient_limit"):
        bad.transport_int("smtp", "_destination_recipient_limit")


def test_overrides_win_and_affect_expansion() -> None:
    c = cfg("myhostname = a.example.com\nsyslog_name = qmgrd\n")
    child = c.with_overrides({"myhostname": "b.example.net", "syslog_name": "x/$service_name",
                              "service_name": "relay"})
    assert child.get("smtp_helo_name") == "b.example.net"
    assert child.get("syslog_name") == "x/relay"
    assert c.get("smtp_helo_name") == "a.example.com"   # parent unchanged
    direct = Config.from_text("a = 1\n", "/x", {"a": "2"})
    assert direct.get("a") == "2"
    assert child.with_overrides({"service_name": "smtp"}).get("syslog_name") == "x/smtp"


def test_myhostname_default_is_a_dotted_name() -> None:
    c = cfg("")
    host = c.get("myhostname")
    assert "." in host
    assert c.get("mydomain")
    assert c.get("myorigin") == host


def test_dump() -> None:
    c = cfg("myhostname = h.example.com\nrelayhost =\nzz_custom = $myhostname\n",
            {"max_use": "5"})
    n = c.dump(nondefault=True)
    assert n == ["max_use = 5", "myhostname = h.example.com", "relayhost =",
                 "zz_custom = $myhostname"]
    d = c.dump(defaults=True)
    assert "queue_run_delay = 300s" in d and "max_use = 100" in d
    assert "myorigin = $myhostname" in d and "relayhost =" in d
    assert not any(line.startswith("zz_custom") for line in d)
    everything = c.dump()
    assert "max_use = 5" in everything and "zz_custom = $myhostname" in everything
    assert "config_directory = /etc/qmgrd" in everything
    assert "zz_custom = h.example.com" in c.dump(expand=True)
    assert everything == sorted(everything)
    with pytest.raises(ValueError):
        c.dump(defaults=True, nondefault=True)


def test_check_finds_first_bad_parameter() -> None:
    cfg("myhostname = h.example.com\n").check()
    with pytest.raises(ConfigError, match="line 2: .*max_use"):
        cfg("myhostname = h.example.com\nmax_use = 0\n").check()


def test_every_table_default_is_valid() -> None:
    c = cfg("myhostname = h.example.com\n")
    c.check()
    assert os.path.isabs(c.get("queue_directory"))
    assert c.queue_directory() == "/var/spool/postfix"


@pytest.mark.parametrize("setting,shown,why", [
    ("queue_directory =", '""', "empty; it must be an absolute path"),
    ("queue_directory = var/spool", '"var/spool"', "not an absolute path"),
    ("queue_directory = ./spool", '"./spool"', "not an absolute path"),
    ("queue_directory = $spool_base", '"" (from "$spool_base")',
     "empty; it must be an absolute path"),
    ("spool_base =\nqueue_directory = ${spool_base}/q", '"/q"', None),  # absolute after all
    ("spool_base = spool\nqueue_directory = $spool_base/q",
     '"spool/q" (from "$spool_base/q")', "not an absolute path"),
])
def test_queue_directory_must_be_an_absolute_path(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  setting: str, shown: str,
                                                  why: str | None) -> None:
    """Postfix refuses an empty queue_directory; qmgrd also a relative one (it would be
    taken from the current directory). The error names main.cf and the line that sets
    queue_directory, also when the value comes from another parameter; check() finds
    it too. An empty value is never the current directory."""
    monkeypatch.chdir(tmp_path)
    text = f"myhostname = h.example.com\n# the spool\n{setting}\n"
    line = text.count("\n")  # queue_directory is set on the last line
    c = cfg(text)
    if why is None:
        assert c.queue_directory() == "/q"
        c.check()
        return
    with pytest.raises(ConfigError) as info:
        c.queue_directory()
    assert str(info.value) == (f"/etc/qmgrd/main.cf, line {line}: bad queue_directory "
                               f"parameter value {shown}: {why}")
    assert (info.value.path, info.value.line) == ("/etc/qmgrd/main.cf", line)
    with pytest.raises(ConfigError) as checked:
        c.check()
    assert str(checked.value) == str(info.value)


def test_bad_queue_directory_override_is_named_as_override() -> None:
    c = cfg("myhostname = h.example.com\nqueue_directory = /q\n",
            {"queue_directory": "spool"})
    with pytest.raises(ConfigError) as info:
        c.queue_directory()
    assert str(info.value) == ('-o queue_directory=spool: bad queue_directory parameter '
                               'value "spool": not an absolute path')
    with pytest.raises(ConfigError, match="^-o queue_directory=: .*empty"):
        cfg("", {"queue_directory": ""}).check()


@pytest.mark.parametrize("name", ["data_directory", "maillog_file"])
@pytest.mark.parametrize("value,shown,why", [
    ("lib", '"lib"', "not an absolute path"),
    ("./var/log/maillog", '"./var/log/maillog"', "not an absolute path"),
    ("$base/x", '"var/x" (from "$base/x")', "not an absolute path"),
    ("", '""', "empty; it must be an absolute path"),
])
def test_data_directory_and_maillog_file_must_be_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str,
        shown: str, why: str) -> None:
    """A relative data_directory or maillog_file (each process would take it from its
    own working directory) is refused by its accessor and by check(), naming main.cf
    and the line, as queue_directory. An empty data_directory is refused too (Postfix:
    a string of minimum length 1); an empty maillog_file is syslog (Postfix's default)."""
    monkeypatch.chdir(tmp_path)
    text = f"myhostname = h.example.com\nbase = var\n# the path\n{name} = {value}\n"
    c = cfg(text)
    accessor = getattr(c, name)
    if name == "maillog_file" and not value:
        assert accessor() == ""
        c.check()
        return
    with pytest.raises(ConfigError) as info:
        accessor()
    assert str(info.value) == (f"/etc/qmgrd/main.cf, line 4: bad {name} parameter "
                               f"value {shown}: {why}")
    with pytest.raises(ConfigError) as checked:
        c.check()
    assert str(checked.value) == str(info.value)
    with pytest.raises(ConfigError, match=f"^-o {name}=x: bad {name} parameter value"):
        cfg("myhostname = h.example.com\n", {name: "x"}).check()


def test_data_directory_and_maillog_file_defaults_and_normalising() -> None:
    c = cfg("myhostname = h.example.com\n")
    assert (c.data_directory(), c.maillog_file()) == ("/var/lib/postfix", "")
    c = cfg("base = /srv/\ndata_directory = $base/lib/\nmaillog_file = /var/log/../log/m\n")
    assert (c.data_directory(), c.maillog_file()) == ("/srv/lib", "/var/log/m")


def test_queue_directory_is_normalised() -> None:
    assert cfg("queue_directory = /var/spool/../q/./x/\n").queue_directory() == "/var/q/x"
    assert cfg("base = /srv\nqueue_directory = $base/q\n").queue_directory() == "/srv/q"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab_=$ {}()?:#,\n\t1sx")), max_size=60))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        c = cfg(text)
        c.check()
        for name in c.names():
            c.get_list(name)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_unicode_raises_only_config_error(text: str) -> None:
    try:
        c = cfg(text)
        for name in c.names():
            c.get(name)
            c.get_raw(name)
    except ConfigError:
        pass


@pytest.mark.parametrize("value,names", [
    ("deferred, defer", ["deferred", "defer"]),
    ("Deferred,ACTIVE hold", ["deferred", "active", "hold"]),  # Postfix: any case
    ("incoming active deferred hold corrupt bounce defer trace",
     ["incoming", "active", "deferred", "hold", "corrupt", "bounce", "defer", "trace"]),
    ("deferred, flush, saved", ["deferred", "flush", "saved"]),  # Postfix's, no effect
    ("", []),
])
def test_hash_queue_names_accepts_queue_directories(value: str, names: list[str]) -> None:
    c = cfg(f"myhostname = h.example.com\nhash_queue_names = {value}\n")
    assert c.hash_queue_names() == names
    c.check()


@pytest.mark.parametrize("value,why", [
    ("deferred, MailDrop",
     "maildrop cannot be hashed (pickup reads maildrop/ without hash directories)"),
    ("deffered", ('"deffered" is not a queue directory that can be hashed (incoming, '
                  "active, deferred, hold, corrupt, bounce, defer, trace)")),
    ("deferred public", '"public" is not a queue directory that can be hashed'),
])
def test_hash_queue_names_refuses_maildrop_and_other_names(value: str, why: str) -> None:
    """maildrop must stay flat for pickup (Postfix's pickup scans it without hash
    directories); a name that is no queue directory is refused too rather than
    ignored as Postfix does. The error names main.cf's line; check() finds it; an
    override is named as such."""
    c = cfg(f"myhostname = h.example.com\n# queues\nhash_queue_names = {value}\n")
    expected = (f'/etc/qmgrd/main.cf, line 3: bad hash_queue_names parameter value '
                f'"{value}": {why}')
    with pytest.raises(ConfigError) as info:
        c.hash_queue_names()
    assert str(info.value).startswith(expected)
    assert (info.value.path, info.value.line) == ("/etc/qmgrd/main.cf", 3)
    with pytest.raises(ConfigError) as checked:
        c.check()
    assert str(checked.value) == str(info.value)
    over = cfg("myhostname = h.example.com\n", {"hash_queue_names": value})
    with pytest.raises(ConfigError, match="^-o hash_queue_names="):
        over.check()


def test_hashable_queues_are_the_spool_queues_but_maildrop() -> None:
    """master.config cannot import qmgrd: its list must follow qmgrd.spool.queue's."""
    from master.config.maincf import HASHABLE_QUEUES
    from qmgrd.spool.queue import LOG_QUEUES, MESSAGE_QUEUES
    assert set(HASHABLE_QUEUES) == (set(MESSAGE_QUEUES) | set(LOG_QUEUES)) - {"maildrop"}
