"""log — Postfix-format log lines for every qmgrd process.

Summary
    One log per process, opened once (before any chroot) by :func:`setup`. Each line has
    Postfix's syslog shape so that tools made for Postfix's maillog (pflogsumm, grep
    habits) read ours::

        Nov 29 12:43:50 host.example qmgrd/qmgr[1234]: 4SVLCh0sf8z9HdB: removed

    With ``maillog_file`` set (Postfix >= 3.4's parameter) lines are appended to that file
    with one ``write(2)`` each on an ``O_APPEND`` descriptor, so lines from many processes
    never interleave. With ``maillog_file`` empty they go to syslog (facility LOG_MAIL).
    Before :func:`setup` (and in tools) lines go to standard error.

    The number in brackets is the process id, as Postfix's - except in a thread of its
    own (an smtpd process serving several clients, one thread each: transports.smtpd),
    where it is that thread's task id (gettid(2), which the kernel takes from the same
    numbers as process ids, so no live process or thread has it too). One session's
    lines then carry one number and no other session's, as with Postfix's
    process-per-client smtpd: pflogsumm's ``--smtpd-stats`` pairs ``connect from`` with
    ``disconnect from`` by that number, and grepping for ``smtpd[1234]`` follows one client.

Public API
    setup(service, maillog_file, syslog_name="qmgrd", myhostname="", foreground=False)
    info(msg), warning(msg), error(msg), fatal(msg) -> NoReturn (exit 1), panic(msg) -> NoReturn
    Panic: the exception raised by panic() after logging (an invariant of ours broke).
    printable(text) -> str: ASCII control characters as '?' (Postfix printable(); every
        logged line gets the same, a newline as a space instead)

Severity prefixes follow Postfix's msg(3): "warning: ", "error: ", "fatal: ", "panic: ".
"""

from __future__ import annotations

import os
import socket
import sys
import syslog
import threading
import time
from typing import NoReturn

__all__ = ["Panic", "close", "error", "fatal", "info", "panic", "printable", "setup", "warning"]


class Panic(Exception):
    """One of our own invariants is broken (design.md §4 rule 6)."""


class _State:
    fd: int = -1
    use_syslog: bool = False
    tag: str = ""
    host: str = ""
    stderr_too: bool = False
    ident_id: int = 0  # the task id in the syslog ident (0: none set yet)
    second: int = -1  # the second that ``stamp`` shows
    stamp: str = ""


_S = _State()

# Postfix msg_text(): printable(text, '?') censors control characters before a line is
# logged, so that no client, peer or message (a HELO name, an address, a Message-ID)
# can put a CR, NUL, ESC or BEL into the log and forge or hide lines on a terminal or in
# a log reader. A newline becomes a space as before (a message of ours may span lines).
_PRINTABLE = {c: "?" for c in [*range(32), 127]}
_CENSOR = {**_PRINTABLE, 10: " "}


def printable(text: str) -> str:
    """``text`` with every ASCII control character (LF too) as ``?``: Postfix's
    printable(text, '?'), for text that goes back to a peer (smtpd's replies)."""
    return text if text.isprintable() else text.translate(_PRINTABLE)


_syslog_lock = threading.Lock()  # openlog + syslog, when several threads log


def _forget_ident() -> None:
    _S.ident_id = 0


os.register_at_fork(after_in_child=_forget_ident)


def setup(
    service: str,
    maillog_file: str,
    syslog_name: str = "qmgrd",
    myhostname: str = "",
    foreground: bool = False,
) -> None:
    """Open the log for this process.

    Args:
        service: the master.cf service name (``qmgr``, ``smtp``...) or tool name.
        maillog_file: absolute path, or "" for syslog.
        syslog_name: the program prefix (Postfix's ``syslog_name``).
        myhostname: host name written in each line (default: the short host name).
        foreground: also copy lines to standard error.

    The file is created (mode 0644, less the umask) when missing, but not its
    directory: as with Postfix's postlogd, a log file in a directory that does not
    exist cannot be opened (the master refuses such a maillog_file at start and reload:
    master.config.validate.check_maillog).

    Raises:
        OSError: the log file cannot be opened (callers treat that as fatal); the log
            opened before, if any, is then kept as it was.
    """
    fd = -1
    if maillog_file:  # opened before the old log is closed: a failure leaves that one
        fd = os.open(maillog_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    close()
    _S.tag = f"{syslog_name}/{service}"
    _S.host = (myhostname or socket.gethostname()).split(".")[0]
    _S.stderr_too = foreground
    if maillog_file:
        _S.fd = fd
        _S.use_syslog = False
    else:
        _S.use_syslog = True
        _S.ident_id = 0  # openlog at the first line: the ident names the task id


def close() -> None:
    """Close the log descriptor (tests, re-setup)."""
    if _S.fd >= 0:
        try:
            os.close(_S.fd)
        except OSError:
            pass
        _S.fd = -1
    if _S.use_syslog:
        syslog.closelog()
        _S.use_syslog = False


def _emit(prio: int, text: str) -> None:
    if not text.isprintable():  # rare: only then the translate (issue 8: a hot path)
        text = text.translate(_CENSOR)
    if _S.use_syslog:
        tid = threading.get_native_id()
        with _syslog_lock:
            if tid != _S.ident_id:  # "tag[id]" ourselves: LOG_PID would give getpid()
                syslog.openlog(f"{_S.tag}[{tid}]", syslog.LOG_NDELAY, syslog.LOG_MAIL)
                _S.ident_id = tid
            syslog.syslog(prio, text)
    elif _S.fd >= 0:
        # The time stamp is made once a second: a qmgr writes three lines per message,
        # an smtp agent two (issue 8).
        second = int(time.time())
        if second != _S.second:
            _S.stamp = time.strftime("%b %d %H:%M:%S", time.localtime(second))
            _S.second = second
        # the task id: the process id, or in a thread of its own (smtpd's sessions)
        # that thread's id, so that one session's lines have one id (pflogsumm pairs
        # "connect from" and "disconnect from" by it)
        line = f"{_S.stamp} {_S.host} {_S.tag}[{threading.get_native_id()}]: {text}\n"
        data = line.encode("utf-8", "backslashreplace")
        try:
            os.write(_S.fd, data)
        except OSError:
            sys.stderr.write(line)
        if _S.stderr_too:
            sys.stderr.write(line)
    else:
        tag = _S.tag or os.path.basename(sys.argv[0] or "qmgrd")
        sys.stderr.write(f"{tag}: {text}\n")


def info(msg: str) -> None:
    """Log an informational line (no prefix)."""
    _emit(syslog.LOG_INFO, msg)


def warning(msg: str) -> None:
    """Log ``warning: msg`` — untrusted input contained, work goes on."""
    _emit(syslog.LOG_WARNING, "warning: " + msg)


def error(msg: str) -> None:
    """Log ``error: msg``."""
    _emit(syslog.LOG_ERR, "error: " + msg)


def fatal(msg: str) -> NoReturn:
    """Log ``fatal: msg`` and exit 1: the environment makes progress impossible."""
    _emit(syslog.LOG_CRIT, "fatal: " + msg)
    sys.exit(1)


def panic(msg: str) -> NoReturn:
    """Log ``panic: msg`` and raise :class:`Panic`."""
    _emit(syslog.LOG_CRIT, "panic: " + msg)
    raise Panic(msg)
