"""master.config.validate and friends: every value of main.cf and of each master.cf -o
override checked before a start or reload, command modules located without importing
them, inet ports and hosts, duplicate services and unused -o parameters reported,
main.cf read leniently (for stop/status), exception wording without Python reprs."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

from master.config import Config, ConfigError, describe, load_configuration
from master.config.maincf import param_spec
from master.config.mastercf import parse_master_cf
from master.config.tables import TableError, read_table
from master.config.validate import (
    check_mail_owner,
    check_service,
    check_tables,
    inet_hosts,
    module_problem,
)

GOOD_MASTER = """\
pickup    fifo  n       -       n       60      1       pickup
qmgr      fifo  n       -       n       300     1       qmgr
smtp      unix  -       -       n       -       -       smtp
"""


def write(tmp_path: Path, main: str, master: str = GOOD_MASTER) -> str:
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n" + main)
    (tmp_path / "master.cf").write_text(master)
    return str(tmp_path)


def error_of(etc: str) -> str:
    with pytest.raises(ConfigError) as ei:
        load_configuration(etc)
    return str(ei.value)


def test_good_configuration_loads(tmp_path: Path) -> None:
    warnings: list[str] = []
    cfg, services = load_configuration(write(tmp_path, "myhostname = h.example\n"),
                                       warnings.append)
    assert [s.name for s in services] == ["pickup", "qmgr", "smtp"]
    assert cfg.get("myhostname") == "h.example" and warnings == []


def test_a_parameter_set_twice_is_named(tmp_path: Path) -> None:
    """main.cf sets relayhost twice: the later line wins and the earlier is named, as
    Postfix's configuration reader warns (overriding earlier entry)."""
    warnings: list[str] = []
    etc = write(tmp_path, "relayhost = [a.example]\nmyhostname = h.example\n"
                          "relayhost =\n    [b.example]:587\n")
    cfg, _ = load_configuration(etc, warnings.append)
    assert cfg.get("relayhost") == "[b.example]:587"
    assert warnings == [(f"{etc}/main.cf, line 4: overriding earlier entry: "
                         "relayhost=[b.example]:587")]


@pytest.mark.parametrize("line,what", [
    ("maximal_queue_lifetime = 5q", 'bad time value for parameter maximal_queue_lifetime: "5q"'),
    ("qmgr_message_active_limit = lots",
     'bad numerical value for parameter qmgr_message_active_limit: "lots"'),
    ("myhostname = $myhostname", "expansion loop in parameter myhostname"),
    ("soft_bounce = maybe", "bad boolean value for parameter soft_bounce"),
    ("smtp_destination_recipient_limit = x",
     'bad numerical value for parameter smtp_destination_recipient_limit: "x"'),
    ("relay_transport_rate_delay = 1fortnight",
     "bad time value for parameter relay_transport_rate_delay"),
    ("maximal_queue_lifetime = 101d",  # Postfix's maximum: 8640000 s
     'invalid maximal_queue_lifetime parameter value "101d": maximum is 8640000s'),
    ("bounce_queue_lifetime = 8640001",
     'invalid bounce_queue_lifetime parameter value "8640001": maximum is 8640000s'),
    ("line_length_limit = 100",  # Postfix's minimum: every submission would be refused
     'invalid line_length_limit parameter value "100": minimum is 512'),
    # a value must fit the C type Postfix keeps it in: a long (message_size_limit) ...
    ("message_size_limit = 99999999999999999999999",
     ('invalid message_size_limit parameter value "99999999999999999999999": maximum is '
      "9223372036854775807")),
    ("queue_minfree = 9223372036854775808",
     ('invalid queue_minfree parameter value "9223372036854775808": maximum is '
      "9223372036854775807")),
    # ... or an int: integer parameters, int-sized sizes, times (in seconds) and the
    # per-transport parameters, which take their global's type
    ("header_size_limit = 2147483648",
     'invalid header_size_limit parameter value "2147483648": maximum is 2147483647'),
    ("qmgr_message_active_limit = 99999999999",
     ('invalid qmgr_message_active_limit parameter value "99999999999": maximum is '
      "2147483647")),
    ("smtp_destination_recipient_limit = 2147483648",
     ('invalid smtp_destination_recipient_limit parameter value "2147483648": maximum is '
      "2147483647")),
    ("async_event_loop = libevent",
     'parameter async_event_loop: unknown event loop "libevent" (expected uvloop or asyncio)'),
    ("smtpd_timeout = 99999999999999999999w",
     ('invalid smtpd_timeout parameter value "99999999999999999999w": maximum is '
      "2147483647s")),
])
def test_bad_main_cf_values_are_errors_with_file_and_line(tmp_path: Path, line: str,
                                                           what: str) -> None:
    etc = write(tmp_path, f"# comment\n{line}\n")
    assert error_of(etc).startswith(f"{etc}/main.cf, line 3: {what}")


def test_an_out_of_range_override_names_master_cf_line(tmp_path: Path) -> None:
    etc = write(tmp_path, "", GOOD_MASTER + "relay unix - - n - - smtp\n"
                "  -o smtp_mx_session_limit=4294967296\n")
    assert error_of(etc) == (
        f"{etc}/master.cf, line 4: -o smtp_mx_session_limit=4294967296: invalid "
        'smtp_mx_session_limit parameter value "4294967296": maximum is 2147483647')


def test_per_transport_parameters_take_their_globals_type() -> None:
    spec = param_spec("smtp_destination_recipient_limit")
    assert spec is not None and spec.name == "default_destination_recipient_limit"
    initial = param_spec("relay_initial_destination_concurrency")
    assert initial is not None and initial.name == "initial_destination_concurrency"
    assert param_spec("queue_run_delay") is not None
    assert param_spec("my_own_macro") is None


def test_bad_override_value_names_master_cf_line(tmp_path: Path) -> None:
    etc = write(tmp_path, "", GOOD_MASTER + "relay unix - - n - - smtp\n"
                "  -o maximal_queue_lifetime=5q\n")
    assert error_of(etc) == (f"{etc}/master.cf, line 4: -o maximal_queue_lifetime=5q: bad "
                             'time value for parameter maximal_queue_lifetime: "5q"')


def test_override_making_an_expansion_loop(tmp_path: Path) -> None:
    etc = write(tmp_path, "", GOOD_MASTER + "relay unix - - n - - smtp -o myorigin=$myorigin\n")
    message = error_of(etc)
    assert message.startswith(f"{etc}/master.cf, line 4: ")
    assert "expansion loop in parameter myorigin" in message


def test_unknown_override_names_only_warn(tmp_path: Path) -> None:
    master = GOOD_MASTER + ("relay unix - - n - - smtp -o smtp_fooo=1 -o syslog_name=x\n"
                            "  -o relay_destination_recipient_limit=3 -o user_macro=a\n"
                            "  -o smtp_helo_name=$user_macro -o known_in_main=2\n")
    etc = write(tmp_path, "known_in_main = 1\n", master)
    warnings: list[str] = []
    load_configuration(etc, warnings.append)
    assert warnings == [f"{etc}/master.cf, line 4: unused parameter: -o smtp_fooo=1"]


def test_duplicate_service_warns_naming_both_lines(tmp_path: Path) -> None:
    etc = write(tmp_path, "", GOOD_MASTER + "# again\nsmtp unix - - n - 5 smtp\n")
    warnings: list[str] = []
    _, services = load_configuration(etc, warnings.append)
    assert warnings == [(f"{etc}/master.cf, line 5: duplicate service smtp/unix, "
                        "overrides line 3")]
    smtp = [s for s in services if s.name == "smtp"]
    assert len(smtp) == 1 and smtp[0].maxproc == 5 and smtp[0].line == 5  # last wins
    parse_master_cf(GOOD_MASTER * 2, "master.cf", Config.from_text("", "/x"))  # no warn: ok


def test_qmgr_unix_is_taken_as_fifo(tmp_path: Path) -> None:
    """Postfix's (and Debian's) stock master.cf has "qmgr unix ...": taken as a FIFO
    with a warning, so that the stock line can be pasted (a fresh-eyes finding; it was
    refused before)."""
    master = GOOD_MASTER.replace("qmgr      fifo", "qmgr      unix")
    etc = write(tmp_path, "", master)
    warnings: list[str] = []
    _, services = load_configuration(etc, warn=warnings.append)
    [qmgr] = [s for s in services if s.name == "qmgr"]
    assert qmgr.type == "fifo"
    assert warnings == [(f"{etc}/master.cf, line 2: service qmgr: type unix taken as fifo "
                        "(qmgrd's qmgr reads its triggers from a FIFO)")]


def test_builtin_commands_take_no_arguments(tmp_path: Path) -> None:
    """Postfix's smtp(8) exits with "unexpected command-line argument"; a fresh-eyes
    finding: the argument was ignored without a word."""
    master = GOOD_MASTER.replace("n       -       -       smtp",
                                 "n       -       -       smtp -o smtp_helo_timeout=9 bogus")
    etc = write(tmp_path, "", master)
    assert error_of(etc) == (f'{etc}/master.cf, line 3: service smtp: unexpected '
                             'command-line argument "bogus" (command "smtp" takes only -o '
                             'options)')


def test_smtpd_encrypt_needs_a_readable_certificate(tmp_path: Path) -> None:
    """TLS required and no certificate: refused at start/reload (naming the smtpd line),
    not a smtpd that dies at every start while the master throttles it."""
    line = "127.0.0.1:2525 inet n - n - - smtpd -o smtpd_tls_security_level=encrypt"
    etc = write(tmp_path, "", GOOD_MASTER + line + "\n")
    assert error_of(etc) == (f"{etc}/master.cf, line 4: smtpd_tls_security_level = "
                             "encrypt needs smtpd_tls_cert_file")
    etc = write(tmp_path, f"smtpd_tls_cert_file = {tmp_path}/none.pem\n",
                GOOD_MASTER + line + "\n")
    assert error_of(etc) == (f"{etc}/master.cf, line 4: smtpd_tls_security_level = "
                             f"encrypt: cannot read smtpd_tls_cert_file {tmp_path}/none.pem: "
                             "No such file or directory")
    (tmp_path / "cert.pem").write_text("x")
    etc = write(tmp_path, f"smtpd_tls_cert_file = {tmp_path}/cert.pem\n",
                GOOD_MASTER + line + "\n")
    load_configuration(etc)  # readable: the content is smtpd's to judge (and log)
    etc = write(tmp_path, "", GOOD_MASTER + line.replace("encrypt", "may") + "\n")
    load_configuration(etc)  # may: STARTTLS is just not offered


SMTPD = "127.0.0.1:2525 inet n - n - - smtpd"
OPEN_RELAY = ("in parameter smtpd_relay_restrictions or smtpd_recipient_restrictions, "
              "specify at least one working instance of: reject_unauth_destination, "
              "defer_unauth_destination, reject, defer or defer_if_permit")


def test_smtpd_without_a_relay_guard_names_main_cf_line(tmp_path: Path) -> None:
    """The tester's main.cf: smtpd would exit fatal at every start (Postfix's open-relay
    check) while clients hang; refused at start/reload, naming the main.cf line."""
    etc = write(tmp_path, "myhostname = h.example\n"
                "smtpd_relay_restrictions = permit_mynetworks, bogus_restriction\n",
                GOOD_MASTER + SMTPD + "\n")
    assert error_of(etc) == f"{etc}/main.cf, line 3: {OPEN_RELAY}"
    # neither check_*_access nor a restriction class name counts: smtpd runs neither;
    # the relay list is empty, so the recipient list (line 4) is the one named
    etc = write(tmp_path, "smtpd_restriction_classes = strict\n"
                "strict = reject_unauth_destination\n"
                "smtpd_recipient_restrictions = check_recipient_access texthash:/x, strict\n"
                "smtpd_relay_restrictions =\n", GOOD_MASTER + SMTPD + "\n")
    assert error_of(etc) == f"{etc}/main.cf, line 4: {OPEN_RELAY}"


@pytest.mark.parametrize("relay", [
    "permit, reject_unauth_destination",  # permit ends the list: an open relay
    "permit_mynetworks, warn_if_reject reject_unauth_destination",  # only logs
])
def test_smtpd_guard_after_permit_or_warn_if_reject_does_not_count(tmp_path: Path,
                                                                     relay: str) -> None:
    """Postfix's has_required: a guard after ``permit`` or under ``warn_if_reject`` is no
    guard."""
    etc = write(tmp_path, f"smtpd_relay_restrictions = {relay}\n", GOOD_MASTER + SMTPD + "\n")
    assert error_of(etc) == f"{etc}/main.cf, line 2: {OPEN_RELAY}"


def test_smtpd_relay_guard_removed_by_override_names_master_cf_line(tmp_path: Path) -> None:
    line = SMTPD + " -o smtpd_relay_restrictions=permit_mynetworks"
    etc = write(tmp_path, "", GOOD_MASTER + line + "\n")
    assert error_of(etc) == (f"{etc}/master.cf, line 4: -o smtpd_relay_restrictions="
                             f"permit_mynetworks: {OPEN_RELAY}")
    # main.cf has its guard in the recipient list; the second smtpd's override drops it
    etc = write(tmp_path, "smtpd_relay_restrictions =\n"
                "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination\n",
                GOOD_MASTER + SMTPD + "\n" + SMTPD.replace("2525", "2526")
                + "\n  -o smtpd_recipient_restrictions=permit_mynetworks\n")
    assert error_of(etc) == (f"{etc}/master.cf, line 5: -o smtpd_recipient_restrictions="
                             f"permit_mynetworks: {OPEN_RELAY}")


@pytest.mark.parametrize("main,override", [
    ("", ""),  # the default relay list ends in defer_unauth_destination
    ("smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n", ""),
    (("smtpd_relay_restrictions =\n"
      "smtpd_recipient_restrictions = permit_mynetworks, REJECT_UNAUTH_DESTINATION\n"), ""),
    # main.cf's list is not what this smtpd runs with: its override is
    ("smtpd_relay_restrictions = permit_mynetworks, bogus\n",
     " -o smtpd_relay_restrictions=permit_mynetworks,defer_if_permit"),
])
def test_smtpd_with_a_relay_guard_loads(tmp_path: Path, main: str, override: str) -> None:
    load_configuration(write(tmp_path, main, GOOD_MASTER + SMTPD + override + "\n"))


def test_relay_guard_is_checked_for_smtpd_services_only(tmp_path: Path) -> None:
    load_configuration(write(tmp_path, "smtpd_relay_restrictions = permit_mynetworks\n"))


@pytest.mark.parametrize("command,what", [
    ("no.such.module", 'no module named no.such.module ("no" not found)'),
    ("qmgrd.no_such_agent", "no module named qmgrd.no_such_agent"),
    ("transports.pickup.sub", ("no module named transports.pickup.sub (transports.pickup "
                              "is not a package)")),
    ("tests.services", "tests.services is a package without __main__ (cannot be run)"),
])
def test_command_module_must_exist(tmp_path: Path, command: str, what: str) -> None:
    etc = write(tmp_path, "", GOOD_MASTER + f"mine unix - - n - - {command}\n")
    assert error_of(etc) == f'{etc}/master.cf, line 4: command "{command}": {what}'


def test_module_lookup_imports_nothing() -> None:
    for name in ("tests.services.echo_agent", "qmgrd.qmgr", "transports.bounce"):
        sys.modules.pop(name, None)
    assert module_problem("tests.services.echo_agent") is None   # namespace packages
    assert module_problem("qmgrd.qmgr") is None                  # package with __main__
    assert module_problem("transports.bounce") is None           # plain module
    assert module_problem("json.tool") is None                   # outside the checkout
    for name in ("tests.services.echo_agent", "qmgrd.qmgr", "transports.bounce"):
        assert name not in sys.modules


@pytest.mark.parametrize("name,what", [
    ("inet1", ('unknown service port "inet1" in inet service "inet1" (not a number, not '
              "in /etc/services)")),
    ("127.0.0.1:99999", 'bad port number "99999" in inet service "127.0.0.1:99999"'),
    ("127.0.0.1:", 'missing port in inet service "127.0.0.1:"'),
    ("no-such-host.invalid:2525", 'unknown host "no-such-host.invalid"'),
])
def test_inet_service_names_are_checked(tmp_path: Path, name: str, what: str) -> None:
    etc = write(tmp_path, "", GOOD_MASTER + f"{name} inet n - n - - tests.services.echo_agent\n")
    message = error_of(etc)
    assert message.startswith(f"{etc}/master.cf, line 4: {what}")


def test_good_inet_service_names(tmp_path: Path) -> None:
    master = GOOD_MASTER + ("127.0.0.1:smtp inet n - n - - tests.services.echo_agent\n"
                            "[::1]:2525 inet n - n - - tests.services.echo_agent\n"
                            "localhost:2526 inet n - n - - tests.services.echo_agent\n"
                            "2527 inet n - n - - tests.services.echo_agent\n")
    load_configuration(write(tmp_path, "inet_interfaces = loopback-only, [::1]\n", master))
    cfg = Config.from_text("inet_interfaces = loopback-only, [::1], 127.0.0.1\n", "/x")
    assert inet_hosts(cfg) == ["127.0.0.1", "::1"]
    assert inet_hosts(Config.from_text("", "/x")) == [""]


def test_bad_inet_interfaces_named_in_main_cf(tmp_path: Path) -> None:
    master = GOOD_MASTER + "2527 inet n - n - - tests.services.echo_agent\n"
    etc = write(tmp_path, "inet_interfaces = no-such-host.invalid\n", master)
    assert error_of(etc).startswith(f'{etc}/main.cf, line 2: unknown host "no-such-host.'
                                    'invalid"')


def test_check_service_without_location() -> None:
    cfg = Config.from_text("", "/x")
    svc = parse_master_cf("x unix - - n - - smtp -o max_idle=soon\n", "", cfg)[0]
    svc.path, svc.line = "", 0
    with pytest.raises(ConfigError, match=r"^-o max_idle=soon: bad time value"):
        check_service(cfg, svc)


def test_lenient_load_skips_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_bytes(b"  orphan continuation\nqueue_directory = /q\n"
                                       b"broken line\nname = \xff\nx = 1\n")
    with pytest.raises(ConfigError):
        Config.load(str(tmp_path))
    cfg, errors = Config.load_lenient(str(tmp_path))
    assert cfg.get("queue_directory") == "/q" and cfg.get("x") == "1"
    assert [e.line for e in errors] == [4, 1, 3]
    assert "missing '=' after parameter name" in str(errors[2])
    with pytest.raises(ConfigError, match="open .*: No such file"):
        Config.load_lenient(str(tmp_path / "nowhere"))


def test_describe_has_no_python_reprs() -> None:
    assert describe(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")) == (
        "/x: No such file or directory")
    assert describe(OSError(errno.EADDRINUSE, "Address already in use")) == (
        "Address already in use")
    assert describe(OSError(errno.EXDEV, "Invalid cross-device link", b"/a", None, "/b")) == (
        "/a -> /b: Invalid cross-device link")
    assert describe(ValueError("plain words")) == "plain words"
    assert describe(RuntimeError()) == "RuntimeError"


# ----------------------------------------------------------------------------- tables
def test_missing_transport_map_is_an_error_naming_parameter_and_table(
        tmp_path: Path) -> None:
    etc = write(tmp_path, "myhostname = h.example\ntransport_maps = hash:/nonexistent\n")
    assert error_of(etc) == (f"{etc}/main.cf, line 3: parameter transport_maps: "
                             "hash:/nonexistent: No such file or directory")


@pytest.mark.parametrize("value,what", [
    ("nis:mail.transport", "nis:mail.transport: unsupported dictionary type: nis"),
    ("inline:{a=b, c}", "inline:{a=b, c}: missing '=' in 'c'"),
    ("texthash:DIR", "DIR: Is a directory"),
])
def test_bad_transport_maps_are_errors(tmp_path: Path, value: str, what: str) -> None:
    (tmp_path / "bad").write_text("# c\nlonely\n")
    etc = write(tmp_path, f"transport_maps = {value.replace('DIR', str(tmp_path))}\n")
    assert error_of(etc) == (f"{etc}/main.cf, line 2: parameter transport_maps: "
                             f"{what.replace('DIR', str(tmp_path))}")


def test_good_transport_maps_load_and_duplicates_warn(tmp_path: Path) -> None:
    (tmp_path / "transport").write_text("a.example smtp:\nA.example local:\n")
    warnings: list[str] = []
    load_configuration(write(tmp_path, f"transport_maps = texthash:{tmp_path}/transport, "
                             "inline:{b.example=error:nope}\n"), warnings.append)
    assert warnings == [f'{tmp_path}/transport, line 2: duplicate entry: "a.example"']


def test_bad_transport_map_line_is_a_warning_for_reload(tmp_path: Path) -> None:
    """A bad line made start/reload refuse the configuration while the running qmgr
    used the file anyway: it is a warning naming file and line (postmap's), and the
    configuration loads, as the qmgr reads the file (the line skipped)."""
    (tmp_path / "transport").write_text("a.example smtp:\nlonely\n# c\n")
    (tmp_path / "lead").write_text("  lead  \nb.example local:\n")
    warnings: list[str] = []
    load_configuration(write(tmp_path, f"transport_maps = hash:{tmp_path}/transport, "
                             f"texthash:{tmp_path}/lead\n"), warnings.append)
    assert warnings == [
        (f"{tmp_path}/transport, line 2: expected format: key whitespace value -- "
         "ignoring this line"),
        (f'{tmp_path}/lead, line 1: logical line must not start with whitespace: '
         '"lead" -- ignoring this line')]


def test_transport_maps_override_in_master_cf_is_checked(tmp_path: Path) -> None:
    etc = write(tmp_path, "", GOOD_MASTER.replace(
        "300     1       qmgr", "300     1       qmgr -o transport_maps=hash:/nope"))
    assert error_of(etc) == (f"{etc}/master.cf, line 2: -o transport_maps=hash:/nope: "
                             "parameter transport_maps: hash:/nope: No such file or directory")


def test_check_tables_and_read_table(tmp_path: Path) -> None:
    cfg = Config.from_text("relocated_maps = hash:/nonexistent\n", str(tmp_path))
    check_tables(cfg)  # relocated_maps: not read by qmgrd, not checked
    with pytest.raises(ConfigError, match="parameter relocated_maps: hash:/nonexistent"):
        check_tables(cfg, ["relocated_maps"])
    (tmp_path / "t").write_text("Key  value\n  continued\n")
    table = read_table(f"hash:{tmp_path}/t")
    assert table.data == {"key": "value continued"} and table.path == f"{tmp_path}/t"
    with pytest.raises(TableError, match="expected type:name"):
        read_table("nocolon")


# ----------------------------------------------------------------------------- mail_owner
@pytest.mark.parametrize("owner,what", [
    ("nosuchuser", "unknown user name value: nosuchuser"),
    ("root", "user root has privileged user ID"),
])
def test_bad_mail_owner_is_an_error_when_root(tmp_path: Path, owner: str, what: str) -> None:
    etc = write(tmp_path, f"mail_owner = {owner}\n")
    with pytest.raises(ConfigError) as ei:
        load_configuration(etc, euid=0)
    lines = (Path(etc) / "main.cf").read_text().split("\n")
    n = lines.index(f"mail_owner = {owner}") + 1
    assert str(ei.value) == f"{etc}/main.cf, line {n}: parameter mail_owner: {what}"
    load_configuration(etc, euid=1000)  # not root: mail_owner is not used


def test_mail_owner_default_and_privileged_group(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    def fake_getpwnam(name: str) -> pwd.struct_passwd:
        if name == "wheelish":
            return pwd.struct_passwd(("wheelish", "x", 500, 0, "", "/", "/bin/sh"))
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", fake_getpwnam)
    cfg = Config.from_text("mail_owner = wheelish\n", str(tmp_path))
    with pytest.raises(ConfigError, match="user wheelish has privileged group ID"):
        check_mail_owner(cfg, euid=0)
    with pytest.raises(ConfigError) as ei:  # the default, absent: main.cf named anyway
        check_mail_owner(Config.from_text("", str(tmp_path)), euid=0)
    assert str(ei.value) == (f"file {tmp_path}/main.cf: parameter mail_owner: "
                             "unknown user name value: postfix")


@pytest.mark.parametrize("line,what", [
    ("myhostname =", 'bad myhostname parameter value "": not a valid host name'),
    ("myhostname = mail host", 'bad myhostname parameter value "mail host"'),
    ("myhostname = -mx.example", 'bad myhostname parameter value "-mx.example"'),
    ("inet_protocols = ipv4, ipv7", 'unknown inet_protocols value "ipv7"'),
    ("smtp_tls_security_level = encrpyt",
     ('invalid TLS security level "encrpyt" in smtp_tls_security_level (one of: none, may, '
      "encrypt, dane, dane-only, fingerprint, verify, secure)")),
])
def test_identity_parameters_are_checked(tmp_path: Path, line: str, what: str) -> None:
    """An empty or malformed myhostname (greeting, Message-ID, Received:, local senders),
    an unknown inet_protocols value and an unknown smtp_tls_security_level (a typo of
    encrypt must not send in the clear) stop start and reload, naming file and line."""
    with pytest.raises(ConfigError) as got:
        load_configuration(write(tmp_path, f"myhostname = h.example\n{line}\n"))
    assert str(got.value).startswith(f"{tmp_path / 'main.cf'}, line 3: {what}")


@pytest.mark.parametrize("value,what", [
    ("[relay.example]:99999", 'bad port number "99999" (1-65535)'),
    ("[relay.example]:0", 'bad port number "0" (1-65535)'),
    ("relay.example:25x", "garbage after numerical service"),
    ("[relay.example]:nosuchservice", 'unknown service "nosuchservice"'),
    ("[]:25", "missing host information"),
    (":25", "missing host information"),
    ("[relay.example", 'missing "]"'),
    ("relay.example]", "valid hostname or network address required"),
    ("[relay.example]]", 'garbage after "]"'),
    ("[ipv6:192.0.2.1]", "malformed IPv6 address"),
    ("a.example, [b.example]:70000", 'bad port number "70000" (1-65535) in "[b.example]:70000"'),
])
def test_bad_relayhost_is_refused_with_file_and_line(tmp_path: Path, value: str,
                                                    what: str) -> None:
    """relayhost is an smtp destination (the smtp client's own parser,
    master.config.nexthop): a port out of range, not a number nor a known service, an
    empty host or unbalanced brackets stop start and reload, naming main.cf's line -
    instead of deferring every relayed message at delivery."""
    etc = write(tmp_path, f"myhostname = h.example\n# smart host\nrelayhost = {value}\n")
    assert error_of(etc) == (f'{etc}/main.cf, line 4: bad relayhost parameter value '
                             f'"{value}": {what}')


@pytest.mark.parametrize("value", [
    "", "relay.example", "relay.example:587", "relay.example:submission", "relay.example:",
    "[relay.example]", "[relay.example]:2525", "[relay.example]:", "[192.0.2.1]:25",
    "192.0.2.1", "[::1]", "[ipv6:2001:db8::1]:25", "[IPv6:2001:db8::1]",
    "a.example, [b.example]:26 c.example", "$myhostname", "[relay_1.example.]",
])
def test_good_relayhost_forms_load(tmp_path: Path, value: str) -> None:
    """Every form Postfix accepts (smtp(8) destination syntax, host_port(); a list with
    Postfix >= 3.5) loads."""
    cfg, _ = load_configuration(write(tmp_path, f"myhostname = h.example\nrelayhost = {value}\n"))
    assert cfg.get_raw("relayhost") == value


def test_transport_nexthop_of_an_smtp_service_is_checked(tmp_path: Path) -> None:
    """default_transport and relay_transport with a nexthop: checked as relayhost when
    the transport is an smtp service of master.cf (not for error:text), also in a qmgr
    service's -o override (master.cf's line)."""
    etc = write(tmp_path, "myhostname = h.example\ndefault_transport = smtp:[x.example]:99999\n")
    assert error_of(etc) == (f'{etc}/main.cf, line 3: bad default_transport parameter '
                             'value "smtp:[x.example]:99999": nexthop "[x.example]:99999": '
                             'bad port number "99999" (1-65535)')
    etc = write(tmp_path, "myhostname = h.example\nrelay_transport = smtp:[x.example\n")
    assert error_of(etc).startswith(f'{etc}/main.cf, line 3: bad relay_transport parameter')
    for good in ("smtp:[x.example]:2525", "smtp", "error:5.7.1 no mail: ever", "smtp:",
                 "local:[x]:99999"):  # local: not an smtp service here
        load_configuration(write(tmp_path, f"myhostname = h.example\ndefault_transport = {good}\n"))
    master = GOOD_MASTER.replace("300     1       qmgr",
                                 "300     1       qmgr\n  -o default_transport=smtp:[y]:0")
    etc = write(tmp_path, "myhostname = h.example\n", master)
    assert error_of(etc) == (f'{etc}/master.cf, line 2: -o default_transport=smtp:[y]:0: '
                             'bad default_transport parameter value "smtp:[y]:0": nexthop '
                             '"[y]:0": bad port number "0" (1-65535)')


def test_maillog_file_must_open_and_no_directory_is_made(tmp_path: Path) -> None:
    """maillog_file: an existing file, or a new one in an existing writable directory,
    is fine (the check creates nothing); a missing directory, or a directory as the
    file, is an error naming main.cf's line - no directory is made for the log, as
    Postfix's postlogd makes none; the check can be left to the master (logfile=False,
    as reload's command line does) and master.log.setup makes no directory either."""
    from master import log

    new = tmp_path / "new.log"
    etc = write(tmp_path, f"maillog_file = {new}\n")
    load_configuration(etc)
    assert not new.exists()  # checked, not created
    new.write_text("old lines\n")
    load_configuration(etc)
    assert new.read_text() == "old lines\n"
    missing = tmp_path / "nonexistent" / "dir" / "maillog"
    etc = write(tmp_path, f"maillog_file = {missing}\n")
    assert error_of(etc) == (
        f'{etc}/main.cf, line 2: cannot open maillog_file "{missing}": No such file or '
        f"directory (its directory {missing.parent} does not exist; it is not created)")
    load_configuration(etc, logfile=False)
    etc = write(tmp_path, f"maillog_file = {tmp_path}\n")
    assert error_of(etc) == (f'{etc}/main.cf, line 2: cannot open maillog_file '
                             f'"{tmp_path}": Is a directory')
    with pytest.raises(FileNotFoundError):
        log.setup("test", str(missing))
    log.close()
    assert not (tmp_path / "nonexistent").exists()


def test_maillog_file_override_must_open_naming_the_master_cf_line(tmp_path: Path) -> None:
    """A service's -o maillog_file is opened by each of its children (before the
    jail, as main.cf's is by the master): a file that cannot be opened is refused as
    main.cf's is, naming master.cf's line and the override; a relative one is refused
    there too. A good one is checked, not created; logfile=False leaves the check to
    the master (as reload's command line does)."""
    missing = tmp_path / "nonexistent" / "maillog"
    smtp = "smtp      unix  -       -       n       -       -       smtp"
    etc = write(tmp_path, "", GOOD_MASTER.replace(smtp, f"{smtp} -o maillog_file={missing}"))
    assert error_of(etc) == (
        f"{etc}/master.cf, line 3: -o maillog_file={missing}: cannot open maillog_file "
        f'"{missing}": No such file or directory (its directory {missing.parent} does '
        "not exist; it is not created)")
    load_configuration(etc, logfile=False)
    assert not missing.parent.exists()
    etc = write(tmp_path, "", GOOD_MASTER.replace(smtp, f"{smtp} -o maillog_file={tmp_path}"))
    assert error_of(etc) == (f"{etc}/master.cf, line 3: -o maillog_file={tmp_path}: cannot "
                             f'open maillog_file "{tmp_path}": Is a directory')
    etc = write(tmp_path, "", GOOD_MASTER.replace(smtp, f"{smtp} -o maillog_file=smtp.log"))
    assert error_of(etc) == (f"{etc}/master.cf, line 3: -o maillog_file=smtp.log: bad "
                             'maillog_file parameter value "smtp.log": not an absolute path')
    good = tmp_path / "smtp.log"
    etc = write(tmp_path, "", GOOD_MASTER.replace(smtp, f"{smtp} -o maillog_file={good}"))
    load_configuration(etc)
    assert not good.exists()


def test_maillog_file_per_service_from_main_cf_must_open(tmp_path: Path) -> None:
    """main.cf's maillog_file expanded with $service_name gives each service its own
    file: one that cannot be opened is refused naming the service's master.cf line."""
    (tmp_path / "smtp").mkdir()
    (tmp_path / "qmgr").mkdir()
    etc = write(tmp_path, f"maillog_file = {tmp_path}/${{service_name}}/maillog\n")
    missing = tmp_path / "pickup" / "maillog"
    assert error_of(etc) == (
        f'{etc}/master.cf, line 1: cannot open maillog_file "{missing}": No such file '
        f"or directory (its directory {missing.parent} does not exist; it is not "
        "created)")
    (tmp_path / "pickup").mkdir()
    load_configuration(etc)


@pytest.mark.parametrize("line,what", [
    ("smtpd_forbid_bare_newline = rejcet",
     ("bad parameter value: 'smtpd_forbid_bare_newline = rejcet' (one of: normalize, yes, "
      "reject, no)")),
    ("smtpd_forbid_bare_newline_reject_code = 450",
     'invalid smtpd_forbid_bare_newline_reject_code parameter value "450": minimum is 500'),
    ("smtpd_forbid_bare_newline_exclusions = 10.0.0.1/8",
     "parameter smtpd_forbid_bare_newline_exclusions: "),
])
def test_bad_bare_newline_values_stop_start_and_reload(tmp_path: Path, line: str, what: str) -> None:
    """smtpd_forbid_bare_newline (Postfix >= 3.9: normalize, yes, reject, no), its reject
    code (500-599) and its exclusions (mynetworks syntax): qmgr-master start and
    reload's check refuse a bad value, naming main.cf's line - Postfix's smtpd exits
    fatal at its first client (a typo in a hardening setting is never ignored)."""
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\nmyhostname = "
                                      f"h.example\n{line}\n")
    (tmp_path / "master.cf").write_text(
        "127.0.0.1:2525 inet n - n - - smtpd\n")
    with pytest.raises(ConfigError) as got:
        load_configuration(str(tmp_path))
    assert str(got.value).startswith(f"{tmp_path / 'main.cf'}, line 3: {what}")


def test_a_bad_bare_newline_override_names_master_cf_line(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n"
                                      "myhostname = h.example\n")
    (tmp_path / "master.cf").write_text(
        "127.0.0.1:2525 inet n - n - - smtpd\n  -o smtpd_forbid_bare_newline=strict\n")
    with pytest.raises(ConfigError) as got:
        load_configuration(str(tmp_path))
    assert str(got.value) == (
        f"{tmp_path / 'master.cf'}, line 1: -o smtpd_forbid_bare_newline=strict: bad "
        "parameter value: 'smtpd_forbid_bare_newline = strict' (one of: normalize, yes, "
        "reject, no)")


@pytest.mark.parametrize("value", ["normalize", "YES", "Reject", "no"])
def test_bare_newline_values_load_in_any_case(tmp_path: Path, value: str) -> None:
    etc = write(tmp_path, f"myhostname = h.example\nsmtpd_forbid_bare_newline = {value}\n"
                          "smtpd_forbid_bare_newline_reject_code = 521\n")
    cfg, _ = load_configuration(etc)
    assert cfg.get("smtpd_forbid_bare_newline") == value


LOCAL_MASTER = GOOD_MASTER + "local     unix  -       n       n       -       -       local\n"


@pytest.mark.parametrize("main,where", [
    ("mailbox_size_limit = 1000000\n", "main.cf, line 2"),
    ("message_size_limit = 60000000\n", "main.cf, line 2"),
    ("message_size_limit = 0\n", "main.cf, line 2"),
    ("message_size_limit = 0\nmailbox_size_limit = 20000000\n", "main.cf, line 3"),
])
def test_mailbox_size_limit_smaller_than_message_size_limit(tmp_path: Path, main: str,
                                                            where: str) -> None:
    """Postfix's local(8) exits fatal, "main.cf configuration error:
    mailbox_size_limit is smaller than message_size_limit" (also with an unlimited
    message_size_limit): mail the queue takes could never be delivered locally. A
    configuration with a local service is refused, naming the line to fix."""
    err = error_of(write(tmp_path, main, LOCAL_MASTER))
    assert where in err
    assert err.endswith("mailbox_size_limit is smaller than message_size_limit")


def test_mailbox_size_limit_override_names_the_master_cf_line(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "", GOOD_MASTER + "local unix - n n - - local\n"
                                      "  -o mailbox_size_limit=1000\n"))
    assert "master.cf, line 4" in err
    assert err.endswith("mailbox_size_limit is smaller than message_size_limit")


@pytest.mark.parametrize("main,master", [
    ("mailbox_size_limit = 0\nmessage_size_limit = 0\n", LOCAL_MASTER),
    ("mailbox_size_limit = 10240000\n", LOCAL_MASTER),
    ("mailbox_size_limit = 1000\n", GOOD_MASTER),  # no local service: nothing to refuse
])
def test_mailbox_size_limit_that_fits_loads(tmp_path: Path, main: str, master: str) -> None:
    load_configuration(write(tmp_path, main, master))


@pytest.mark.parametrize("line,what", [
    ("deliver_lock_attempts = x", 'bad numerical value for parameter deliver_lock_attempts: "x"'),
    ("deliver_lock_attempts = 0", 'invalid deliver_lock_attempts parameter value "0": minimum is 1'),
    ("deliver_lock_delay = 1fortnight", "bad time value for parameter deliver_lock_delay"),
    ("stale_lock_time = 5q", 'bad time value for parameter stale_lock_time: "5q"'),
    ("mailbox_delivery_lock = foo", 'unknown mailbox_delivery_lock value "foo" in "foo"'),
    ("mailbox_delivery_lock = fcntl, dotlok",
     'unknown mailbox_delivery_lock value "dotlok" in "fcntl, dotlok"'),
])
def test_bad_local_lock_parameters_are_errors(tmp_path: Path, line: str, what: str) -> None:
    """The local agent's locking parameters are checked at start and reload (before:
    deliver_lock_attempts, deliver_lock_delay and stale_lock_time were in no table and
    passed unchecked, the local agent then died at every start, throttled; an unknown
    mailbox_delivery_lock name was ignored, so that ``foo`` delivered to an mbox under
    no lock at all). Postfix's local(8) exits fatal on each (name_mask: ``unknown
    mailbox_delivery_lock value "foo" in "foo"``)."""
    err = error_of(write(tmp_path, line + "\n"))
    assert err.startswith(f"{tmp_path}/main.cf, line 2: ") and what in err


def test_local_lock_parameters_load(tmp_path: Path) -> None:
    cfg, _ = load_configuration(write(tmp_path, "mailbox_delivery_lock = FLOCK, dotlock\n"
                                                "deliver_lock_delay = 2\n"))
    assert cfg.get_time("deliver_lock_delay") == 2
    assert cfg.get_int("deliver_lock_attempts") == 20
    assert cfg.get_time("stale_lock_time") == 500
