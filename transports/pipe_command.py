"""pipe_command — run one external command with a message on its standard input
(Postfix's pipe_command(), the engine of pipe(8)).

Summary
    :func:`run_command` starts ``argv`` (no shell; the program is looked up in the
    command's PATH) in a session and process group of its own (setsid), with:

    * the user's rights: setgroups([gid]), setgid(gid), setuid(uid) in the child before
      exec, never root (when this process is not root, the command runs as this
      process's user: there is nothing to switch);
    * ``cwd`` as working directory - checked first with the user's rights, as Postfix
      changes directory after the switch: a directory the user cannot enter defers
      (``cannot change directory to "<dir>" for uid=<u> gid=<g>: <error>``, logged,
      then 4.3.0 ``temporary failure``);
    * the environment ``env`` only (transports.pipe builds it as Postfix does), the
      ``umask``, the default signal dispositions, no descriptor but 0, 1 and 2;
    * standard input the message (``data``), standard output and standard error one
      pipe, of which the first OUTPUT_LIMIT bytes are kept (the rest is read and
      dropped, so that a talkative command never blocks).

    Input and output are handled together in one selectors loop (no thread), bounded by
    ``time_limit`` seconds in all: when it is used up, the whole process group is
    killed (SIGKILL), as Postfix does, and the command's end is awaited.  A command
    that stops reading its input early is not an error (EPIPE), as in Postfix.

    The output is made printable as Postfix's: tabs and newlines become spaces, other
    control characters (and bytes that are not UTF-8) ``_``.

    The result maps the command's end exactly as Postfix 3.7's pipe_command() (checked
    against Debian's Postfix 3.7.11):

    ==========================================  =====  ==========================================
    end                                         dsn    reason
    ==========================================  =====  ==========================================
    exit 0                                      2.0.0  (the agent writes the text)
    time limit                                  5.3.0  Command time limit exceeded: "<argv0>"<out>
    killed by signal N                          4.3.0  Command died with signal N: "<argv0>"<out>
    exit != 0, output starts with x.y.z text    x.y.z  text (class 2: 5.0.0, as bounce_append)
    exit 64-78 (sysexits.h: SYS_EXITS)          table  <sysexits text><out>
    any other exit N                            5.3.0  Command died with status N: "<argv0>"<out>
    cannot start (fork, pipe, descriptors)      4.3.0  Delivery failed: <error>
    cannot exec the program                     4.3.0  temporary failure. Command output: pipe:
                                                       fatal: pipe_command: execvp <argv0>:
                                                       <error>
    ==========================================  =====  ==========================================

    where ``<out>`` is ``. Command output: <output>`` when there was output.  A class
    4 DSN defers, 5 bounces.  Nothing is ever lost: every way the command cannot be run
    defers.

Public API
    run_command(argv, data, *, uid, gid, cwd, env, umask, time_limit, clock=time.monotonic)
        -> CommandResult(dsn: str, reason: str, output: str, diag: str); .ok: bool
        argv: list[str]; data: bytes; uid/gid: int, or None to keep ours; cwd: str;
        env: dict[str, str]; umask: int; time_limit: seconds (float)
    SYS_EXITS: dict[int, tuple[str, str]]     exit code -> (dsn, text), Postfix sys_exits.c
    printable(raw: bytes) -> str
    OUTPUT_LIMIT = 4096                       bytes of output kept (Postfix VSTREAM_BUFSIZE)

Logs
    ``warning: pipe_command_read: read time limit exceeded`` (or ``_write``, or
    ``pipe_command_wait_or_kill: child wait time limit exceeded``), Postfix's texts;
    ``warning: fork: <error>``, ``warning: pipe_command: execvp <argv0>: <error>``,
    ``warning: cannot change directory to ...``;
    ``warning: bounce_append: ignoring dsn code "2.x.y"`` (a class 2 code in the
    output of a failed command).
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from master import log
from transports.privileges import privileges

__all__ = ["OUTPUT_LIMIT", "SYS_EXITS", "CommandResult", "printable", "run_command"]

OUTPUT_LIMIT = 4096
_CHUNK = 65536
_WAIT_STEP = 0.05

# Postfix src/global/sys_exits.c: <sysexits.h> code -> (dsn, text)
SYS_EXITS: dict[int, tuple[str, str]] = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}
EX_TEMPFAIL = 75
# Postfix dsn_valid() + dsn_split(): a leading x.y.z, then white space or the end
_LEAD_DSN = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|\Z)\s*", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: ``dsn`` (2.0.0 = delivered), ``reason`` (Postfix's text,
    empty when delivered), ``output`` (printable, as captured), ``diag`` (the
    ``x-unix`` diagnostic text of a failure, Postfix's dsb_unix(): the output, or a
    <sysexits.h> text when there was none)."""

    dsn: str
    reason: str
    output: str = ""
    diag: str = ""

    @property
    def ok(self) -> bool:
        """True when the command took the message (exit 0)."""
        return self.dsn.startswith("2")


def printable(raw: bytes) -> str:
    """Postfix's treatment of command output: tab and newline -> space, other control
    characters and bytes that are not UTF-8 -> ``_``."""
    text = raw.decode("utf-8", "replace").replace("\t", " ").replace("\n", " ")
    return _CONTROL.sub("_", text)


def _with_output(text: str, output: str) -> str:
    return f"{text}. Command output: {output}" if output else text


def _tempfail(output: str = "") -> CommandResult:
    """What Postfix reports when its child could not exec the command: the child's
    fatal exit, EX_TEMPFAIL, with the fatal message as output (none for chdir)."""
    text = SYS_EXITS[EX_TEMPFAIL][1]
    return CommandResult("4.3.0", _with_output(text, output), output, output or text)


def _exit_result(code: int, command: str, output: str) -> CommandResult:
    """The result of a non-zero exit (Postfix pipe_command: the output's DSN first,
    then <sysexits.h>, then "Command died with status")."""
    m = _LEAD_DSN.match(output)
    if m is not None:
        dsn = m.group(0).strip()
        text = output[m.end():]
        if dsn[0] == "2":  # bounce_append() refuses a success code
            log.warning(f'bounce_append: ignoring dsn code "{dsn}"')
            dsn = "5.0.0"
        return CommandResult(dsn, text, output, text)
    if code in SYS_EXITS:
        dsn, text = SYS_EXITS[code]
        return CommandResult(dsn, _with_output(text, output), output, output or text)
    return CommandResult("5.3.0", _with_output(
        f'Command died with status {code}: "{command}"', output), output,
        output or f"unknown mail system error {code}")


def _check_directory(cwd: str, uid: int | None, gid: int | None) -> str:
    """"" when the command's user may enter ``cwd``, else Postfix's message."""
    rights = (uid, gid) if uid is not None and gid is not None else None
    err = ""
    try:
        with privileges(rights):
            try:
                st = os.stat(cwd)
            except OSError as exc:
                err = exc.strerror or str(exc)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    err = os.strerror(errno.ENOTDIR)
                elif not os.access(cwd, os.X_OK, effective_ids=rights is not None):
                    err = os.strerror(errno.EACCES)
    except OSError as exc:  # the switch itself failed
        err = exc.strerror or str(exc)
    if not err:
        return ""
    ids = f"uid={os.geteuid() if uid is None else uid} gid={os.getegid() if gid is None else gid}"
    return f'cannot change directory to "{cwd}" for {ids}: {err}'


def _spawn(argv: list[str], *, uid: int | None, gid: int | None, cwd: str,
           env: dict[str, str], umask: int) -> subprocess.Popen[bytes]:
    """Start the command (module docstring).  Raises OSError, SubprocessError."""
    if uid is not None and gid is not None:
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=cwd, env=env, umask=umask, start_new_session=True, close_fds=True,
            restore_signals=True, user=uid, group=gid, extra_groups=[gid])
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        cwd=cwd, env=env, umask=umask, start_new_session=True, close_fds=True,
        restore_signals=True)


def run_command(argv: list[str], data: bytes, *, uid: int | None, gid: int | None,
                cwd: str, env: dict[str, str], umask: int, time_limit: float,
                clock: Callable[[], float] = time.monotonic) -> CommandResult:
    """Run ``argv`` with ``data`` on its standard input (module docstring).  Never
    raises for a command that cannot be run: the result defers."""
    command = argv[0]
    problem = _check_directory(cwd, uid, gid)
    if problem:
        log.warning(problem)
        return _tempfail()
    try:
        proc = _spawn(argv, uid=uid, gid=gid, cwd=cwd, env=env, umask=umask)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.filename == cwd and exc.filename != command:  # chdir: gone meanwhile
            log.warning(f'cannot change directory to "{cwd}": {why}')
            return _tempfail()
        if exc.errno in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE) \
                and exc.filename is None:
            log.warning(f"fork: {why}")
            return CommandResult("4.3.0", f"Delivery failed: {why}", "", SYS_EXITS[71][1])
        text = f"pipe: fatal: pipe_command: execvp {command}: {why} "
        log.warning(f"pipe_command: execvp {command}: {why}")
        return _tempfail(text)
    except subprocess.SubprocessError as exc:
        log.warning(f"fork: {exc}")
        return CommandResult("4.3.0", f"Delivery failed: {exc}", "", SYS_EXITS[71][1])
    deadline = clock() + time_limit
    raw, timed_out = _exchange(proc, data, deadline, clock)
    code = _wait(proc, deadline, clock, timed_out)
    output = printable(raw)
    diag = output or SYS_EXITS[70][1]
    if code is None:
        return CommandResult("5.3.0", _with_output(
            f'Command time limit exceeded: "{command}"', output), output, diag)
    if code < 0:
        return CommandResult("4.3.0", _with_output(
            f'Command died with signal {-code}: "{command}"', output), output, diag)
    if code > 0:
        return _exit_result(code, command, output)
    return CommandResult("2.0.0", "", output)


def _exchange(proc: subprocess.Popen[bytes], data: bytes, deadline: float,
              clock: Callable[[], float]) -> tuple[bytes, bool]:
    """Write ``data`` to the command and read its output until EOF; (the first
    OUTPUT_LIMIT bytes of output, True when the time limit ran out)."""
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    os.set_blocking(stdin.fileno(), False)
    os.set_blocking(stdout.fileno(), False)
    view = memoryview(data)
    kept = bytearray()
    sel = selectors.DefaultSelector()
    try:
        sel.register(stdout, selectors.EVENT_READ)
        if view:
            sel.register(stdin, selectors.EVENT_WRITE)
        else:
            stdin.close()
        while sel.get_map():
            left = deadline - clock()
            events = sel.select(left) if left > 0 else []
            if not events:
                log.warning("pipe_command_write: write time limit exceeded" if view
                            else "pipe_command_read: read time limit exceeded")
                return bytes(kept), True
            for key, _ in events:
                if key.fileobj is stdout:
                    chunk = _read(stdout.fileno())
                    if chunk is None:
                        continue
                    if not chunk:
                        sel.unregister(stdout)
                    elif len(kept) < OUTPUT_LIMIT:
                        kept += chunk[:OUTPUT_LIMIT - len(kept)]
                    continue
                try:
                    view = view[os.write(stdin.fileno(), view[:_CHUNK]):]
                except BlockingIOError:
                    continue
                except OSError:  # EPIPE: the command stopped reading; not an error
                    view = view[len(view):]
                if not view:
                    sel.unregister(stdin)
                    _close(stdin)
        return bytes(kept), False
    finally:
        sel.close()
        _close(stdin)
        _close(stdout)


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, _CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _close(stream: object) -> None:
    try:
        stream.close()  # type: ignore[attr-defined]
    except OSError:
        pass


def _wait_exit(pid: int, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for process ``pid`` to end, on a pidfd (Linux
    5.3 and later); where there is none, a short sleep instead (the caller polls)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        time.sleep(min(_WAIT_STEP, timeout))
        return
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            sel.select(timeout)
    finally:
        os.close(fd)


def _wait(proc: subprocess.Popen[bytes], deadline: float, clock: Callable[[], float],
          timed_out: bool) -> int | None:
    """The command's return code (Popen's: -N for signal N); None when the time limit
    ran out - the process group is then killed (SIGKILL) and the command reaped."""
    while not timed_out:
        code = proc.poll()
        if code is not None:
            return code
        left = deadline - clock()
        if left <= 0:
            log.warning("pipe_command_wait_or_kill: child wait time limit exceeded")
            break
        _wait_exit(proc.pid, left)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        try:
            proc.kill()
        except OSError:
            pass
    proc.wait()
    return None
