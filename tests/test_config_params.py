"""Tests for master.config.params: the table and the value converters."""

from __future__ import annotations

import pytest

from master.config.params import (
    PARAMS,
    TYPES,
    Param,
    domain_default,
    parse_bool,
    parse_size,
    parse_time,
    split_list,
)

EXPECTED = {
    "queue_directory": "/var/spool/postfix", "data_directory": "/var/lib/postfix",
    "mail_owner": "postfix", "myorigin": "$myhostname",
    "mydestination": "$myhostname, localhost.$mydomain, localhost", "inet_interfaces": "all",
    "mynetworks": "127.0.0.0/8 [::1]/128", "local_transport": "local:$myhostname",
    "default_transport": "smtp", "relay_transport": "relay", "relay_domains": "",
    "syslog_name": "qmgrd", "mail_name": "qmgrd", "mail_spool_directory": "/var/mail",
    "empty_address_recipient": "MAILER-DAEMON", "double_bounce_sender": "double-bounce",
    "notify_classes": "resource, software", "2bounce_notice_recipient": "postmaster",
    "hash_queue_names": "deferred, defer", "hash_queue_depth": "1",
    "enable_long_queue_ids": "yes", "default_process_limit": "100", "max_idle": "100s",
    "daemon_timeout": "18000s", "qmgr_ipc_timeout": "60s", "maximal_queue_lifetime": "5d",
    "delay_warning_time": "0h", "qmgr_message_active_limit": "20000",
    "default_destination_recipient_limit": "50", "local_destination_recipient_limit": "1",
    "local_destination_concurrency_limit": "2", "default_destination_concurrency_limit": "20",
    "smtp_destination_concurrency_limit": "$default_destination_concurrency_limit",
    "message_size_limit": "10240000", "smtp_connect_timeout": "30s",
    "smtpd_banner": "$myhostname ESMTP $mail_name", "compatibility_level": "3.6",
    "mailbox_delivery_lock": "fcntl, dotlock", "default_privs": "nobody",
    "smtpd_relay_restrictions":
        "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination",
}


@pytest.mark.parametrize("name,default", sorted(EXPECTED.items()))
def test_postfix_defaults(name: str, default: str) -> None:
    assert PARAMS[name].default == default


def test_table_is_consistent() -> None:
    for name, p in PARAMS.items():
        assert isinstance(p, Param) and p.name == name and p.type in TYPES
        if p.type == "time":
            assert p.unit in "smhdw" and p.unit
    assert PARAMS["delay_warning_time"].unit == "h"
    assert PARAMS["bounce_queue_lifetime"].unit == "d"


def test_converters() -> None:
    assert parse_time("7") == 7 and parse_time("7", "d") == 7 * 86400
    assert parse_time(" 2W ") == 2 * 604800
    for bad in ("", "s", "1.5s", "1x", "-1s", "1h30m"):
        with pytest.raises(ValueError):
            parse_time(bad)
    assert parse_size("123") == 123
    with pytest.raises(ValueError):
        parse_size("1k")
    assert parse_bool("True") and not parse_bool("NO")
    with pytest.raises(ValueError):
        parse_bool("1")
    assert split_list("a, b\tc,,d") == ["a", "b", "c", "d"]
    assert split_list("check { inet:x, timeout=1s }, y") == [
        "check", "{ inet:x, timeout=1s }", "y"]


def test_domain_default() -> None:
    assert domain_default("mail.example.com") == "example.com"
    assert domain_default("host.com") == "com"   # checked against postconf 3.7
    assert domain_default("localhost") == "localdomain"
