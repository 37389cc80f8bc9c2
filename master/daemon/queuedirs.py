"""master.daemon.queuedirs - create and repair the queue directory tree (``postfix check``).

Summary
    ``qmgr-master check``, and ``start`` before anything else, make the queue directory
    look the way the processes that use it need (postfix.md §1.1, adapted: qmgrd has no
    set-gid ``postdrop``, so local submission writes maildrop/ directly):

    =====================  ==========  ======  =================================
    directory              owner       mode    why
    =====================  ==========  ======  =================================
    queue_directory        root        0755    the chroot of the qmgr
    maildrop               mail_owner  1733    any local user may drop mail in
    public                 mail_owner  0755    FIFOs 0622 inside: users trigger
    pid                    root        0755    master.pid, master.ctl
    private, incoming, active, deferred, hold, corrupt, bounce, defer, trace,
    flush, saved           mail_owner  0700
    data_directory         mail_owner  0700    master.lock
    =====================  ==========  ======  =================================

    Missing directories are created (queue_directory and data_directory only inside an
    existing parent: a mistyped path is an error, not a new empty queue); existing ones with a wrong owner or mode are
    fixed, and every fix is reported.  Entries inside the mail_owner queues (queue files,
    status logs, hash subdirectories) that are not owned by mail_owner - left over from a
    run without privilege separation - are handed to mail_owner (maildrop is left alone:
    its files belong to their submitters).  When the mail system runs as a normal user,
    that user stands in for both root and mail_owner.

Public API
    QUEUE_DIRS: dict[str, tuple[int, bool]]     name -> (mode, owned by mail_owner)
    check_queue_dirs(queue_directory, data_directory, owner) -> list[str]
        the changes made, one human-readable line each.  Raises OSError.
    require_parent(path, param) -> None
        FileNotFoundError unless ``path`` or its parent directory exists (``param``:
        the parameter named in the message).
    directory_problem(path) -> str | None
        why ``path`` is not a directory one can use ("No such file or directory",
        "Not a directory", ...), None when it is one: the tools that find no master
        or qmgr tell a missing queue directory from a mail system that is down.
    unreachable_by(path, uid, gid) -> str | None
        the first directory on the way to ``path`` that ``uid`` cannot search, or None.

Logs
    Nothing: the caller logs (master) or prints (qmgr-master check) the changes.
"""

from __future__ import annotations

import errno
import os
import stat

from master.server.jail import Owner

__all__ = ["QUEUE_DIRS", "ROOT_DIR_MODE", "check_queue_dirs", "directory_problem",
           "require_parent", "unreachable_by"]

ROOT_DIR_MODE = 0o755
DATA_DIR_MODE = 0o700
QUEUE_DIRS: dict[str, tuple[int, bool]] = {
    "maildrop": (0o1733, True), "public": (0o755, True), "private": (0o700, True),
    "incoming": (0o700, True), "active": (0o700, True), "deferred": (0o700, True),
    "hold": (0o700, True), "corrupt": (0o700, True), "bounce": (0o700, True),
    "defer": (0o700, True), "trace": (0o700, True), "flush": (0o700, True),
    "saved": (0o700, True), "pid": (0o755, False),
}
_NO_OWNER_FIX = ("maildrop", "public", "private", "pid")


def _ids(owner: Owner, by_mail_owner: bool) -> tuple[int, int]:
    if by_mail_owner or not owner.privileged:
        return owner.uid, owner.gid
    return 0, 0


def _ensure(path: str, mode: int, uid: int, gid: int, changes: list[str]) -> None:
    """Create ``path`` (mode, uid:gid) or fix its owner and mode; report each change."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, mode)
        os.chmod(path, mode)
        if (os.geteuid(), os.getegid()) != (uid, gid):
            os.chown(path, uid, gid)
        changes.append(f"created {path} (mode {mode:04o}, owner {uid}:{gid})")
        return
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(20, "not a directory", path)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
        changes.append(f"fixed {path}: owner {st.st_uid}:{st.st_gid} -> {uid}:{gid}")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
        changes.append(f"fixed {path}: mode {stat.S_IMODE(st.st_mode):04o} -> {mode:04o}")


def _fix_contents(path: str, uid: int, gid: int) -> int:
    """lchown every entry under ``path`` not owned by uid:gid; returns how many."""
    fixed = 0
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = os.path.join(top, name)
            try:
                st = os.lstat(entry)
            except FileNotFoundError:
                continue  # removed meanwhile
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.lchown(entry, uid, gid)
                fixed += 1
    return fixed


def check_queue_dirs(queue_directory: str, data_directory: str, owner: Owner) -> list[str]:
    """Create/repair the tree of the module docstring; returns the changes made.

    Raises:
        OSError: a directory cannot be created, or an owner/mode cannot be fixed (for
            instance a normal user facing directories of another user).
    """
    changes: list[str] = []
    qdir = os.path.abspath(queue_directory)
    require_parent(qdir, "queue_directory")
    _ensure(qdir, ROOT_DIR_MODE, *_ids(owner, False), changes)
    for name, (mode, by_mail_owner) in QUEUE_DIRS.items():
        _ensure(os.path.join(qdir, name), mode, *_ids(owner, by_mail_owner), changes)
    if data_directory:
        ddir = os.path.abspath(data_directory)
        require_parent(ddir, "data_directory")
        _ensure(ddir, DATA_DIR_MODE, *_ids(owner, True), changes)
    if owner.privileged:
        for name, (_, by_mail_owner) in QUEUE_DIRS.items():
            if by_mail_owner and name not in _NO_OWNER_FIX:
                count = _fix_contents(os.path.join(qdir, name), owner.uid, owner.gid)
                if count:
                    changes.append(f"fixed {os.path.join(qdir, name)}: {count} "
                                   f"entries handed to {owner.name}")
    return changes


def require_parent(path: str, param: str) -> None:
    """A missing queue or data directory is created, but only inside an existing
    directory: a mistyped path must not silently become a new, empty queue (Postfix
    refuses to start without its queue directory).

    Raises:
        FileNotFoundError: the parent directory does not exist.
    """
    parent = os.path.dirname(path)
    if not os.path.isdir(path) and not os.path.isdir(parent):
        raise FileNotFoundError(
            errno.ENOENT, f"{param} {path}: parent directory {parent} does not exist "
            "(a mistyped path? create it first if it is right)")


def directory_problem(path: str) -> str | None:
    """Why ``path`` cannot be used as a directory, in strerror's words ("No such file or
    directory", "Not a directory", "Permission denied"), or None when it is a directory.

    Postfix's postqueue and sendmail chdir to queue_directory first and stop with
    ``fatal: chdir <queue_directory>: No such file or directory``; qmgrd's tools ask
    this when they find no master or qmgr, so that a missing queue directory is not
    reported as a mail system that is down.  Raises nothing.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.strerror or os.strerror(exc.errno or errno.EIO)
    return None if stat.S_ISDIR(st.st_mode) else os.strerror(errno.ENOTDIR)


def unreachable_by(path: str, uid: int, gid: int) -> str | None:
    """The first directory from "/" down to ``path`` (inclusive) that ``uid``/``gid``
    cannot search (execute permission), or None when all can be searched."""
    current = "/"
    parts = [p for p in os.path.abspath(path).split(os.sep) if p]
    for part in ["", *parts]:
        current = os.path.join(current, part) if part else current
        try:
            st = os.stat(current)
        except OSError:
            return current
        mode = st.st_mode
        if st.st_uid == uid:
            ok = bool(mode & stat.S_IXUSR)
        elif st.st_gid == gid:
            ok = bool(mode & stat.S_IXGRP)
        else:
            ok = bool(mode & stat.S_IXOTH)
        if not ok:
            return current
    return None
