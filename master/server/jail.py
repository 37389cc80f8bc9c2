"""master.server.jail - mail_owner, chroot and privilege drop (Postfix's chroot_uid()).

Summary
    Privilege separation as Postfix's master(8) and its daemons do it (postfix.md §3.1,
    the ``unpriv`` and ``chroot`` columns of master.cf):

    * The account is ``mail_owner`` of main.cf.  Where the master runs as root it must
      exist and must not be privileged; otherwise nothing starts (Postfix's words)::

          /etc/qmgrd/main.cf, line 12: parameter mail_owner: unknown user name value: x
          /etc/qmgrd/main.cf, line 12: parameter mail_owner: user root has privileged user ID
          file /etc/qmgrd/main.cf: parameter mail_owner: unknown user name value: postfix

      (the line where main.cf sets it, as every main.cf error; Postfix's ``file
      <main.cf>:`` when the default ``postfix`` is the account that is missing)

    * Started by a normal user, the whole mail system runs as that user: no account is
      required, no chroot, no privilege drop (:func:`lookup_mail_owner` returns an Owner
      with ``privileged=False``; the master logs :func:`unprivileged_warning` once).

    * A child told ``--chroot`` chroots into queue_directory and then chdir("/"); a child
      told ``--unpriv`` then calls setgroups([]), setgid(mail_owner's gid) and
      setuid(mail_owner's uid), and verifies that root cannot be regained (setuid(0) must
      fail, every real/effective/saved id must be mail_owner's) - otherwise JailError.
      Order as chroot_uid(3): chroot as root first, then drop the privileges.

    After the jail nothing outside queue_directory exists, so everything a service needs
    must be imported or opened before it (design.md §4 rule 5).  :func:`prime_for_jail`
    loads what the standard library would otherwise load lazily on first use: the codecs
    a service is likely to use (idna with punycode and stringprep: mail to an IDN
    domain), the local time zone (log time stamps), and the OPTIONAL_MODULES that
    libraries try at run time (sniffio, by dnspython).  After the
    jail, :func:`watch_late_imports` reports every module imported from then on (the
    import is still attempted): the skeleton logs it as a warning naming the module, so
    a lazy import that fails - or works only by luck - is visible in the log.  An
    optional module that prime_for_jail found not installed is not reported (its import
    fails in or out of the jail).

Public API
    Owner(name, uid, gid, privileged)            frozen dataclass
    OwnerError                                   str = the Postfix-style message above
    JailError                                    the jail could not be entered
    lookup_mail_owner(cfg, euid=None) -> Owner   raises OwnerError (only when euid == 0)
    lookup_default_privs(cfg) -> Owner           default_privs (local delivery as root);
                                                 raises OwnerError
    unprivileged_warning(owner) -> str           the one-line warning (no "warning: ")
    prime_for_jail() -> None
    enter_jail(root, owner) -> None              raises JailError; root None = no chroot,
                                                 owner None = keep the current ids
    watch_late_imports(report) -> None           report(module name) once per module
                                                 imported from now on

Logs
    Nothing: callers (the master, the server skeleton) log and exit.
"""

from __future__ import annotations

import codecs
import errno
import importlib
import os
import pwd
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import types
    from importlib.machinery import ModuleSpec

from master.config import Config

__all__ = [
    "JailError",
    "Owner",
    "OwnerError",
    "enter_jail",
    "lookup_default_privs",
    "lookup_mail_owner",
    "prime_for_jail",
    "unprivileged_warning",
    "watch_late_imports",
]

PRIMED_CODECS = ("ascii", "latin-1", "utf-8", "utf-16", "idna", "punycode", "cp437",
                 "charmap")
IDN_SAMPLE = "b\u00fccher.example"  # encoded once: idna loads punycode, stringprep, unicodedata
#: modules that libraries we use try to import at run time and do without when they are
#: not installed (dnspython's asyncbackend tries sniffio at every lookup): imported by
#: prime_for_jail when installed; when not, their attempts after the jail are not reported
#: (the import fails in or out of the jail: nothing was missed)
OPTIONAL_MODULES = ("sniffio",)


class OwnerError(Exception):
    """mail_owner is unusable (str = the message, without "fatal: ")."""


class JailError(Exception):
    """chroot or the privilege drop failed, or root can still be regained."""


@dataclass(frozen=True)
class Owner:
    """The account the unprivileged processes run as.

    ``privileged`` is True when the mail system was started by root (privilege separation
    and chroot apply); False when it runs as the invoking user.
    """

    name: str
    uid: int
    gid: int
    privileged: bool


def lookup_mail_owner(cfg: Config, euid: int | None = None) -> Owner:
    """The mail_owner account of ``cfg`` when ``euid`` (default: ours) is 0, else the
    invoking user.

    Raises:
        OwnerError: started as root and mail_owner does not exist or has uid/gid 0.
    """
    if euid is None:
        euid = os.geteuid()
    if euid != 0:
        try:
            name = pwd.getpwuid(euid).pw_name
        except KeyError:
            name = str(euid)
        return Owner(name, euid, os.getegid(), False)
    return _unprivileged_account(cfg, "mail_owner")


def lookup_default_privs(cfg: Config) -> Owner:
    """The ``default_privs`` account of ``cfg`` (Postfix default ``nobody``): the rights
    the local delivery agent, running as root, delivers with when a mailbox name has no
    account of its own or names root.  Checked as Postfix's mail_params.c checks it.

    Raises:
        OwnerError: the account does not exist or has uid/gid 0 (``"<main.cf>, line
        <n>: parameter default_privs: unknown user name value: x"``, ``"... user root
        has privileged user ID"``, ``"... has privileged group ID"``).
    """
    return _unprivileged_account(cfg, "default_privs")


def _unprivileged_account(cfg: Config, param: str) -> Owner:
    """The account named by ``param``, which must exist and have neither uid nor gid 0."""
    name = cfg.get(param)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise _owner_error(cfg, f"unknown user name value: {name}", param) from None
    if entry.pw_uid == 0:
        raise _owner_error(cfg, f"user {name} has privileged user ID", param)
    if entry.pw_gid == 0:
        raise _owner_error(cfg, f"user {name} has privileged group ID", param)
    return Owner(name, entry.pw_uid, entry.pw_gid, True)


def _owner_error(cfg: Config, what: str, param: str = "mail_owner") -> OwnerError:
    """``<main.cf>, line <n>: parameter <param>: <what>`` where main.cf sets it (``-o
    <param>=x: ...`` for an override); Postfix's ``file <main.cf>: parameter <param>:
    <what>`` for the default, which no line sets."""
    located = cfg.error(param, f"parameter {param}: {what}")
    if located.line is None and not located.message.startswith("-o "):
        main_cf = os.path.join(cfg.config_directory, "main.cf")
        return OwnerError(f"file {main_cf}: parameter {param}: {what}")
    return OwnerError(str(located))


def unprivileged_warning(owner: Owner) -> str:
    """The master's one warning when it was not started by root."""
    return (f"not started as root: every process runs as user {owner.name} "
            f"(uid {owner.uid}), without privilege separation or chroot")


_PRIMED: list[str | None] = []  # the TZ primed for, once primed (a forked child inherits it)
_ABSENT: set[str] = set()  # OPTIONAL_MODULES found not installed by prime_for_jail


def prime_for_jail() -> None:
    """Load what the standard library loads lazily and cannot load inside a chroot.
    Done once per process and time zone: a child forked from a master that primed
    itself skips it (every object it would touch is a page it would copy)."""
    tz = os.environ.get("TZ")
    if _PRIMED == [tz]:
        return
    _PRIMED[:] = [tz]
    for name in PRIMED_CODECS:
        codecs.lookup(name)
    IDN_SAMPLE.encode("idna")  # an IDN domain (MX lookup, bounce to it) after the jail
    for name in OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            _ABSENT.add(name)
    time.tzset()
    time.localtime()


def enter_jail(root: str | None, owner: Owner | None) -> None:
    """chroot(root) + chdir("/") when ``root`` is given, then drop to ``owner``'s uid and
    gid when ``owner`` is given (module docstring).

    Raises:
        JailError: a system call failed, or root privileges can still be regained.
    """
    if root is not None:
        try:
            os.chroot(root)
            os.chdir("/")
        except OSError as exc:
            raise JailError(f"chroot {root}: {exc.strerror}") from None
    if owner is None:
        return
    try:
        os.setgroups([])
        os.setgid(owner.gid)
        os.setuid(owner.uid)
    except OSError as exc:
        raise JailError(f"drop privileges to {owner.name} (uid {owner.uid}): "
                        f"{exc.strerror}") from None
    _verify_dropped(owner)


def _verify_dropped(owner: Owner) -> None:
    """Raise JailError unless every id is the owner's and setuid(0) fails."""
    if (os.getresuid() != (owner.uid,) * 3 or os.getresgid() != (owner.gid,) * 3
            or os.getgroups() not in ([], [owner.gid])):
        raise JailError(f"privileges not dropped to {owner.name}: uids {os.getresuid()}, "
                        f"gids {os.getresgid()}, groups {os.getgroups()}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    except OSError as exc:
        if exc.errno == errno.EPERM:
            return
        raise JailError(f"setuid(0) check: {exc.strerror}") from None
    raise JailError("root privileges can be regained after setuid: refusing to run")


class _LateImports:
    """A meta path finder that only reports: first in sys.meta_path, finds nothing.
    (Not derived from importlib.abc.MetaPathFinder: that import costs ~6 ms per child.)"""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report
        self.seen: set[str] = set()

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self.seen and fullname not in _ABSENT:
            self.seen.add(fullname)
            self.report(fullname)
        return None


def watch_late_imports(report: Callable[[str], None]) -> None:
    """Call ``report(name)`` (once per name) for every module imported from now on."""
    sys.meta_path.insert(0, _LateImports(report))
