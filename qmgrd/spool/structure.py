"""structure — put queue files and logs where the hashing parameters want them
(Postfix's ``postsuper -s``, structure check and repair).

Summary
    After ``hash_queue_names`` or ``hash_queue_depth`` changes, the files already queued
    sit in the hash directories of the old setting. Spool.scan still finds them (it
    descends into any one-character subdirectory), but everything that opens a file
    by its id - the qmgr's feed, the bounce service, qmgr-ctl show, delete, hold -
    builds the path with Spool.path from the new setting, finds nothing there and
    passes over it: such mail would never be delivered, returned or reached. Postfix
    avoids this with ``postsuper -s``, which ``postfix start`` runs before the master
    starts and ``postfix reload`` in the background after signalling it. :func:`repair`
    does the part of it that concerns the hashing (the rest concerns Postfix's short
    ids, which qmgrd does not make):

    * It walks the per-message log queues first (defer, bounce, trace), then the message
      queues incoming, active, deferred, hold and corrupt, descending into
      one-character subdirectories only, up to MAX_HASH_DEPTH levels (Spool.scan's
      reach), and without following symbolic links.
    * Each regular file whose name is a valid queue id and whose path is not
      ``Spool.path(queue, id)`` is renamed there, the hash directories being made as
      needed (mode 0700). One rename(2) per file: atomic, nothing copied, so an
      interrupted run loses nothing and the next run finishes the work. The rename is
      renameat2(RENAME_NOREPLACE), so a file already at the destination is never
      replaced (on a file system without it: a check, then rename(2)); the file is
      then left where it is, with a warning.
    * Hash subdirectories deeper than the queue's hashing now wants are removed once
      they are empty, as postsuper does.
    * Left alone: names that are not queue ids (temporary files, anything an
      administrator put there), symbolic links and other non-regular files,
      subdirectories with longer names.

    Not walked: maildrop (any local user may write there, qmgr-sendmail never hashes it,
    and postsuper does not descend into it either) and the directories that hold no
    queue ids (flush, saved, public, private, pid). postsuper does not know corrupt/
    (Postfix's tools never open a file there by its id); qmgrd's ``qmgr-ctl show`` does,
    so corrupt/ is walked too. Postfix's default list also leaves out trace/, whose logs
    would then be lost for success notices; it is walked here.

    Safe on a running system whose processes use the same setting: every file is moved
    towards the place they look for it. A process still running with the old setting
    (before a reload took effect) may put a file back in an old place; the next run
    moves it.

Public API
    REPAIRED_QUEUES = ("defer", "bounce", "trace", "incoming", "active", "deferred",
                       "hold", "corrupt")     the order of the walk
    Report (dataclass): messages, logs (files moved), conflicts (left: the destination
        exists), errors (files that could not be moved: the rename failed),
        unreadable (directories that could not be read: their files were not even
        looked at), removed_dirs, problems (the text of every warning, in order);
        .summary() -> str
    repair(spool) -> Report

Logs (master.log; paths relative to queue_directory)
    Moved to the right queue subdirectory: <n> message[s], <m> log file[s]
                                                (info, once, when anything was moved)
    warning: rename file <from> as <to>: File exists (both kept; remove the one that is
        not wanted)
    warning: rename file <from> as <to>: <strerror>
    warning: open directory <dir>: <strerror>

Raises nothing: every problem is logged, counted and the walk goes on, as postsuper
goes on after a failed rename (``(void) postrename(...)``: a warning). What a problem
means is the caller's to judge (qmgr-ctl repair's exit status, qmgrd.ctl.change): a
failed rename leaves one file out of place, an unreadable directory leaves all of its
files unchecked (postsuper: fatal).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from master import log
from qmgrd.spool.queue import LOG_QUEUES, MAX_HASH_DEPTH, Spool
from qmgrd.spool.queueid import valid_id

__all__ = ["REPAIRED_QUEUES", "Report", "repair"]

#: logs before messages, as postsuper (its default list: defer, bounce, then messages)
REPAIRED_QUEUES = (*LOG_QUEUES, "incoming", "active", "deferred", "hold", "corrupt")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@dataclass
class Report:
    """What :func:`repair` did."""

    messages: int = 0
    logs: int = 0
    conflicts: int = 0
    errors: int = 0
    unreadable: int = 0
    removed_dirs: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """postsuper's style of report (``Renamed to match inode number: 3 messages``);
        "" when nothing was moved."""
        if not self.messages and not self.logs:
            return ""
        return (f"Moved to the right queue subdirectory: {_count(self.messages, 'message')}"
                f", {_count(self.logs, 'log file')}")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    """renameat2(2) of the C library (glibc >= 2.28), or None. Looked up when the module
    is loaded, so that qmgr-ctl does it before it takes the queue owner's ids."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                     ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_RENAMEAT2 = _renameat2()


def _rename_noreplace(src: str, dst: str) -> None:
    """rename(2) ``src`` to ``dst`` unless ``dst`` exists.

    Raises:
        FileExistsError: ``dst`` exists (nothing was changed).
        OSError: the rename failed (FileNotFoundError: ``src`` or the directory of
            ``dst`` does not exist).
    """
    func = _RENAMEAT2
    if func is not None:
        if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), src, None, dst)
        # the file system cannot do it (EINVAL) or the kernel is too old: check, rename
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), src, None, dst)
    os.rename(src, dst)


class _Walk:
    """One repair over one spool (the state of :func:`repair`)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.report = Report()
        self.top = spool.queue_directory.rstrip("/") + "/"

    def rel(self, path: str) -> str:
        """``path`` relative to the queue directory, as postsuper names files."""
        return path.removeprefix(self.top)

    def problem(self, text: str, kind: str = "errors") -> None:
        """Log ``text`` as a warning and count it in the Report field ``kind``
        (conflicts, errors or unreadable)."""
        log.warning(text)
        self.report.problems.append(text)
        setattr(self.report, kind, getattr(self.report, kind) + 1)

    def queue(self, queue: str) -> None:
        wanted = self.spool.hash_queue_depth if queue in self.spool.hash_queue_names else 0
        self.directory(queue, self.spool.queue_path(queue), 0, wanted)

    def directory(self, queue: str, path: str, depth: int, wanted: int) -> None:
        """Put the files of ``path`` (``depth`` levels below the queue) in place, then
        its one-character subdirectories; remove it when empty and deeper than
        ``wanted``."""
        subdirs: list[str] = []
        try:
            with os.scandir(path) as it:
                entries = list(it)  # the walk renames into this directory's children
        except FileNotFoundError:
            return
        except OSError as exc:
            self.problem(f"open directory {self.rel(path)}: {exc.strerror}", "unreadable")
            return
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if len(entry.name) == 1 and depth < MAX_HASH_DEPTH:
                        subdirs.append(entry.path)
                    continue
                if not valid_id(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:  # gone meanwhile
                continue
            self.place(queue, entry.path, entry.name)
        for sub in subdirs:
            self.directory(queue, sub, depth + 1, wanted)
        if depth > wanted:
            try:
                os.rmdir(path)
            except OSError:  # not empty (a file left in place, a foreign name), or gone
                return
            self.report.removed_dirs += 1

    def place(self, queue: str, actual: str, qid: str) -> None:
        """Rename ``actual`` to Spool.path(queue, qid) if it is not there already."""
        wanted = self.spool.path(queue, qid)
        if actual == wanted:
            return
        try:
            try:
                _rename_noreplace(actual, wanted)
            except FileNotFoundError:
                if not os.path.lexists(actual):
                    return  # moved or removed meanwhile (delivered, deleted)
                os.makedirs(os.path.dirname(wanted), mode=0o700, exist_ok=True)
                _rename_noreplace(actual, wanted)
        except FileExistsError:
            self.problem(f"rename file {self.rel(actual)} as {self.rel(wanted)}: "
                         "File exists (both kept; remove the one that is not wanted)",
                         "conflicts")
            return
        except OSError as exc:
            if exc.errno == errno.ENOENT and not os.path.lexists(actual):
                return
            self.problem(f"rename file {self.rel(actual)} as {self.rel(wanted)}: "
                         f"{exc.strerror}")
            return
        if queue in LOG_QUEUES:
            self.report.logs += 1
        else:
            self.report.messages += 1


def repair(spool: Spool) -> Report:
    """Move every queue file and per-message log of REPAIRED_QUEUES that is not where
    ``spool.path()`` wants it (module docstring); log and return what was done.

    Run it as the owner of the queue (mail_owner): the hash directories it makes must be
    theirs. Raises nothing (problems are logged and counted in the Report).
    """
    walk = _Walk(spool)
    for queue in REPAIRED_QUEUES:
        walk.queue(queue)
    text = walk.report.summary()
    if text:
        log.info(text)
    return walk.report
