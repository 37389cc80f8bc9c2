"""mynetworks checked like Postfix does: a bad address, a prefix out of range or a network
with host bits set is refused by the full configuration check (start, reload, a -o
override) and by ``qmgr-ctl config NAME=VALUE``, naming main.cf and the line; the forms
smtpd's NetList matches stay allowed, and NetList uses the same parser
(master.config.netlist) and logs the real reason for an entry it ignores."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from master.config import ConfigError, load_configuration
from master.config.netlist import NetworkError, network_problem, parse_network
from qmgrd.ctl.cli import cli
from transports.smtpd_policy import NetList

MASTER = """\
pickup    fifo  n       -       n       60      1       pickup
qmgr      fifo  n       -       n       300     1       qmgr
smtp      unix  -       -       n       -       -       smtp
"""


def write(tmp_path: Path, main: str, master: str = MASTER) -> str:
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n"
                                      "myhostname = h.example\n" + main)
    (tmp_path / "master.cf").write_text(master)
    return str(tmp_path)


@pytest.mark.parametrize("value,what", [
    ("127.0.0.1/33", 'bad net/mask pattern "127.0.0.1/33"'),
    ("10.0.0.0/8 300.1.1.1", 'bad address in "300.1.1.1"'),
    ("192.168.1.1/24", ('non-null host address bits in "192.168.1.1/24", perhaps you '
                        'should use "192.168.1.0/24" instead')),
    ("[2001:db8::1]/32", 'perhaps you should use "[2001:db8::]/32" instead'),
    ("[::1]/129", 'bad net/mask pattern "[::1]/129"'),
    ("127.0.0.0/8, host.example", '"host.example": host names'),
    ("cidr:/etc/postfix/networks", 'unsupported lookup table type "cidr"'),
])
def test_bad_mynetworks_is_refused_with_file_and_line(tmp_path: Path, value: str,
                                                      what: str) -> None:
    etc = write(tmp_path, f"mynetworks = {value}\n")
    with pytest.raises(ConfigError) as ei:
        load_configuration(etc)
    message = str(ei.value)
    assert message.startswith(f"{tmp_path}/main.cf, line 3: parameter mynetworks: ")
    assert what in message


@pytest.mark.parametrize("value", [
    "127.0.0.0/8 [::1]/128", "192.0.2.7 !192.0.2.0/24 10.0.0.0/8", "::1 [2001:db8::]/32",
    "[::1]", "$myorigin_nets 127.0.0.1", "texthash:/nonexistent/clients 127.0.0.0/8", "",
])
def test_supported_forms_stay_allowed(tmp_path: Path, value: str) -> None:
    etc = write(tmp_path, f"myorigin_nets = 192.0.2.0/24\nmynetworks = {value}\n")
    cfg, _ = load_configuration(etc)
    assert cfg.get("mynetworks") is not None


def test_bad_expansion_named_where_set_and_exceptions_checked(tmp_path: Path) -> None:
    etc = write(tmp_path, "nets = 10.0.0.1/8\nmynetworks = $nets\n")
    with pytest.raises(ConfigError, match=r"line 4: parameter mynetworks: non-null host"):
        load_configuration(etc)
    etc = write(tmp_path, "smtpd_client_event_limit_exceptions = 1.2.3.4/40\n")
    with pytest.raises(ConfigError, match="line 3: parameter smtpd_client_event_limit_exc"):
        load_configuration(etc)


def test_bad_override_in_master_cf_is_refused(tmp_path: Path) -> None:
    etc = write(tmp_path, "", MASTER + "relay     unix  -       -       n       -       -"
                "       smtp\n  -o mynetworks=127.0.0.1/33\n")
    with pytest.raises(ConfigError, match=r"master.cf, line 4: .*127.0.0.1/33"):
        load_configuration(etc)


def test_ctl_config_refuses_bad_mynetworks(tmp_path: Path) -> None:
    etc = write(tmp_path, "mynetworks = 127.0.0.0/8\n")
    main = tmp_path / "main.cf"
    before = main.read_text()

    def run(*args: str) -> tuple[int, str]:
        res = CliRunner().invoke(cli, ["-c", etc, "config", *args])
        return res.exit_code, res.stderr

    for bad in ("1.2.3.4/99", "192.168.1.1/24", "10.0.0.0/8 300.1.1.1"):
        code, err = run(f"mynetworks={bad}")
        assert code == 78 and "not changed" in err and "mynetworks" in err, err
        assert main.read_text() == before
    assert run("mynetworks=127.0.0.0/8 [::1]/128 !192.0.2.1 192.0.2.0/24")[0] == 0
    assert "mynetworks = 127.0.0.0/8 [::1]/128 !192.0.2.1 192.0.2.0/24" in main.read_text()


def test_parser_units() -> None:
    assert str(parse_network("[::1]/128")) == "::1/128"
    assert str(parse_network("192.0.2.1")) == "192.0.2.1/32"
    with pytest.raises(NetworkError, match="perhaps you should use"):
        parse_network("192.168.1.1/24")
    assert network_problem("!texthash:/x") is None and network_problem("!10.0.0.0/8") is None
    assert network_problem("10.0.0.0/abc") is not None


def test_netlist_shares_the_parser_and_logs_the_real_reason(
        capsys: pytest.CaptureFixture[str]) -> None:
    nets = NetList(["127.0.0.1/33", "192.168.1.1/24", "10.0.0.0/8"], "mynetworks")
    text = capsys.readouterr().err
    assert 'bad net/mask pattern "127.0.0.1/33"' in text
    assert "perhaps you should use \"192.168.1.0/24\"" in text
    assert "host names are not supported" not in text
    assert nets.match("10.1.2.3") and not nets.match("192.168.1.5")


SMTPD = "smtp      inet  n       -       n       -       -       smtpd\n"
GUARD = ("in parameter smtpd_relay_restrictions or smtpd_recipient_restrictions, specify "
         "at least one working instance of: reject_unauth_destination, "
         "defer_unauth_destination, reject, defer or defer_if_permit")


def test_ctl_config_runs_reloads_whole_check(tmp_path: Path) -> None:
    """qmgr-ctl config NAME=VALUE refuses a main.cf that qmgr-master reload would refuse
    (every smtpd would die at start): exit 78, main.cf unchanged, reload's error text
    naming main.cf's line of the result; a fix passes."""
    etc = write(tmp_path, "mynetworks = 127.0.0.0/8\n", MASTER + SMTPD)
    main = tmp_path / "main.cf"
    before = main.read_text()
    res = CliRunner().invoke(cli, ["-c", etc, "config", "mynetworks=10.0.0.0/8",
                                   "smtpd_relay_restrictions=permit"])
    assert (res.exit_code, res.stderr) == (
        78, f"qmgr-ctl: fatal: not changed: {main}, line 4: {GUARD}\n")
    assert main.read_text() == before
    main.write_text(before.replace("127.0.0.0/8", "10.0.0.0/8")
                    + "smtpd_relay_restrictions = permit\n")  # what reload says of it
    with pytest.raises(ConfigError) as reload_error:
        load_configuration(etc, modules=False, logfile=False)
    main.write_text(before)
    res = CliRunner().invoke(cli, ["-c", etc, "config", "mynetworks=10.0.0.0/8",
                                   "smtpd_relay_restrictions=permit"])
    assert str(reload_error.value) in res.stderr
    res = CliRunner().invoke(cli, ["-c", etc, "config",
                                   ("smtpd_relay_restrictions=permit_mynetworks, "
                                    "reject_unauth_destination")])
    assert res.exit_code == 0, res.stderr
    assert main.read_text() != before


def test_ctl_config_checks_master_cf_overrides(tmp_path: Path) -> None:
    """A change that leaves an smtpd service's -o override without a guard is refused
    naming that service's master.cf line, as reload refuses it."""
    etc = write(tmp_path, "", MASTER + SMTPD.rstrip("\n")
                + "\n  -o smtpd_relay_restrictions=\n")
    main = tmp_path / "main.cf"
    before = main.read_text()
    res = CliRunner().invoke(cli, ["-c", etc, "config",
                                   "smtpd_recipient_restrictions=permit_mynetworks"])
    assert res.exit_code == 78
    assert res.stderr.startswith(f"qmgr-ctl: fatal: not changed: {tmp_path}/master.cf, "
                                 "line 4: "), res.stderr
    assert main.read_text() == before
