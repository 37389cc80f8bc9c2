"""qmgr-sendmail — the sendmail(1) command line: submit a message into maildrop/.

Synopsis
    qmgr-sendmail [-c DIR] [-f sender] [-F full_name] [-t] [-i|-oi] [-N notify]
                  [-R full|hdrs] [-V envid] [recipient ...] < message
    qmgr-sendmail [-c DIR] -bp | -q | -qRsite | -I

Description
    Reads a message from standard input and writes it into ``$queue_directory/maildrop/``
    in Postfix's maildrop record format (qmgrd.spool.maildrop), the way sendmail +
    postdrop do (postfix.md §1.4): the file is created 0600, written, made ready with
    fchmod 0744, fsync'ed, and only then does the command exit 0. It then sends ``W`` to
    ``public/pickup`` (a failure to do so is a warning only: pickup also wakes up every
    60 seconds). Header processing is left to pickup + cleanup, so that this command
    starts fast: it imports no click, no DNS code, and no email package unless an
    argument needs RFC 5322 parsing or -t is given without command-line recipients.

    Addresses are stored in Postfix's internal form, as Postfix's sendmail stores them
    (tok822_parse + tok822_internalize): each recipient argument is an RFC 5322 address
    list (``'x@a, "b c"@d'`` is two recipients, ``<x@a>`` is ``x@a``, and the quotes of
    a quoted local part are removed: ``"b c"@d`` is stored as ``b c@d``); the ``-f``
    value is one address (``<x@a>`` is ``x@a``, ``<>`` the null sender). Arguments
    without any of ``"<>(),;:\\`` or whitespace are taken as they are (no parser).

    With -t and no recipient arguments, the header block is scanned for To/Cc/Bcc
    (Resent-To/Cc/Bcc when any is present, as cleanup does); when they hold no address
    the submission fails (Postfix: "No recipient addresses found in message header").
    Header recipients are not envelope records of the maildrop file (they stay content
    lines; cleanup extracts them at pickup), so line_length_limit does not limit them.

Start-up cost
    One run is one interpreter start, so the common case imports only os, sys, pwd,
    qmgrd.spool.queue/queueid/maildrop and qmgrd.trigger (not typing, re, dataclasses,
    socket or master.config: tests/test_sendmail_fast.py checks). Addresses without
    specials are checked in place (qmgrd.spool.envelope is imported only for -N, -R, -V
    or an address that needs RFC 5322 parsing). main.cf is read by a small reader that
    takes ``queue_directory``, ``line_length_limit`` and ``message_size_limit`` when
    they are literal values (no ``$``; an absolute path; decimal numbers not under the
    parameter table's minimum) and otherwise,
    or when any line is not plain ``name = value``, loads it through
    master.config.Config (same values, same errors: an empty or relative
    queue_directory is ``<main.cf>, line <n>: bad queue_directory parameter value
    ...``, exit 78).

Options
    -c DIR      configuration directory (default $QMGRD_CONFIG_DIR, else /etc/qmgrd)
    -C path     main.cf's path or its directory (Postfix's -C): as -c
    -f sender   envelope sender (also -fsender, and -r sender, its obsolete form);
                default: the login name, qualified later with $myorigin by cleanup;
                ``-f ''`` or ``-f '<>'`` is the null sender
    -B type     8BITMIME or 7BIT (anything else: exit 64, as Postfix); not stored,
                cleanup marks 8-bit content itself
    -F name     sender full name
    -t          extract recipients from To/Cc/Bcc (added to any given as arguments)
    -i, -oi     a line with a single "." does not end the input (otherwise it does)
    A first input line starting with "From " (an mbox separator) is skipped, as
    Postfix's sendmail does. A closed stdin, stdout or stderr is opened on /dev/null
    first, as Postfix's sendmail does (a closed stdin submits an empty message).
    -oX...      other -o options are ignored
    -N notify   DSN NOTIFY: never, or a comma list of success, delay, failure
    -R full|hdrs  DSN RET
    -V envid    DSN ENVID: 1-100 printable ASCII characters without space (RFC 3461)
    -bm, -v, -X log_file, -O option=value   accepted and ignored;  --  ends the options
    -bp         list the queue (mailq): runs ``qmgr-ctl list``, as Postfix runs postqueue -p
    -q          deliver all queued mail now: ``qmgr-ctl flush`` (postqueue -f);
                -qR<site>  ``qmgr-ctl flush --site <site>`` (postqueue -s); -qI<id>
                ``qmgr-ctl flush --id <id>`` (postqueue -i); -q<interval> (a digit
                first): nothing at all is done, exit 0 (Postfix's sendmail exits at
                once: the interval is queue_run_delay's business); any other -q<c> is
                not implemented, as in Postfix; with -bp, -q, -qR, -qI or -I no
                recipient may be given (Postfix: "display queue mode requires no
                recipient", "flush site ...", "flush queue_id ...")
    -I, -bi     newaliases: nothing to rebuild (alias_maps are read from
                their text files); a warning, exit 0
    -bs, -bv, -bd, -bh, -bH, -bl   not implemented: a fatal error saying so (exit 64)

Exit status (sysexits)
    0 queued; 64 EX_USAGE bad option, malformed address or envelope id, no recipients
    without -t, or -t with no recipient in the headers; 65 EX_DATAERR message
    over message_size_limit, a sender or recipient argument that is not valid UTF-8
    (``malformed UTF-8 in recipient address: <a/\\xff@b>``; nothing is queued), or an
    envelope record longer than line_length_limit, which pickup would set aside:
    ``sender address too long (5012 bytes; line_length_limit is 2048)``, likewise
    ``recipient address`` and ``full name`` (-F); the length is the record's
    payload in bytes (UTF-8); checked before the queue file is created, so nothing is
    queued, as Postfix's postdrop refuses a record over line_length_limit; 69
    EX_UNAVAILABLE the queue directory does not exist (``queue directory <path>: No
    such file or directory``, as Postfix's sendmail: fatal ``chdir <path>: ...``,
    EX_UNAVAILABLE); 73 EX_CANTCREAT the queue file cannot be created; 75 EX_TEMPFAIL
    write error; 78 EX_CONFIG bad configuration (e.g. ``invalid line_length_limit
    parameter value "100": minimum is 512``, Postfix's minimum). Errors print one line
    ``qmgr-sendmail: fatal: ...`` on standard error.

Public API
    main() -> NoReturn (console script), run(argv, stdin, stderr) -> int
"""

from __future__ import annotations

import os
import sys

from qmgrd import quickcf
from qmgrd.utf8 import malformed, shown

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import IO, NoReturn

__all__ = ["main", "run"]

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78
PROG = "qmgr-sendmail"
_WITH_ARG = "cfrBCFNRVXO"
# -b modes Postfix's sendmail has and qmgrd does not: what to use instead
_NO_MODE = {
    "s": "-bs (SMTP on standard input) is not implemented: use smtpd (master.cf)",
    "v": "-bv (address verification) is not implemented",
    "d": "-bd (daemon mode) is not implemented: run qmgr-master start",
    "h": "-bh (SMTP test mode) is not implemented",
    "H": "-bH (SMTP test mode) is not implemented",
    "l": "-bl is not implemented: run qmgr-master start",
}


class _Fatal(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class _Options:
    def __init__(self) -> None:
        self.config_dir = os.environ.get("QMGRD_CONFIG_DIR") or "/etc/qmgrd"
        self.sender: str | None = None
        self.fullname = ""
        self.extract = False
        self.dot_ends = True
        self.notify = 0
        self.ret = 0
        self.envid = ""
        self.recipients: list[str] = []
        self.config_given = False
        self.ctl: list[str] | None = None  # -bp / -q: the qmgr-ctl command run instead
        self.queue_interval = False  # -q<interval>: do nothing, exit 0


# qmgrd.spool.envelope: _ADDR_SPECIALS (needs_parsing) and _CONTROLS (_well_formed)
_SPECIALS = frozenset('"<>(),;:\\ \t\r\n\f\v')
_CONTROLS = frozenset([*map(chr, range(32)), "\x7f"])


def _plain_address(text: str) -> bool:
    """True when ``text`` is an address that qmgrd.spool.envelope takes as it is: no
    character that needs RFC 5322 parsing, no control character, and no empty local
    part or domain around its last ``@``."""
    if not text or not _SPECIALS.isdisjoint(text) or not _CONTROLS.isdisjoint(text):
        return False
    at = text.rfind("@")
    return at < 0 or 0 < at < len(text) - 1


def _dsn_option(o: _Options, opt: str, value: str) -> None:
    """-N, -R, -V (rare: imports qmgrd.spool.envelope). Raises ValueError, _Fatal."""
    from qmgrd.spool.envelope import parse_notify, parse_ret, valid_envid

    if opt == "N":
        o.notify = parse_notify(value)
    elif opt == "R":
        o.ret = parse_ret(value)
    elif valid_envid(value):
        o.envid = value
    else:
        raise _Fatal(EX_USAGE, "-V option requires an envelope ID of 1 to 100 "
                     "printable ASCII characters without spaces")


def _addresses(o: _Options) -> None:
    """Turn the -f value and recipient arguments into internal form (see the module
    description). Raises ValueError."""
    if o.sender is not None and not _plain_address(o.sender):
        from qmgrd.spool.envelope import parse_sender_arg

        o.sender = parse_sender_arg(o.sender)
    if not all(_plain_address(a) for a in o.recipients):
        from qmgrd.spool.envelope import parse_recipient_arg

        o.recipients = [a for arg in o.recipients for a in parse_recipient_arg(arg)]


def _parse(argv: list[str]) -> _Options:
    o = _Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            o.recipients.append(arg)
            continue
        opt, rest = arg[1], arg[2:]
        if opt in _WITH_ARG:
            if not rest:
                if i >= len(argv):
                    raise _Fatal(EX_USAGE, f"option requires an argument -- '{opt}'")
                rest = argv[i]
                i += 1
            try:
                if opt == "c":
                    o.config_dir = rest
                    o.config_given = True
                elif opt == "C":  # Postfix: main.cf's path or its directory
                    o.config_dir = (os.path.dirname(rest) or "."
                                    if os.path.basename(rest) == "main.cf" else rest)
                    o.config_given = True
                elif opt in "fr":  # -r: the obsolete form of -f
                    o.sender = rest
                elif opt == "B":  # the body type: cleanup finds 8-bit content itself
                    if rest not in ("8BITMIME", "7BIT"):
                        raise _Fatal(EX_USAGE, "-B option needs 8BITMIME or 7BIT")
                elif opt == "F":
                    o.fullname = rest
                elif opt in "XO":
                    pass  # -X log_file, -O option=value: ignored, as Postfix does
                else:
                    _dsn_option(o, opt, rest)
            except ValueError as exc:
                raise _Fatal(EX_USAGE, str(exc)) from None
        elif opt == "t" and not rest:
            o.extract = True
        elif opt == "i" and not rest:
            o.dot_ends = False
        elif opt == "o":
            if rest == "i":
                o.dot_ends = False
            elif not rest:
                raise _Fatal(EX_USAGE, "option requires an argument -- 'o'")
        elif (opt == "b" and rest == "m") or (opt == "v" and not rest.strip("v")):
            pass
        elif opt == "b" and rest == "p":
            o.ctl = ["list"]  # mailq
        elif opt == "q":
            if not rest:  # -q: deliver all queued mail now
                o.ctl = ["flush"]
            elif rest.startswith("R"):  # -qRsite (or -qR site): flush one site
                site = rest[1:]
                if not site:
                    if i >= len(argv):
                        raise _Fatal(EX_USAGE, "option requires an argument -- 'qR'")
                    site = argv[i]
                    i += 1
                o.ctl = ["flush", "--site", site]
            elif rest.startswith("I"):  # -qIqueueid: postqueue -i
                if not rest[1:]:
                    raise _Fatal(EX_USAGE, "specify: -qIqueueid")
                o.ctl = ["flush", "--id", rest[1:]]
            elif rest[0].isdigit():
                # -q<interval>: Postfix's sendmail exits 0 at once, whatever else was
                # asked (the interval is queue_run_delay's business)
                o.queue_interval = True
            else:
                raise _Fatal(EX_USAGE, f"-q{rest[0]} is not implemented")
        elif (opt == "b" and rest == "i") or (opt == "I" and not rest):
            o.ctl = []  # newaliases
        elif opt == "b" and rest in _NO_MODE:
            raise _Fatal(EX_USAGE, _NO_MODE[rest])
        else:
            raise _Fatal(EX_USAGE, f"unsupported option: {arg}")
    if o.queue_interval:
        return o
    if o.ctl is not None:
        if argv[i:] or o.recipients:
            mode = o.ctl[1] if o.ctl[1:] else o.ctl[0] if o.ctl else ""
            what = {"list": "display queue mode", "flush": "flush queue mode",
                    "--site": "flush site", "--id": "flush queue_id",
                    "": "alias initialization mode"}[mode]
            raise _Fatal(EX_USAGE, f"{what} requires no recipient")
        return o
    o.recipients.extend(argv[i:])
    for value in [o.sender or "", o.fullname, o.envid, *o.recipients]:
        if any(c in value for c in "\0\r\n"):
            raise _Fatal(EX_USAGE, "line break or NUL byte in a command-line argument")
    for what, values in (("sender", [o.sender or ""]), ("recipient", o.recipients)):
        for value in values:
            if malformed(value):
                raise _Fatal(EX_DATAERR, f"malformed UTF-8 in {what} address: "
                             f"<{shown(value)}>")
    try:
        _addresses(o)
    except ValueError as exc:
        raise _Fatal(EX_USAGE, str(exc)) from None
    if not o.recipients and not o.extract:
        raise _Fatal(EX_USAGE, "no recipients specified")
    return o


class _HeaderRecipients:
    """Collects the To/Cc/Bcc and Resent-To/Cc/Bcc values of the header block while the
    message streams by (same header-block rules as cleanup's scanner)."""

    _NAMES = (b"to", b"cc", b"bcc", b"resent-to", b"resent-cc", b"resent-bcc")

    def __init__(self) -> None:
        self.in_headers = True
        self._started = False
        self._block: list[bytes] | None = None
        self._resent = False
        self.values: list[str] = []
        self.resent_values: list[str] = []

    def feed(self, line: bytes) -> None:
        """One content line (without EOL); the first non-header line ends the scan."""
        if self._started and line[:1] in (b" ", b"\t"):
            if self._block is not None:
                self._block.append(line)
            return
        name, colon, value = line.partition(b":")
        name = name.rstrip(b" \t")
        self._flush()
        if not colon or not name or not all(0x21 <= b <= 0x7E for b in name):
            self.in_headers = False
            return
        self._started = True
        lname = name.lower()
        if lname in self._NAMES:
            self._block = [value]
            self._resent = lname.startswith(b"resent-")

    def _flush(self) -> None:
        if self._block is not None:
            text = b" ".join(self._block).decode("utf-8", "surrogateescape")
            (self.resent_values if self._resent else self.values).append(text)
            self._block = None

    def addresses(self) -> list[str]:
        """The addresses cleanup will extract (internal form)."""
        from qmgrd.spool.envelope import extract_addresses

        self._flush()
        return extract_addresses(self.resent_values or self.values)


def _login_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        raise _Fatal(EX_NOUSER, f"no login name found for user ID {os.getuid()}") from None


# The parameters read, with their master.config.params defaults and minimum values
# (tests/test_sendmail_fast.py checks them against the table).
_PARAMS = {"queue_directory": (quickcf.QUEUE_DIRECTORY_DEFAULT, 0),
           "line_length_limit": ("2048", 512),
           "message_size_limit": ("10240000", 0)}


def _quick_config(config_dir: str) -> tuple[str, int, int] | None:
    """(queue_directory, line_length_limit, message_size_limit) from main.cf when the
    file is plain and the three values are literal (qmgrd.quickcf: queue_directory an
    absolute path) and the two limits decimal numbers in range; None when
    master.config must decide (anything else, including every error, so that errors
    are reported by the one parser)."""
    got = quickcf.values(config_dir, {name: default for name, (default, _) in _PARAMS.items()})
    if got is None:
        return None
    for param, (_, minimum) in _PARAMS.items():
        value = got[param]
        if param != "queue_directory" and not (
                value.isascii() and value.isdigit() and int(value) >= minimum):
            return None
    return (got["queue_directory"], int(got["line_length_limit"]),
            int(got["message_size_limit"]))


def _config(config_dir: str) -> tuple[str, int, int]:
    """(queue_directory, line_length_limit, message_size_limit). Raises _Fatal EX_CONFIG."""
    quick = _quick_config(config_dir)
    if quick is not None:
        return quick
    from master.config import Config, ConfigError

    try:
        cfg = Config.load(config_dir)
        return (cfg.queue_directory(), cfg.get_int("line_length_limit"),
                cfg.get_int("message_size_limit"))
    except ConfigError as exc:
        raise _Fatal(EX_CONFIG, str(exc)) from None


def _submit(o: _Options, stdin: IO[bytes], stderr: IO[str]) -> None:
    from qmgrd.spool.maildrop import MaildropWriter, RecordTooLong, envelope_records
    from qmgrd.spool.queue import Spool
    from qmgrd.trigger import TRIGGER_REQ_WAKEUP, send_trigger

    queue_directory, line_limit, size_limit = _config(o.config_dir)
    sender = _login_name() if o.sender is None else o.sender
    try:  # before any file exists: a record over line_length_limit, pickup would set aside
        envelope = envelope_records(sender, o.recipients, fullname=o.fullname,
                                    notify=o.notify, ret=o.ret, envid=o.envid,
                                    extract_recipients=o.extract, max_record=line_limit)
    except RecordTooLong as exc:
        raise _Fatal(EX_DATAERR, str(exc)) from None
    spool = Spool(queue_directory)
    try:
        f, qid, path = spool.create("maildrop")
    except OSError as exc:
        _no_queue_directory(spool.queue_directory)
        raise _Fatal(EX_CANTCREAT, f"create file in {spool.queue_path('maildrop')}: "
                     f"{exc.strerror}") from None
    headers = _HeaderRecipients() if o.extract else None
    try:
        with f:
            f.write(envelope)
            w = MaildropWriter(f, line_limit)
            first = True
            for raw in stdin:
                # Postfix's sendmail (sendmail_fix_line_endings = always): every CR
                # right before the LF goes; other CRs, and those of a last line
                # without LF, are data
                line = raw[:-1].rstrip(b"\r") if raw.endswith(b"\n") else raw
                if first:
                    first = False
                    if line.startswith(b"From "):
                        continue  # an mbox "From " line, skipped as Postfix's sendmail does
                if o.dot_ends and line == b".":
                    break
                w.line(line)
                if size_limit and w.content_bytes > size_limit:
                    raise _Fatal(EX_DATAERR, "message file too big")
                if headers is not None and headers.in_headers:
                    headers.feed(line)
            if headers is not None:
                found = headers.addresses()
                if not found and not o.recipients:
                    raise _Fatal(EX_USAGE, "No recipient addresses found in message header")
                bad = [a for a in found if malformed(a)]
                if bad:  # as for the arguments: refused before anything is queued
                    raise _Fatal(EX_DATAERR, "malformed UTF-8 in recipient address: "
                                 f"<{shown(bad[0])}>")
            w.finish()
            f.flush()
            os.fchmod(f.fileno(), 0o744)
            os.fsync(f.fileno())
    except OSError as exc:
        _unlink(path)
        raise _Fatal(EX_TEMPFAIL, f"write queue file {path}: {exc.strerror}") from None
    except BaseException:
        _unlink(path)
        raise
    if not send_trigger(os.path.join(queue_directory, "public", "pickup"), TRIGGER_REQ_WAKEUP):
        stderr.write(f"{PROG}: warning: unable to wake up the pickup service ({qid} queued)\n")


def _no_queue_directory(queue_directory: str) -> None:
    """After a failed create in maildrop: raise _Fatal EX_UNAVAILABLE ``queue directory
    <path>: No such file or directory`` when the queue directory itself is missing (or
    not a directory) - Postfix's sendmail chdirs there first: fatal ``chdir <path>:
    ...``, EX_UNAVAILABLE. Asked only then, so that a submission costs no extra stat."""
    from master.daemon.queuedirs import directory_problem

    problem = directory_problem(queue_directory)
    if problem is not None:
        raise _Fatal(EX_UNAVAILABLE, f"queue directory {queue_directory}: {problem}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def run(argv: list[str], stdin: IO[bytes], stderr: IO[str]) -> int:
    """Parse ``argv`` (without the program name), submit ``stdin``; return the exit code.
    ``-bp`` and ``-q`` replace this process with qmgr-ctl (never return)."""
    try:
        o = _parse(argv)
        if o.queue_interval:
            pass
        elif o.ctl == []:
            stderr.write(f"{PROG}: warning: qmgrd reads alias_maps from their text "
                         "files: nothing to rebuild\n")
        elif o.ctl is not None:
            _exec_ctl(o)
        else:
            _submit(o, stdin, stderr)
    except _Fatal as exc:
        stderr.write(f"{PROG}: fatal: {exc.text}\n")
        return exc.code
    return EX_OK


def _exec_ctl(o: _Options) -> None:
    """``-bp`` / ``-q``: run ``qmgr-ctl [-c DIR] list|flush ...`` in this process's place,
    as Postfix's sendmail runs postqueue (its exit status is the command's)."""
    argv = [sys.executable, "-m", "qmgrd.ctl"]
    if o.config_given:
        argv += ["-c", o.config_dir]
    sys.stdout.flush()
    try:
        os.execv(sys.executable, argv + (o.ctl or []))
    except OSError as exc:
        raise _Fatal(EX_SOFTWARE, f"cannot run qmgr-ctl: {exc.strerror}") from None


def _open_stdio() -> None:
    """Open /dev/null on each of fds 0, 1 and 2 that is closed, as Postfix's sendmail does
    first thing (so a closed stdin is an empty message, and no file opened later - the
    queue file - gets fd 1 or 2 and takes output meant for stdout or stderr); Python
    left sys.stdin/stdout/stderr None for them."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, os.fdopen(fd, mode, closefd=False))


def main() -> NoReturn:
    """Console-script entry point (``qmgr-sendmail``)."""
    _open_stdio()
    sys.exit(run(sys.argv[1:], sys.stdin.buffer, sys.stderr))


if __name__ == "__main__":
    main()
