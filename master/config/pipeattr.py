"""master.config.pipeattr - the command attributes of a pipe(8) service in master.cf.

SYNOPSIS
    from master.config.pipeattr import parse_pipe_args, PipeAttrError
    attrs = parse_pipe_args(svc.args, mail_owner=(uid, gid, "qmgrd"))

DESCRIPTION
    A pipe service's master.cf line ends with Postfix pipe(8)'s command attributes::

        dovecot unix - n n - - pipe
          flags=DRXhu user=vmail:vmail argv=/usr/lib/dovecot/deliver -f ${sender} -d ${recipient}

    Attribute names are matched without regard to case, as Postfix's strncasecmp:

    flags=BDFORXhqu.>   message processing flags (FLAGS); any other letter is fatal
    user=name[:group]   required: the command's uid and gid (the group's, when given)
    argv=command...     required and last: everything after it is the command and its
                        arguments, as master.cf gives them ({ } groups words with spaces)
    directory=path      the command's working directory (default: the queue directory)
    eol=string          the record delimiter (default \\n): C escapes \\a \\b \\f \\n \\r
                        \\t \\v \\ddd (octal) and \\\\, as Postfix's unescape()
    null_sender=text    what an empty sender becomes in ${sender}, From_ and Return-Path
                        (default MAILER-DAEMON; may be empty)
    size=bytes          larger messages are bounced (5.2.3 message too large); 0 = none
    umask=octal         the command's umask (default 077, what Postfix's commands run
                        with; Postfix has no such attribute - a qmgrd addition)

    chroot= (Postfix 2.3) is not supported: refused with a message that says so.

    Macros in argv (MACROS): ``${name}``, ``$(name)`` and ``$name``; ``$$`` is a literal
    ``$``.  An argument with a recipient macro (RECIPIENT_MACROS) is repeated once per
    recipient by the agent (transports.pipe).  An unknown macro is not refused here: as
    in Postfix, the agent warns and defers the mail (4.3.5); :func:`unknown_macros` lets
    a start or reload report it as a warning first.

PUBLIC API
    PipeAttrs (frozen dataclass), PipeAttrError (a ValueError: Postfix's fatal text)
    parse_pipe_args(args, mail_owner=None) -> PipeAttrs
    parse_macros(arg) -> list[tuple[bool, str]]     (is_macro, literal text or macro name)
    unknown_macros(command) -> list[str]
    unescape(text) -> bytes
    FLAGS, MACROS, RECIPIENT_MACROS

ERRORS
    PipeAttrError with Postfix's fatal texts: ``unknown flag: Z (ignored)``, ``unknown
    attribute name: x=1``, ``missing user= command-line attribute``, ``missing argv=
    command-line attribute``, ``get_service_attr: unknown username: x``,
    ``get_service_attr: unknown group: x``, ``user= command-line attribute specifies
    root privileges``, ``... specifies privileged group id 0``, ``... specifies mail
    system owner qmgrd``, ``... specifies mail system owner qmgrd group id N``,
    ``get_service_attr: bad size= value: x``; and qmgrd's own ``bad umask= value: x``,
    ``argv= names no command``, ``chroot= is not supported by qmgrd's pipe``.  Callers
    name the service (master.config.validate, transports.pipe).  Nothing is logged.
"""

from __future__ import annotations

import grp
import pwd
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "FLAGS",
    "MACROS",
    "RECIPIENT_MACROS",
    "PipeAttrError",
    "PipeAttrs",
    "parse_macros",
    "parse_pipe_args",
    "unescape",
    "unknown_macros",
]

FLAGS = "BDFORXhqu.>"
RECIPIENT_MACROS = frozenset({"recipient", "original_recipient", "user", "extension",
                              "mailbox", "domain"})
MACROS = RECIPIENT_MACROS | frozenset({
    "sender", "nexthop", "size", "queue_id", "client_address", "client_hostname",
    "client_helo", "client_protocol", "client_port", "sasl_method", "sasl_username",
    "sasl_sender"})
MAIL_DAEMON = "MAILER-DAEMON"
_NAME = re.compile(r"[A-Za-z0-9_]+")
_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


class PipeAttrError(ValueError):
    """A bad pipe command attribute (str = Postfix's fatal message). ``no_account``:
    the user= account or group does not exist (yet) - the line itself is valid."""

    def __init__(self, message: str, no_account: bool = False) -> None:
        super().__init__(message)
        self.no_account = no_account


@dataclass(frozen=True)
class PipeAttrs:
    """The command attributes of one pipe service.

    command: the argument vector after ``argv=`` (macros not expanded); user: the name
    given; uid, gid: the command's ids; flags: the letters of ``flags=``; directory: the
    working directory ("" = the queue directory); eol: the record delimiter (bytes);
    null_sender: the empty sender's replacement; size_limit: bytes, 0 = none; umask.
    """

    command: tuple[str, ...]
    user: str
    uid: int
    gid: int
    flags: frozenset[str] = frozenset()
    directory: str = ""
    eol: bytes = b"\n"
    null_sender: str = MAIL_DAEMON
    size_limit: int = 0
    umask: int = 0o077


def unescape(text: str) -> bytes:
    """Postfix's unescape(): C escapes (\\a \\b \\f \\n \\r \\t \\v \\\\, \\ddd with up
    to three octal digits); any other escaped character stands for itself."""
    out = bytearray()
    data = text.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(data):
        c = data[i]
        i += 1
        if c != 0x5C or i >= len(data):
            out.append(c)
            continue
        nxt = chr(data[i])
        if nxt in "01234567":
            j = i
            while j < len(data) and j < i + 3 and chr(data[j]) in "01234567":
                j += 1
            out.append(int(data[i:j], 8) & 0xFF)
            i = j
            continue
        out.append(_ESCAPES.get(nxt, data[i]))
        i += 1
    return bytes(out)


def parse_macros(arg: str) -> list[tuple[bool, str]]:
    """Split one argument into literal text and macro names, as Postfix's mac_parse():
    ``${name}``, ``$(name)``, ``$name`` (letters, digits, underscore), ``$$`` = ``$``.
    An unclosed ``${`` or a ``$`` before anything else is literal text."""
    parts: list[tuple[bool, str]] = []
    text: list[str] = []
    i = 0
    while i < len(arg):
        c = arg[i]
        if c != "$" or i + 1 >= len(arg):
            text.append(c)
            i += 1
            continue
        nxt = arg[i + 1]
        if nxt == "$":
            text.append("$")
            i += 2
            continue
        name = ""
        if nxt in "{(":
            end = arg.find("}" if nxt == "{" else ")", i + 2)
            if end > 0:
                name, i = arg[i + 2:end], end + 1
        else:
            m = _NAME.match(arg, i + 1)
            if m is not None:
                name, i = m.group(), m.end()
        if not name:
            text.append(c)
            i += 1
            continue
        if text:
            parts.append((False, "".join(text)))
            text = []
        parts.append((True, name))
    if text:
        parts.append((False, "".join(text)))
    return parts


def unknown_macros(command: Sequence[str]) -> list[str]:
    """The macro names of ``command`` that pipe(8) does not know, in order of use."""
    seen: list[str] = []
    for arg in command:
        for is_macro, name in parse_macros(arg):
            if is_macro and name not in MACROS and name not in seen:
                seen.append(name)
    return seen


def _attr(arg: str, name: str) -> str | None:
    """The value of ``name=value`` (name matched without regard to case), else None."""
    if arg[:len(name) + 1].lower() == name + "=":
        return arg[len(name) + 1:]
    return None


def parse_pipe_args(args: Sequence[str], mail_owner: tuple[int, int, str] | None = None,
                    ) -> PipeAttrs:
    """Parse a pipe service's command attributes (module docstring), as Postfix's
    get_service_attr().  ``mail_owner`` (uid, gid, name): the mail system owner, whose
    ids user= must not name (None: not checked - the mail system does not run as root,
    so the command runs as the invoking user anyway).  uid 0 and gid 0 are always
    refused.

    Raises:
        PipeAttrError: Postfix's fatal message (module docstring).
    """
    flags: set[str] = set()
    user = group = ""
    uid = gid = -1
    command: tuple[str, ...] = ()
    found_argv = False
    directory, eol, null_sender, size_limit, umask = "", b"\n", MAIL_DAEMON, 0, 0o077
    for i, arg in enumerate(args):
        if (value := _attr(arg, "flags")) is not None:
            for letter in value:
                if letter not in FLAGS:
                    raise PipeAttrError(f"unknown flag: {letter} (ignored)")
                flags.add(letter)
        elif (value := _attr(arg, "user")) is not None:
            user, _, group = value.partition(":")
            try:
                account = pwd.getpwnam(user)
            except (KeyError, ValueError, UnicodeError):
                raise PipeAttrError(f"get_service_attr: unknown username: {user}",
                                    no_account=True) from None
            uid, gid = account.pw_uid, account.pw_gid
            if group:
                try:
                    gid = grp.getgrnam(group).gr_gid
                except (KeyError, ValueError, UnicodeError):
                    raise PipeAttrError(f"get_service_attr: unknown group: {group}",
                                        no_account=True) from None
        elif (value := _attr(arg, "directory")) is not None:
            directory = value
        elif (value := _attr(arg, "eol")) is not None:
            eol = unescape(value)
        elif (value := _attr(arg, "null_sender")) is not None:
            null_sender = value
        elif (value := _attr(arg, "size")) is not None:
            if not value.isdigit():
                raise PipeAttrError(f"get_service_attr: bad size= value: {value}")
            size_limit = int(value)
        elif (value := _attr(arg, "umask")) is not None:
            if not re.fullmatch(r"[0-7]{1,4}", value):
                raise PipeAttrError(f"bad umask= value: {value}")
            umask = int(value, 8)
        elif _attr(arg, "chroot") is not None:
            raise PipeAttrError("chroot= is not supported by qmgrd's pipe (Postfix 2.3 "
                                "and later have it): delete the attribute")
        elif (value := _attr(arg, "argv")) is not None:
            command = (value, *args[i + 1:])
            found_argv = True
            break
        else:
            raise PipeAttrError(f"unknown attribute name: {arg}")
    if not user:
        raise PipeAttrError("missing user= command-line attribute")
    if not found_argv:
        raise PipeAttrError("missing argv= command-line attribute")
    if not command[0]:
        raise PipeAttrError("argv= names no command")
    if uid == 0:
        raise PipeAttrError("user= command-line attribute specifies root privileges")
    if mail_owner is not None and uid == mail_owner[0]:
        raise PipeAttrError("user= command-line attribute specifies mail system owner "
                            f"{mail_owner[2]}")
    if gid == 0:
        raise PipeAttrError("user= command-line attribute specifies privileged group id 0")
    if mail_owner is not None and gid == mail_owner[1]:
        raise PipeAttrError("user= command-line attribute specifies mail system owner "
                            f"{mail_owner[2]} group id {gid}")
    return PipeAttrs(command=command, user=user, uid=uid, gid=gid, flags=frozenset(flags),
                     directory=directory, eol=eol, null_sender=null_sender,
                     size_limit=size_limit, umask=umask)
