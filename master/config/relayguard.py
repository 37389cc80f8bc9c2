"""master.config.relayguard - is smtpd's configuration an open relay? (Postfix's check)

SYNOPSIS
    from master.config.relayguard import open_relay_problem
    problem = open_relay_problem(cfg)   # None, or Postfix's "in parameter ... specify ..."

DESCRIPTION
    Postfix's smtpd refuses to run (fatal, at start-up: smtpd_check_init) unless
    smtpd_relay_restrictions or smtpd_recipient_restrictions names at least one
    restriction that rejects mail by default - so that a mistake in the lists cannot make
    an open relay.  This module is the one definition of that check, shared by the SMTP
    server (transports.smtpd_policy.Policy: the process exits fatal) and the start/reload
    check (master.config.validate: ``qmgr-master start`` refuses, ``reload`` keeps the
    running configuration), so that what the check accepts is exactly what smtpd runs
    with.

    The working restrictions (RELAY_GUARDS) are reject_unauth_destination,
    defer_unauth_destination, reject, defer and defer_if_permit, compared without regard
    to case (smtpd's restriction lists are).  Anything else does not count:

    * ``check_*_access`` (a table's answer is not known in advance; Postfix does not
      count them either - and qmgrd's smtpd does not implement access maps);
    * a restriction class name (``smtpd_restriction_classes``): Postfix looks inside the
      class, but qmgrd's smtpd has no restriction classes - it answers 451 4.3.5 for
      the unknown name - so a guard inside one would guard nothing;
    * check_relay_domains, which Postfix's message still lists: qmgrd's smtpd does not
      know it (451 4.3.5 too), so the message here names only RELAY_GUARDS.

    As Postfix's has_required: a guard after ``permit`` in the same list does not count
    (``permit`` ends the list at run time: ``permit, reject_unauth_destination`` lets
    every relay attempt through), nor does one qualified by ``warn_if_reject`` (it only
    logs).

PUBLIC API
    RELAY_GUARDS: tuple[str, ...]   restrictions that count as working, lower case
    RELAY_PARAMS: tuple[str, ...]   ("smtpd_relay_restrictions",
                                    "smtpd_recipient_restrictions"), the lists looked at
    OPEN_RELAY_MESSAGE: str         the complaint (Postfix's wording, RELAY_GUARDS named)
    is_guarded(restrictions) -> bool    one list (any iterable of names) holds a guard
    open_relay_problem(cfg) -> str | None   OPEN_RELAY_MESSAGE when neither list of
                                    ``cfg`` holds a guard, else None; raises ConfigError
                                    (expansion)

Nothing is logged here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from master.config.maincf import Config

__all__ = ["OPEN_RELAY_MESSAGE", "RELAY_GUARDS", "RELAY_PARAMS", "is_guarded",
           "open_relay_problem"]

RELAY_GUARDS: tuple[str, ...] = ("reject_unauth_destination", "defer_unauth_destination",
                                 "reject", "defer", "defer_if_permit")
RELAY_PARAMS: tuple[str, ...] = ("smtpd_relay_restrictions", "smtpd_recipient_restrictions")
OPEN_RELAY_MESSAGE: str = (
    f"in parameter {RELAY_PARAMS[0]} or {RELAY_PARAMS[1]}, specify at least one working "
    f"instance of: {', '.join(RELAY_GUARDS[:-1])} or {RELAY_GUARDS[-1]}")


def is_guarded(restrictions: Iterable[str]) -> bool:
    """True when ``restrictions`` (the names of one restriction list, any case) holds one
    of RELAY_GUARDS before any ``permit`` and not right after ``warn_if_reject``
    (Postfix's has_required)."""
    warn_only = False
    for name in restrictions:
        lname = name.lower()
        if warn_only:
            warn_only = False
            continue
        if lname == "warn_if_reject":
            warn_only = True
        elif lname == "permit":
            return False
        elif lname in RELAY_GUARDS:
            return True
    return False


def open_relay_problem(cfg: Config) -> str | None:
    """OPEN_RELAY_MESSAGE when neither smtpd_relay_restrictions nor
    smtpd_recipient_restrictions of ``cfg`` (expanded, with its overrides) holds a working
    guard (module docstring), else None.

    Raises:
        ConfigError: a list cannot be expanded (an expansion loop, a bad ``${...}``).
    """
    if any(is_guarded(cfg.get_list(name)) for name in RELAY_PARAMS):
        return None
    return OPEN_RELAY_MESSAGE
