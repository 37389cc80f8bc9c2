"""master.config.params - the typed main.cf parameter table and value converters.

SYNOPSIS
    from master.config.params import PARAMS, Param
    PARAMS["queue_run_delay"]   # Param("queue_run_delay", "time", "300s", "s", 1, None)

DESCRIPTION
    PARAMS maps each known parameter name to a Param(name, type, default, unit, min, max):

    type     "str", "int", "bool", "time", "size" or "list".
    default  the unexpanded default text, as ``postconf -d`` prints it (Postfix 3.7,
             with compatibility_level = 3.6 behaviour; qmgrd-specific defaults for
             mail_name, syslog_name, enable_long_queue_ids).  It may contain ``$name``
             references, expanded by Config.get().
    unit     for "time": the unit a bare number is taken in ("s", "m", "h", "d", "w").
    min/max  inclusive range for int/time/size values (seconds for time), or None.
             Within it, a value must also fit the C type Postfix keeps it in
             (value_range): an int (INT_MIN..INT_MAX: "int" and "time" parameters -
             a time in seconds after its unit, as Postfix's conv_time - and the "size"
             parameters Postfix declares int, e.g. header_size_limit), or a long
             (LONG_MIN..LONG_MAX: ``long`` True, the sizes Postfix declares long:
             message_size_limit, mailbox_size_limit, queue_minfree).  Postfix refuses
             a value that does not fit (strtol's ERANGE or a long that is no int:
             fatal "bad numerical configuration").
    raw      True for parameters Postfix never expands at configuration time
             (forward_path, mailbox_command, luser_relay: expanded per delivery).
    long     True for the "size" parameters Postfix keeps in a long (see min/max).

    myhostname and mydomain have computed defaults (see hostname_default() and
    domain_default()), as Postfix's check_myhostname()/check_mydomain() do.

    Converters (raise ValueError with a short reason; Config turns it into ConfigError
    with file and line): parse_time(text, unit) -> int seconds (a number with an optional
    single unit letter s/m/h/d/w, as Postfix's conv_time), parse_int(text) -> int,
    parse_size(text) -> int bytes (a plain decimal number, as Postfix), parse_bool(text)
    -> bool (yes/no/true/false, any case), split_list(text) -> list[str] (comma and
    whitespace separated, ``{ ... }`` groups kept whole, as Postfix's mystrtokq).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

INT_MIN, INT_MAX = -(2 ** 31), 2 ** 31 - 1  # Postfix's int (LP64: 32 bits)
LONG_MIN, LONG_MAX = -(2 ** 63), 2 ** 63 - 1  # Postfix's long (LP64: 64 bits)
TIME_UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
TYPES = ("str", "int", "bool", "time", "size", "list")
EVENT_LOOPS = ("uvloop", "asyncio")  # the values of async_event_loop
# smtpd_forbid_bare_newline's values (any case) -> the mode smtpd applies (Postfix >= 3.9,
# 3.8.5: "yes" is a compatibility alias of "normalize", not of "reject")
BARE_NEWLINE_MODES: dict[str, str] = {"normalize": "normalize", "yes": "normalize",
                                      "reject": "reject", "no": "no"}


@dataclass(frozen=True)
class Param:
    """One main.cf parameter: name, type, default text, unit (time), min, max, raw, long."""

    name: str
    type: str
    default: str
    unit: str = ""
    min: int | None = None
    max: int | None = None
    raw: bool = False
    long: bool = False


PARAMS: dict[str, Param] = {}


def _add(name: str, type_: str, default: str, unit: str = "", min_: int | None = None,
         max_: int | None = None, raw: bool = False, long: bool = False) -> None:
    if type_ == "time" and not unit:
        unit = "s"
    PARAMS[name] = Param(name, type_, default, unit, min_, max_, raw, long)


def _s(name: str, default: str = "") -> None:
    _add(name, "str", default)


def _l(name: str, default: str = "") -> None:
    _add(name, "list", default)


def _i(name: str, default: str, min_: int | None = 0, max_: int | None = None) -> None:
    _add(name, "int", default, "", min_, max_)


def _b(name: str, default: str) -> None:
    _add(name, "bool", default)


def _t(name: str, default: str, min_: int | None = 0, max_: int | None = None,
       unit: str = "s") -> None:
    _add(name, "time", default, unit, min_, max_)


def _z(name: str, default: str, min_: int | None = 0, long: bool = False) -> None:
    _add(name, "size", default, "", min_, None, long=long)


# --- directories, identity -------------------------------------------------------------
_s("config_directory", "/etc/postfix")
_s("queue_directory", "/var/spool/postfix")
_s("data_directory", "/var/lib/postfix")
_s("daemon_directory", "/usr/lib/postfix/sbin")
_s("command_directory", "/usr/sbin")
_s("meta_directory", "$config_directory")
_s("mail_owner", "postfix")
_s("setgid_group", "postdrop")
_s("default_privs", "nobody")
_s("myhostname", "")          # computed: hostname_default()
_s("mydomain", "")            # computed: domain_default()
_s("myorigin", "$myhostname")
_l("mydestination", "$myhostname, localhost.$mydomain, localhost")
_l("inet_interfaces", "all")
_l("inet_protocols", "all")
_l("proxy_interfaces", "")
_l("mynetworks", "127.0.0.0/8 [::1]/128")
_s("mynetworks_style", "host")
_l("export_environment", "TZ MAIL_CONFIG LANG")
_s("mail_name", "qmgrd")
_s("mail_version", "3.7.11")
_s("syslog_name", "qmgrd")
_s("maillog_file", "")
_s("compatibility_level", "3.6")
_l("import_environment", "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ XAUTHORITY DISPLAY LANG=C "
   "POSTLOG_SERVICE POSTLOG_HOSTNAME")
_s("process_name", "")
_s("service_name", "")
_s("stress", "")
_s("multi_instance_name", "")
_b("helpful_warnings", "yes")
_b("soft_bounce", "no")

# --- routing (trivial-rewrite) ---------------------------------------------------------
_s("local_transport", "local:$myhostname")
_s("default_transport", "smtp")
_s("relay_transport", "relay")
_s("virtual_transport", "virtual")
_l("relay_domains", "")
_s("relayhost", "")
_l("transport_maps", "")
_l("relocated_maps", "")
_l("virtual_maps", "")
_l("virtual_alias_maps", "$virtual_maps")
_l("virtual_alias_domains", "$virtual_alias_maps")
_l("virtual_mailbox_maps", "")
_l("virtual_mailbox_domains", "$virtual_mailbox_maps")
_l("sender_dependent_relayhost_maps", "")
_l("sender_dependent_default_transport_maps", "")
_s("recipient_delimiter", "")
_s("empty_address_recipient", "MAILER-DAEMON")
_b("allow_percent_hack", "yes")
_b("swap_bangpath", "yes")
_b("resolve_dequoted_address", "yes")
_b("resolve_numeric_domain", "no")
_b("resolve_null_domain", "no")
_b("allow_min_user", "no")
_b("append_at_myorigin", "yes")
_b("append_dot_mydomain", "no")

# --- local delivery --------------------------------------------------------------------
_s("mail_spool_directory", "/var/mail")
_s("home_mailbox", "")
_l("alias_maps", "hash:/etc/aliases, nis:mail.aliases")
_l("local_recipient_maps", "proxy:unix:passwd.byname $alias_maps")
_l("mailbox_delivery_lock", "fcntl, dotlock")  # names: MAILBOX_LOCKS (Config.check)
_i("deliver_lock_attempts", "20", 1)  # Postfix: minimum 1 (mail_params.c)
_t("deliver_lock_delay", "1s", 0)  # Postfix: minimum 1s; 0 (no wait) kept for tests
_t("stale_lock_time", "500s", 1)
_z("mailbox_size_limit", "51200000", long=True)
_add("mailbox_command", "str", "", raw=True)
_add("forward_path", "list", "$home/.forward${recipient_delimiter}${extension}, $home/.forward",
     raw=True)
_add("luser_relay", "str", "", raw=True)
_s("mailbox_transport", "")
_s("fallback_transport", "")
_l("allow_mail_to_commands", "alias, forward")
_l("allow_mail_to_files", "alias, forward")
_b("biff", "yes")
_b("strict_mailbox_ownership", "yes")
_l("prepend_delivered_header", "command, file, forward")
_b("owner_request_special", "yes")
_b("expand_owner_alias", "no")
_s("local_command_shell", "")

# --- notices, bounces ------------------------------------------------------------------
_s("double_bounce_sender", "double-bounce")
_l("notify_classes", "resource, software")
_s("bounce_notice_recipient", "postmaster")
_s("2bounce_notice_recipient", "postmaster")
_s("delay_notice_recipient", "postmaster")
_s("error_notice_recipient", "postmaster")
_z("bounce_size_limit", "50000", 1)
_s("bounce_template_file", "")

# --- queue -----------------------------------------------------------------------------
_l("hash_queue_names", "deferred, defer")
# Postfix: minimum 1, no maximum. qmgrd: at most 10, what qmgrd.spool.queue.Spool accepts
# (MAX_HASH_DEPTH) and how deep its scan and structure repair descend; the id gives 5 hex
# digits, deeper levels are all "_".
_i("hash_queue_depth", "1", 1, 10)
_b("enable_long_queue_ids", "yes")
_z("queue_minfree", "0", long=True)
_i("hopcount_limit", "50", 1)
_z("header_size_limit", "102400", 1)
_z("line_length_limit", "2048", 512)  # Postfix: minimum 512 (mail_params.c)
_z("message_size_limit", "10240000", 0, long=True)
_b("always_add_missing_headers", "no")
_i("duplicate_filter_limit", "1000", 0)

# --- master and process limits ---------------------------------------------------------
_i("default_process_limit", "100", 1)
_t("service_throttle_time", "60s", 1)
_i("max_use", "100", 1)
_t("max_idle", "100s", 1)
_t("command_time_limit", "1000s", 1)  # pipe(8): <transport>_time_limit falls back to it
_t("daemon_timeout", "18000s", 1)
_t("ipc_timeout", "3600s", 1)
_t("ipc_idle", "5s", 1)
_t("ipc_ttl", "1000s", 1)
_t("in_flow_delay", "1s", 0, 10)
# qmgrd: the event loop of the asyncio services (qmgr, smtpd, smtp): "uvloop" (libuv's, in
# C; asyncio's own when uvloop is not installed) or "asyncio" (the standard library's)
_s("async_event_loop", "uvloop")

# --- qmgr (postfix.md 4.10) ------------------------------------------------------------
_t("queue_run_delay", "300s", 1)
_t("minimal_backoff_time", "300s", 1)
_t("maximal_backoff_time", "4000s", 1)
_t("maximal_queue_lifetime", "5d", 0, 8640000, "d")  # Postfix: at most 100 days
_t("bounce_queue_lifetime", "5d", 0, 8640000, "d")
_t("delay_warning_time", "0h", 0, None, "h")
_b("confirm_delay_cleared", "no")
_t("transport_retry_time", "60s", 1)
_i("qmgr_message_active_limit", "20000", 1)
_i("qmgr_message_recipient_limit", "20000", 1)
_i("qmgr_message_recipient_minimum", "10", 1)
_i("qmgr_fudge_factor", "100", 10, 100)
_t("qmgr_clog_warn_time", "300s", 0)
_t("qmgr_daemon_timeout", "1000s", 1)
_t("qmgr_ipc_timeout", "60s", 1)
_i("default_recipient_limit", "20000", 1)
_i("default_extra_recipient_limit", "1000", 1)
_i("default_recipient_refill_limit", "100", 1)
_t("default_recipient_refill_delay", "5s", 1)
_i("default_destination_recipient_limit", "50", 0)
_i("initial_destination_concurrency", "5", 1)
_i("default_destination_concurrency_limit", "20", 0)
_s("default_destination_concurrency_positive_feedback", "1")
_s("default_destination_concurrency_negative_feedback", "1")
_i("default_destination_concurrency_failed_cohort_limit", "1", 0)
_b("destination_concurrency_feedback_debug", "no")
_t("default_destination_rate_delay", "0s", 0)
_t("default_transport_rate_delay", "0s", 0)
_i("default_delivery_slot_cost", "5", 0)
_i("default_delivery_slot_discount", "50", 0, 100)
_i("default_delivery_slot_loan", "3", 0)
_i("default_minimum_delivery_slots", "3", 0)
_l("defer_transports", "")
_s("default_filter_nexthop", "")
_s("default_delivery_status_filter", "")
_i("address_verify_pending_request_limit", "5000", 1)
_i("local_destination_recipient_limit", "1", 0)
_i("local_destination_concurrency_limit", "2", 0)
for _tr in ("smtp", "relay", "lmtp", "virtual", "error", "retry"):
    _i(f"{_tr}_destination_concurrency_limit", "$default_destination_concurrency_limit", 0)
del _tr

# --- smtp client -----------------------------------------------------------------------
_t("smtp_connect_timeout", "30s", 0)
_t("smtp_helo_timeout", "300s", 1)
_t("smtp_mail_timeout", "300s", 1)
_t("smtp_rcpt_timeout", "300s", 1)
_t("smtp_data_init_timeout", "120s", 1)
_t("smtp_data_xfer_timeout", "180s", 1)
_t("smtp_data_done_timeout", "600s", 1)
_t("smtp_quit_timeout", "300s", 1)
_t("smtp_rset_timeout", "20s", 1)
_s("smtp_helo_name", "$myhostname")
_b("smtp_connection_cache_on_demand", "yes")
_t("smtp_connection_cache_time_limit", "2s", 1)
_i("smtp_connection_reuse_count_limit", "0", 0)
_t("smtp_connection_reuse_time_limit", "300s", 1)
_s("smtp_connection_cache_destinations", "")
_s("smtp_bind_address", "")
_s("smtp_bind_address6", "")
_s("smtp_host_lookup", "dns")
_b("disable_dns_lookups", "no")
_i("smtp_mx_address_limit", "5", 0)
_i("smtp_mx_session_limit", "2", 0)
_b("smtp_skip_5xx_greeting", "yes")
_s("smtp_tls_security_level", "")
_s("smtp_tls_CAfile", "")
_s("smtp_tls_CApath", "")
_s("smtp_tls_cert_file", "")
_s("smtp_tls_key_file", "$smtp_tls_cert_file")
_i("smtp_tls_loglevel", "0", 0)
_s("smtp_tls_protocols", ">=TLSv1")
_s("smtp_tls_mandatory_protocols", ">=TLSv1")
_t("smtp_starttls_timeout", "300s", 1)
_b("smtp_tls_connection_reuse", "no")
_i("smtp_line_length_limit", "998", 0)
_b("disable_mime_output_conversion", "no")
_i("mime_nesting_limit", "100", 0)
# qmgrd's own: deliveries one smtp process carries at once (1 = Postfix's one at a time);
# the qmgr still caps a transport's deliveries in flight at its master.cf maxproc
_i("smtp_process_delivery_limit", "50", 1, 1000)

# --- smtp server -----------------------------------------------------------------------
_s("smtpd_banner", "$myhostname ESMTP $mail_name")
_t("smtpd_timeout", "${stress?{10}:{300}}s", 1)
_i("smtpd_recipient_limit", "1000", 1)
_i("smtpd_soft_error_limit", "10", 1)
_i("smtpd_hard_error_limit", "${stress?{1}:{20}}", 1)
_i("smtpd_junk_command_limit", "${stress?{1}:{100}}", 1)
_t("smtpd_error_sleep_time", "1s", 0)
_i("smtpd_client_connection_count_limit", "50", 0)
_b("smtpd_helo_required", "no")
_l("smtpd_relay_restrictions",
   "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination")
_l("smtpd_recipient_restrictions", "")
_l("smtpd_client_restrictions", "")
_l("smtpd_helo_restrictions", "")
_l("smtpd_sender_restrictions", "")
_l("smtpd_data_restrictions", "")
_b("smtputf8_enable", "yes")
_i("smtpd_recipient_overshoot_limit", "1000", 1)
_l("smtpd_client_event_limit_exceptions", "$mynetworks")
_b("smtpd_peername_lookup", "yes")
_l("smtpd_discard_ehlo_keywords", "")
_l("smtpd_forbidden_commands", "CONNECT GET POST")
# SMTP smuggling defence (Postfix >= 3.9 defaults: normalize; transports.smtpd_session)
_s("smtpd_forbid_bare_newline", "normalize")
_l("smtpd_forbid_bare_newline_exclusions", "$mynetworks")
_i("smtpd_forbid_bare_newline_reject_code", "550", 500, 599)
_s("smtpd_tls_cert_file", "")
_s("smtpd_tls_key_file", "$smtpd_tls_cert_file")
_s("smtpd_tls_security_level", "")
_i("smtpd_process_session_limit", "20", 1, 1000)  # qmgrd: most sessions of one smtpd (bursts)
# qmgrd: sessions one smtpd takes at once, each in a thread of its own, before it tells
# the master it is busy (transports.smtpd); 1 = as Postfix, a process per client. 5 (the
# default): a session costs about 0.4 MiB instead of a process's 8 (issue 8, scenario M);
# each session still logs under a number of its own (master.log), as pflogsumm needs
_i("smtpd_process_busy_sessions", "5", 1, 1000)
_b("disable_vrfy_command", "no")
_b("allow_untrusted_routing", "no")
_i("relay_domains_reject_code", "554", 400, 599)
_i("non_fqdn_reject_code", "504", 400, 599)
_i("unknown_address_reject_code", "450", 400, 599)
_l("parent_domain_matches_subdomains",
   "debug_peer_list,fast_flush_domains,mynetworks,permit_mx_backup_networks,"
   "qmqpd_authorized_clients,relay_domains,smtpd_access_maps")


def hostname_default() -> str:
    """Computed default of myhostname: the host's fully-qualified name.

    As Postfix's check_myhostname(): gethostname(); if it has no dot, try
    socket.getfqdn(); if still no usable dotted name, append ".localdomain".
    """
    name = socket.gethostname() or "localhost"
    if "." in name:
        return name
    fqdn = socket.getfqdn(name)
    if "." in fqdn and not fqdn.startswith("localhost"):
        return fqdn
    return name + ".localdomain"


def domain_default(myhostname: str) -> str:
    """Computed default of mydomain: myhostname minus its first label, or "localdomain"
    when myhostname has no dot (as Postfix 3.7: "host.com" gives "com")."""
    _, dot, rest = myhostname.partition(".")
    return rest if dot and rest else "localdomain"


_TIME_RE = re.compile(r"\s*(\d+)\s*([smhdwSMHDW]?)\s*\Z")
_INT_RE = re.compile(r"\s*([-+]?\d+)\s*\Z")


def parse_time(text: str, unit: str = "s") -> int:
    """Postfix time value -> int seconds.  A bare number is taken in ``unit``.

    Raises ValueError("bad time value") for anything but digits plus one optional unit.
    """
    m = _TIME_RE.match(text)
    if m is None:
        raise ValueError("bad time value")
    letter = m.group(2).lower() or unit
    return int(m.group(1)) * TIME_UNITS[letter]


def value_range(kind: str, spec: Param | None) -> tuple[int, int]:
    """The inclusive range of an "int", "time" (seconds) or "size" value: the table's
    min/max (``spec``; None for a name not in the table) within the C type Postfix
    keeps the value in (module docstring: int, or long for a ``long`` size)."""
    lo, hi = (LONG_MIN, LONG_MAX) if kind == "size" and (spec is None or spec.long) \
        else (INT_MIN, INT_MAX)
    if spec is not None:
        lo = lo if spec.min is None else max(lo, spec.min)
        hi = hi if spec.max is None else min(hi, spec.max)
    return lo, hi


def parse_int(text: str) -> int:
    """Decimal integer -> int.  Raises ValueError("bad numerical value")."""
    m = _INT_RE.match(text)
    if m is None:
        raise ValueError("bad numerical value")
    return int(m.group(1))


def parse_size(text: str) -> int:
    """Size in bytes (plain decimal, as Postfix) -> int.  Raises ValueError."""
    m = _INT_RE.match(text)
    if m is None:
        raise ValueError("bad size value")
    return int(m.group(1))


def parse_bool(text: str) -> bool:
    """yes/no/true/false (case-insensitive) -> bool.  Raises ValueError."""
    low = text.strip().lower()
    if low in ("yes", "true"):
        return True
    if low in ("no", "false"):
        return False
    raise ValueError("bad boolean value")


def split_list(text: str) -> list[str]:
    """Split on commas and whitespace; ``{ ... }`` groups stay one element (braces kept)."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
        elif depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out
