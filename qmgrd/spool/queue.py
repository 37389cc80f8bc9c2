"""queue — the queue directory: paths, hashing, creating, moving and scanning files.

Summary
    ``Spool`` knows the layout of ``$queue_directory`` (postfix.md §1.1): the message
    queues (maildrop incoming active deferred hold corrupt), the per-message logs (bounce
    defer trace), the endpoint directories (private public) and pid/. Queues named in
    ``hash_queue_names`` are hashed ``hash_queue_depth`` levels deep by the id's hex
    microseconds (§1.2); missing hash directories are made on demand.

    ``create()`` follows Postfix's ``mail_queue_enter`` (§1.4): open a temporary name
    ``<queue>/<usec>.<pid>`` with O_CREAT|O_EXCL and mode 0600 ("embryonic"), fstat it for
    the inode, build a *long* queue id from a fresh time stamp and the inode, and link it
    to its final name. Unlike rename(2), link(2) fails when the name exists, so an id is
    never reused: on a collision a new time stamp is taken.

    A file is *ready* when ``mode & 0700 == 0700`` (the owner execute bit marks a complete
    file, §1.5). ``scan()`` yields only ready files with valid ids.

Public API
    QUEUES, MESSAGE_QUEUES, LOG_QUEUES
    MAX_HASH_DEPTH = 10     the deepest hash_queue_depth (the parameter table's maximum too)
    Spool(queue_directory, hash_queue_names=("deferred", "defer"), hash_queue_depth=1)
                                           ValueError: hash_queue_depth outside 0..10
        .from_config(cfg) -> Spool             (classmethod; reads the three parameters)
        .queue_path(queue) -> str
        .path(queue, qid) -> str               ValueError for a bad queue name or id
        .create(queue, mode=0o600) -> (file object "w+b", qid, path)    OSError
        .move(qid, from_queue, to_queue, src_path=None) -> str  new path; OSError (ENOENT:
                                               no such file); src_path: the file's actual path
                                               when not path(from_queue, qid)
        .remove(queue, qid) -> bool            False when it did not exist
        .scan(queue) -> Iterator[str]          ids of ready files (recursing hash dirs)
        .scan_paths(queue, bogus=None) -> Iterator[(qid, path)]  names only, with the
                                               path where each was found (any hashing
                                               settings); other entries to bogus()
        .is_ready(st) -> bool                  (staticmethod)
        .make_dirs()                           create the queue directories (0700, public
                                               0710, maildrop 0730, pid 0755)
Logs nothing; raises OSError/ValueError as stated.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from qmgrd.spool.queueid import hash_dir_of_valid, new_long_id, valid_id

# typing and collections.abc are not imported at run time: every qmgr-sendmail run
# imports this module, and typing (with re) costs it about 10 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import IO, Any

    from master.config import Config

_ID_CACHE = 4096  # ids whose check and hash path are remembered (Spool.path)

__all__ = ["LOG_QUEUES", "MAX_HASH_DEPTH", "MESSAGE_QUEUES", "QUEUES", "Spool"]

MESSAGE_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
LOG_QUEUES = ("bounce", "defer", "trace")
QUEUES = MESSAGE_QUEUES + LOG_QUEUES + ("private", "public", "pid")
_DIR_MODES = {"maildrop": 0o730, "public": 0o710, "pid": 0o755}
_CREATE_TRIES = 1000
#: the deepest hashing accepted, and the number of one-character directory levels scan()
#: descends; master.config.params declares hash_queue_depth with the same maximum.
MAX_HASH_DEPTH = 10


class Spool:
    """One queue directory and its hashing parameters (no side effects on construction)."""

    def __init__(
        self,
        queue_directory: str,
        hash_queue_names: Iterable[str] = ("deferred", "defer"),
        hash_queue_depth: int = 1,
    ) -> None:
        self.queue_directory = os.path.abspath(queue_directory)
        self.hash_queue_names = frozenset(n.lower() for n in hash_queue_names)
        if not 0 <= hash_queue_depth <= MAX_HASH_DEPTH:
            raise ValueError(f"hash_queue_depth out of range: {hash_queue_depth}")
        self.hash_queue_depth = hash_queue_depth
        self._hashed_ids: dict[str, str] = {}  # valid id -> its hashed relative path
        self._prefix: dict[str, tuple[str, bool]] = {}  # queue -> (directory, hashed)

    def at(self, queue_directory: str) -> Spool:
        """This spool as seen from ``queue_directory`` (a chrooted service: "/"), with
        the same hashing; ``self`` when that is where it already is."""
        if os.path.abspath(queue_directory) == self.queue_directory:
            return self
        return Spool(queue_directory, self.hash_queue_names, self.hash_queue_depth)

    @classmethod
    def from_config(cls, cfg: Config) -> Spool:
        """Spool for ``queue_directory``, ``hash_queue_names`` and ``hash_queue_depth``.
        Raises ConfigError (a bad value: Config.queue_directory, hash_queue_names,
        get_int)."""
        return cls(
            cfg.queue_directory(),
            cfg.hash_queue_names(),
            cfg.get_int("hash_queue_depth"),
        )

    # ---------------------------------------------------------------- paths

    def queue_path(self, queue: str) -> str:
        """Directory of ``queue``. Raises ValueError for an unknown queue name."""
        if queue not in QUEUES:
            raise ValueError(f"unknown queue name: {queue!r}")
        return os.path.join(self.queue_directory, queue)

    def _hashed(self, queue: str) -> bool:
        return queue in self.hash_queue_names and self.hash_queue_depth > 0

    def path(self, queue: str, qid: str) -> str:
        """Path of message or log ``qid`` in ``queue`` (with hash directories).

        Raises:
            ValueError: unknown queue, or ``qid`` is not a valid long queue id.
        """
        hashed = self._hashed_ids.get(qid)
        if hashed is None:  # checked once per id (the qmgr asks ~10 times per message)
            if not valid_id(qid):
                raise ValueError(f"invalid queue id: {qid!r}")
            if len(self._hashed_ids) >= _ID_CACHE:
                self._hashed_ids.clear()
            hashed = "/".join((*hash_dir_of_valid(qid, self.hash_queue_depth), qid))
            self._hashed_ids[qid] = hashed
        prefix = self._prefix.get(queue)
        if prefix is None:
            base = self.queue_path(queue)  # raises for an unknown queue
            prefix = self._prefix[queue] = (base.rstrip("/") + "/", self._hashed(queue))
        return prefix[0] + (hashed if prefix[1] else qid)

    # ---------------------------------------------------------------- create

    def create(self, queue: str, mode: int = 0o600) -> tuple[IO[bytes], str, str]:
        """Create a new, uniquely named file in ``queue`` (Postfix mail_queue_enter).

        Args:
            queue: the queue (normally ``incoming``, or ``maildrop`` for qmgr-sendmail).
            mode: permission bits while the file is written (not ready: no owner x).

        Returns:
            (file object opened "w+b", queue id, path).

        Raises:
            OSError: the file cannot be created (the temporary name is removed).
        """
        qdir = self.queue_path(queue)
        pid = os.getpid()
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
        while True:
            usec = time.time_ns() // 1000 % 1_000_000
            temp = os.path.join(qdir, f"{usec}.{pid}")
            try:
                fd = os.open(temp, flags, mode)
                break
            except FileExistsError:
                continue
        try:
            os.fchmod(fd, mode)  # umask may have taken bits away
            inode = os.fstat(fd).st_ino
            for _ in range(_CREATE_TRIES):
                now = time.time_ns() // 1000
                qid = new_long_id(now // 1_000_000, now % 1_000_000, inode)
                final = self.path(queue, qid)
                try:
                    self._link(temp, final)
                except FileExistsError:
                    continue
                os.unlink(temp)
                return os.fdopen(fd, "w+b"), qid, final
            raise OSError(errno.EEXIST, f"cannot find a free queue id in {qdir}")
        except BaseException:
            os.close(fd)
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise

    @staticmethod
    def _link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except FileNotFoundError:
            if not os.path.exists(src):
                raise
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            os.link(src, dst)

    # ---------------------------------------------------------------- move, remove

    def move(self, qid: str, from_queue: str, to_queue: str,
             src_path: str | None = None) -> str:
        """Rename ``qid`` from one queue to another, making hash directories on demand.

        ``src_path``: the file's path when it is not ``path(from_queue, qid)`` (a name that
        ``scan_paths`` found in the hash directory of other hashing settings).

        Returns:
            The new path.

        Raises:
            ValueError: bad queue name or id.
            OSError: the rename failed (FileNotFoundError when the file is gone).
        """
        src = self.path(from_queue, qid) if src_path is None else src_path
        dst = self.path(to_queue, qid)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            if not os.path.lexists(src):
                raise
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            os.rename(src, dst)
        return dst

    def remove(self, queue: str, qid: str) -> bool:
        """Unlink ``qid`` from ``queue``; False when it did not exist.

        Raises:
            ValueError: bad queue name or id.
            OSError: any error other than "no such file".
        """
        try:
            os.unlink(self.path(queue, qid))
        except FileNotFoundError:
            return False
        return True

    # ---------------------------------------------------------------- scan

    @staticmethod
    def is_ready(st: os.stat_result) -> bool:
        """True for a regular file whose owner bits are exactly rwx (a complete file)."""
        return stat.S_ISREG(st.st_mode) and (st.st_mode & stat.S_IRWXU) == stat.S_IRWXU

    def scan(self, queue: str) -> Iterator[str]:
        """Yield the ids of ready files in ``queue``, recursing into hash directories.

        Names that are not valid ids, non-regular files and files still being written are
        skipped. Like Postfix, any one-character subdirectory is descended into (up to 10
        levels), so files left over from other hashing settings are still found. A
        directory vanishing during the walk is not an error. Directory order, not sorted.

        Raises:
            ValueError: unknown queue name.
        """
        yield from self._scan_dir(self.queue_path(queue), MAX_HASH_DEPTH + 1, False)

    def scan_paths(self, queue: str, bogus: Callable[[os.DirEntry[str], str], None] | None
                   = None) -> Iterator[tuple[str, str]]:
        """Yield ``(qid, path)`` for every valid id in ``queue`` that is a regular file
        (by the directory entry's type: no symbolic link is followed), with the path
        where the name was found: names only, no ``stat`` (as Postfix's scan_dir), for a
        caller that stats the file anyway before using it (the qmgr's feed checks type,
        mode and mtime; files still being written are among them). Every other entry
        named as a queue id (a symbolic link, directory, FIFO, ..., or a hash
        directory deeper than any hashing) is passed to ``bogus(entry, "not a regular
        file")`` and skipped (Postfix's mail_open_ok, which its qmgr's feed applies);
        names that are no queue id - cleanup's temporary ``<usec>.<pid>`` files among
        them - are skipped without a word, as Postfix's scan does (mail_queue_id_ok). The
        path differs from ``path(queue, qid)`` for a file left
        in the hash directory of other ``hash_queue_depth``/``hash_queue_names``
        settings; the qmgr's feed takes the file from there (``move(..., src_path=path)``),
        so such a file heals at the next scan.

        Raises:
            ValueError: unknown queue name.
        """
        yield from self._scan_dir(self.queue_path(queue), MAX_HASH_DEPTH + 1, True, bogus)

    def _scan_dir(self, path: str, depth_left: int, paths: bool,
                  bogus: Callable[[os.DirEntry[str], str], None] | None = None
                  ) -> Iterator[Any]:
        """scan (``paths`` False: ready files' names) or scan_paths (True: every regular
        file with a queue id's name, with its path; the other entries to ``bogus``) of
        one directory and its one-character subdirectories."""
        try:
            it = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        subdirs: list[str] = []
        with it:
            for entry in it:
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if depth_left > 1 and len(name) == 1:
                            subdirs.append(entry.path)
                        elif bogus is not None and (valid_id(name) or len(name) == 1):
                            bogus(entry, "not a regular file")
                        continue
                    if not valid_id(name):  # cleanup's temporary <usec>.<pid> names
                        continue            # among them: skipped silently, as Postfix
                                            # (mail_queue_id_ok)
                    if paths:
                        if entry.is_file(follow_symlinks=False):
                            yield name, entry.path
                        elif bogus is not None:
                            bogus(entry, "not a regular file")
                    elif self.is_ready(entry.stat(follow_symlinks=False)):
                        yield name
                except FileNotFoundError:
                    continue
        for sub in subdirs:
            yield from self._scan_dir(sub, depth_left - 1, paths, bogus)

    # ---------------------------------------------------------------- setup

    def make_dirs(self) -> None:
        """Create the queue directory and every queue in it (existing ones are kept).

        Raises:
            OSError: a directory cannot be created.
        """
        os.makedirs(self.queue_directory, mode=0o755, exist_ok=True)
        for q in QUEUES:
            p = os.path.join(self.queue_directory, q)
            mode = _DIR_MODES.get(q, 0o700)
            try:
                os.mkdir(p, mode)
                os.chmod(p, mode)
            except FileExistsError:
                pass
