"""pickup — pickup(8): feed maildrop/ files (written by qmgr-sendmail) through cleanup.

Summary
    A trigger server on ``public/pickup`` (woken by qmgr-sendmail after each submission
    and by the master's wakeup timer, 60 s in the default master.cf). Each wakeup scans
    maildrop/ until a pass finds nothing more to do, like Postfix's pickup_service:

    * files that are not ready (mode without owner x: still being written) are skipped;
      so are names that are not queue ids (``warning: bad file name: maildrop/<name>``)
      and entries that are not regular files - a symbolic link, FIFO or directory
      (``warning: <path>: uid <uid>: not a regular file``); a file with more than one
      link is taken with ``warning: <path>: uid <uid>: file has <n> links``, as
      Postfix's mail_open_ok() says these (each once while it stays, where Postfix warns
      at every scan: qmgrd's maildrop is world-writable; sendmail's short-lived
      ``<usec>.<pid>`` temporary names are passed over in silence). maildrop/ is read
      flat, as Postfix's pickup does (it is never hashed);
    * each ready file is read strictly (qmgrd.spool.maildrop.read_maildrop): any
      record-level error, wrong type for its segment, unknown attribute, missing sender
      or E -> the file is moved to corrupt/ (removed if that fails) with
      ``warning: <name>: uid=<uid>: <reason>: set aside``; an I/O error while reading
      -> ``warning: <path>: read error: <strerror>``, the file stays for the next scan;
    * otherwise the message goes through Cleanup.submit (origin "local", so cleanup adds
      ``Received: by <myhostname> (<mail_name>, from userid <uid>)``; the arrival time
      and Received date are the file's mtime; -t from the ``extract_recipients``
      attribute), the maildrop file is unlinked, and ``<qid>: uid=<uid> from=<sender>``
      is logged. Before each message, inbound flow control (qmgrd.flow): one token is
      taken from the master's flow pipe, waiting up to ``in_flow_delay`` (0: off) when
      the qmgr has fallen behind, then the message goes on anyway;
    * a CleanupError 4.x.x keeps the file for the next wakeup (``warning: <name>: error
      writing queue file: <status> <text>``). A permanent refusal (5.x.x: no recipients,
      bad envelope data), and content over message_size_limit (5.3.4), do not lose the
      mail: like Postfix's pickup + cleanup_bounce, the message is queued with every
      recipient (``unknown`` when none) bounced (Cleanup.bounce), so the qmgr returns
      it to the sender, and cleanup logs ``<qid>: to=<rcpt>, relay=none, ...,
      status=bounced (<text>)``. Only if that too is refused permanently is the file
      set aside in corrupt/ with the warning above.

    A stop (SIGTERM from ``qmgr-master stop``) ends a scan after the file in hand, as
    Postfix's pickup stops at once: the rest stays in maildrop/ for the next start
    (a backlog of thousands would otherwise hold the stop up until the master kills
    pickup, each file waiting for a flow-control token from a qmgr already gone).

Public API
    pickup_scan(cfg, spool, cleanup, stopping=None) -> int   files handed to cleanup
                                                  this call; ``stopping()`` True ends it
    pickup_file(cfg, spool, cleanup, name) -> bool   one maildrop file; True if removed
    main() -> NoReturn                             ``python -m transports.pickup``
"""

from __future__ import annotations

import os
import stat
import time
from typing import TYPE_CHECKING, NoReturn

from master import log
from master.server.skeleton import ServerContext, trigger_server
from qmgrd.flow import flow_get
from qmgrd.spool.cleanup import Cleanup, CleanupError, truncate_headers
from qmgrd.spool.envelope import Envelope
from qmgrd.spool.maildrop import MaildropError, MaildropMessage, read_maildrop
from qmgrd.spool.queue import Spool
from qmgrd.spool.queueid import valid_id
from qmgrd.spool.statuslog import quote_822_local

if TYPE_CHECKING:
    from collections.abc import Callable

    from master.config import Config

__all__ = ["main", "pickup_file", "pickup_scan"]

_HOUR = 3600
_DAY = 86400
_MAX_PASSES = 100


def _set_aside(spool: Spool, name: str, uid: int, reason: str) -> None:
    log.warning(f"{name}: uid={uid}: {reason}: set aside")
    try:
        spool.move(name, "maildrop", "corrupt")
    except OSError as exc:
        log.warning(f"{name}: move to corrupt: {exc.strerror}")
        try:
            spool.remove("maildrop", name)
        except OSError as exc2:
            log.warning(f"remove maildrop/{name}: {exc2.strerror}")


def _enqueue(cleanup: Cleanup, env: Envelope, msg: MaildropMessage, uid: int,
             header_limit: int) -> str:
    """Cleanup.submit (each header cut to ``header_limit`` bytes, as smtpd does: Postfix's
    header_size_limit); a permanent refusal (or too_big) -> Cleanup.bounce.

    Raises:
        CleanupError: 4.x.x from either call, 5.x.x from bounce.
    """
    try:
        if msg.too_big:
            raise CleanupError("5.3.4", "message file too big")
        content, cut = truncate_headers(msg.content, header_limit)
        qid = cleanup.submit(env, content, extract_recipients=msg.extract_recipients,
                             origin="local", uid=uid)
        if cut:
            log.info(f"{qid}: {cut} header(s) longer than header_size_limit "
                     f"({header_limit}) truncated")
        return qid
    except CleanupError as exc:
        if exc.status.startswith("4"):
            raise
        refusal = exc
    return cleanup.bounce(env, msg.content, refusal.status, refusal.text,
                          extract_recipients=msg.extract_recipients, origin="local", uid=uid)


def pickup_file(cfg: Config, spool: Spool, cleanup: Cleanup, name: str) -> bool:
    """Process maildrop file ``name``; True when it was removed from maildrop/ (queued or
    set aside), False when it was skipped or kept for later.

    Raises nothing for bad input or I/O errors (logged as warnings with the system's
    error text).
    """
    path = spool.path("maildrop", name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning(f"open input file {path}: {exc.strerror}")
        return False
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not Spool.is_ready(st):
            return False
        uid = st.st_uid
        try:
            msg = read_maildrop(f, max_record=cfg.get_int("line_length_limit"),
                                size_limit=cfg.get_int("message_size_limit"))
        except MaildropError as exc:
            _set_aside(spool, name, uid, exc.reason)
            return True
        except OSError as exc:
            log.warning(f"{path}: read error: {exc.strerror}")
            return False
    now = time.time()
    mtime = st.st_mtime
    if mtime > now + 2 * _HOUR:
        log.warning(f"{name}: message dated {int(mtime - now)} seconds into the future")
        mtime = now
    elif mtime < now - _DAY:
        log.warning(f"{name}: message has been queued for {int((now - mtime) // _DAY)} days")
    arrival = msg.arrival if msg.arrival[0] > 0 else (int(mtime), int(mtime % 1 * 1e6))
    env = Envelope(msg.sender, msg.recipients, fullname=msg.fullname, arrival=arrival,
                   ret=msg.ret, envid=msg.envid)
    delay = cfg.get_time("in_flow_delay")
    if delay > 0:
        flow_get(delay)  # qmgrd.flow: slowed while the qmgr falls behind, never blocked
    try:
        qid = _enqueue(cleanup, env, msg, uid, cfg.get_size("header_size_limit"))
    except CleanupError as exc:
        if exc.status.startswith("4"):
            log.warning(f"{name}: error writing queue file: {exc.status} {exc.text}")
            return False
        _set_aside(spool, name, uid, f"{exc.status} {exc.text}")
        return True
    log.info(f"{qid}: uid={uid} from=<{quote_822_local(msg.sender)}>")
    try:
        spool.remove("maildrop", name)
    except OSError as exc:
        log.warning(f"remove {path}: {exc.strerror}")
        return False
    return True


def _temporary(name: str) -> bool:
    """``<usec>.<pid>``: Spool.create's name for a file it is about to link."""
    usec, dot, pid = name.partition(".")
    return bool(dot) and usec.isdigit() and pid.isdigit()


def maildrop_names(spool: Spool, warned: dict[str, int]) -> list[str]:
    """The ready files of maildrop/ (flat), as Postfix's mail_open_ok() lets pickup open
    them: a bad name or an entry that is not a regular file is warned about and left
    out; a file with more than one link is warned about and kept. Each such entry is
    warned about once for as long as it stays (``warned``: path -> inode, updated here;
    an entry removed and made again is warned about again), not at every scan: the
    maildrop of qmgrd is world-writable (mode 1733: qmgr-sendmail is not set-group-id as
    Postfix's postdrop is), so any local user could otherwise fill the log by leaving
    junk there and sending mail. Nothing when maildrop/ is missing; other OSErrors of
    reading the directory propagate."""
    names: list[str] = []
    seen: set[str] = set()
    try:
        it = os.scandir(spool.queue_path("maildrop"))
    except (FileNotFoundError, NotADirectoryError):
        return names
    with it:
        for entry in it:
            name = entry.name
            if not valid_id(name):
                if not _temporary(name) and _first_time(entry, warned, seen):
                    log.warning(f"bad file name: maildrop/{_printable(name)}")
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                if _first_time(entry, warned, seen):
                    log.warning(f"{entry.path}: uid {st.st_uid}: not a regular file")
                continue
            if not Spool.is_ready(st):
                continue
            if st.st_nlink > 1 and _first_time(entry, warned, seen):
                log.warning(f"{entry.path}: uid {st.st_uid}: file has {st.st_nlink} links")
            names.append(name)
    for path in [p for p in warned if p not in seen]:
        del warned[path]  # gone: warned about again if it comes back
    return names


def _first_time(entry: os.DirEntry[str], warned: dict[str, int], seen: set[str]) -> bool:
    """True when ``entry`` (this inode at this path) was not warned about before."""
    seen.add(entry.path)
    try:
        inode = entry.inode()
    except OSError:
        inode = -1
    if warned.get(entry.path) == inode:
        return False
    warned[entry.path] = inode
    return True


def _printable(name: str) -> str:
    """A maildrop entry's name for the log: any local user chooses it."""
    return name if name.isprintable() and len(name) <= 100 else ascii(name[:100])


# entries of maildrop/ already warned about, for the life of this pickup process
_WARNED: dict[str, int] = {}


def pickup_scan(cfg: Config, spool: Spool, cleanup: Cleanup,
                stopping: Callable[[], bool] | None = None,
                warned: dict[str, int] | None = None) -> int:
    """Scan maildrop/ until a pass removes nothing, or until ``stopping()`` is True
    (asked before each file); return how many files were removed. ``warned``: the
    entries already warned about (default: this process's, kept from scan to scan)."""
    total = 0
    if warned is None:
        warned = _WARNED
    for _ in range(_MAX_PASSES):
        count = 0
        for name in maildrop_names(spool, warned):
            if stopping is not None and stopping():
                return total + count
            if pickup_file(cfg, spool, cleanup, name):
                count += 1
        total += count
        if not count:
            break
    return total


class _Service:
    """Objects made once in pre-jail init."""

    spool: Spool | None = None
    cleanup: Cleanup | None = None


def _pre_jail(ctx: ServerContext) -> None:
    _Service.spool = Spool.from_config(ctx.config)
    _Service.cleanup = Cleanup(ctx.config, _Service.spool)


def _post_jail(ctx: ServerContext) -> None:
    """Chrooted (master.cf chroot ``y``, as in Debian's master.cf), the queue is at
    ``ctx.queue_directory`` ("/"): maildrop/, incoming/ and public/qmgr are opened
    inside the jail, as the qmgr opens them."""
    spool = _Service.spool
    if spool is not None and spool.at(ctx.queue_directory) is not spool:
        _Service.spool = spool.at(ctx.queue_directory)
        _Service.cleanup = Cleanup(ctx.config, _Service.spool)


def _handle(data: bytes, ctx: ServerContext) -> None:
    spool, cleanup = _Service.spool, _Service.cleanup
    if spool is None or cleanup is None:
        log.panic("pickup: service used before initialisation")
    pickup_scan(ctx.config, spool, cleanup, lambda: ctx.terminating)


def main() -> NoReturn:
    """Run pickup under the trigger-server skeleton."""
    trigger_server(_handle, pre_jail=_pre_jail, post_jail=_post_jail)


if __name__ == "__main__":
    main()
