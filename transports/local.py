"""local — the local(8) delivery agent: deliver to a mailbox file or a Maildir.

Summary
    Each recipient's local part (before the last ``@``, lower-cased, with the address
    extension after the first ``recipient_delimiter`` character removed) names a mailbox
    under ``mail_spool_directory``:

    * ``mail_spool_directory`` ending in ``/`` -> Maildir ``<dir><user>/{tmp,new,cur}``
      (made as needed, mode 0700): the message is written to ``tmp/<time>.<pid>_<n>.<host>``
      (O_EXCL, mode 0600), fsynced, linked into ``new/`` and the tmp name removed.
    * otherwise -> the mbox file ``<dir>/<user>`` (O_APPEND, mode 0600, no symlinks; the
      directory is made, mode 0755, when missing): a
      ``From <sender>  <asctime>`` line, the message with body lines that begin with
      ``From `` quoted as ``>From ``, and a blank line; written under the locks named in
      ``mailbox_delivery_lock`` (fcntl, flock, dotlock ``<mbox>.lock`` with
      ``deliver_lock_attempts``/``deliver_lock_delay``/``stale_lock_time``), then fsynced.
      On any write error the file is truncated back to its old size.
      ``mailbox_size_limit`` (bytes, 0 = none) bounces a delivery that would make the
      mailbox larger (5.2.2).

    Every copy starts with ``Return-Path: <sender>`` and ``Delivered-To: <recipient>``;
    lines end in LF. A message whose headers already hold ``Delivered-To: <recipient>``
    (any case) bounces with ``5.4.6 mail forwarding loop for <recipient>``.

    Local part checks (Postfix local(8) behaviour, simplified): an empty name is
    ``5.1.1 unknown user: ""``; a name with ``/``, a leading ``.``, a control character
    (NUL included) or over 255 bytes is ``5.1.1 invalid mailbox name: "x"``. When
    ``local_recipient_maps`` is empty every valid name has a mailbox (the bundled
    configuration); otherwise the name must exist in the passwd database
    (``5.1.1 unknown user: "x"``) and, when the agent runs as root, the mailbox is written
    with that user's uid/gid (Postfix set_eugid).

    File system errors defer (4.2.0), except "disk quota exceeded" and "file too large"
    which bounce (5.2.2), as Postfix's mbox_dsn().

Public API
    LocalAgent(DeliveryAgent)        .deliver(req, msg); .setup()
    mailbox_name(address, delimiter="") -> str       the mailbox user for an address
    check_mailbox_name(name) -> str                  "" or the bounce reason
    main() -> NoReturn                               ``python -m transports.local``

Logs ``status=sent (delivered to maildir)`` / ``(delivered to mailbox)``, relay=local,
via the base.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

from qmgrd.delivery import DeliverRequest, RecipientInfo
from qmgrd.spool.message import QueueFile
from qmgrd.spool.statuslog import quote_822_local
from transports.agent import DeliveryAgent, Dsn, make_dsn, run

if TYPE_CHECKING:
    from master.config import Config

__all__ = ["LocalAgent", "check_mailbox_name", "mailbox_name", "main"]

_MAX_NAME = 255


def mailbox_name(address: str, delimiter: str = "") -> str:
    """The mailbox user of ``address``: local part, lower-cased, extension removed.

    ``delimiter`` is recipient_delimiter: the name is cut at the first of its characters
    (unless that would leave nothing).
    """
    at = address.rfind("@")
    local = (address[:at] if at >= 0 else address).lower()
    if delimiter:
        cut = min((i for i in (local.find(c) for c in delimiter) if i > 0), default=-1)
        if cut > 0:
            local = local[:cut]
    return local


def check_mailbox_name(name: str) -> str:
    """"" when ``name`` is a safe mailbox file name, else the reason to bounce."""
    if not name:
        return 'unknown user: ""'
    bad = (
        "/" in name
        or name.startswith(".")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME
    )
    if bad:
        shown = name[:100].encode("unicode_escape").decode("ascii")
        return f'invalid mailbox name: "{shown}"'
    return ""


def _fs_dsn(exc: OSError, text: str) -> Dsn:
    """Postfix mbox_dsn(): quota/size errors bounce (5.2.2), others defer (4.2.0)."""
    status = "5.2.2" if exc.errno in (errno.EDQUOT, errno.EFBIG) else "4.2.0"
    return make_dsn(status, f"{text}: {exc.strerror or exc}")


@contextmanager
def _as_user(uid: int, gid: int) -> Iterator[None]:
    """Run the block with effective uid/gid switched (only when root and uid != 0)."""
    if os.geteuid() != 0 or uid == 0:
        yield
        return
    old_gid = os.getegid()
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(old_gid)


def _opt(cfg: Config, name: str, default: int, time_unit: bool = False) -> int:
    """A parameter that may be missing from the table (default when unset)."""
    if not cfg.get(name):
        return default
    return cfg.get_time(name) if time_unit else cfg.get_int(name)


class LocalAgent(DeliveryAgent):
    """The local(8) agent (see the module docstring)."""

    name = "local"

    def __init__(self) -> None:
        super().__init__()
        self.spool_dir = "/var/mail"
        self.delimiter = ""
        self.recipient_maps: list[str] = []
        self.size_limit = 51200000
        self.locks = ["fcntl", "dotlock"]
        self.lock_attempts = 20
        self.lock_delay = 1.0
        self.stale_lock_time = 500
        self.hostname = socket.gethostname()
        self._count = 0

    def setup(self) -> None:
        """Read the local parameters (pre-jail)."""
        cfg = self.cfg
        assert cfg is not None
        self.spool_dir = cfg.get("mail_spool_directory")
        self.delimiter = cfg.get("recipient_delimiter")
        self.recipient_maps = cfg.get_list("local_recipient_maps")
        self.size_limit = cfg.get_size("mailbox_size_limit")
        self.locks = [w.lower() for w in cfg.get_list("mailbox_delivery_lock")]
        self.lock_attempts = max(1, _opt(cfg, "deliver_lock_attempts", 20))
        self.lock_delay = float(_opt(cfg, "deliver_lock_delay", 1, time_unit=True))
        self.stale_lock_time = _opt(cfg, "stale_lock_time", 500, time_unit=True)
        self.hostname = cfg.get("myhostname") or self.hostname

    def deliver(self, req: DeliverRequest, msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        """Deliver ``msg`` to each recipient's mailbox.

        Raises:
            CorruptQueueFile: the content could not be read.
        """
        lines = list(msg.iter_lines())
        seen = _delivered_to(lines)
        self.state.relay = "local"
        return [(rcpt, self._deliver_one(req, rcpt, lines, seen)) for rcpt in req.recipients]

    def _deliver_one(self, req: DeliverRequest, rcpt: RecipientInfo, lines: list[bytes],
                     seen: set[str]) -> Dsn:
        user = mailbox_name(rcpt.address, self.delimiter)
        why = check_mailbox_name(user)
        if why:
            return make_dsn("5.1.1", why)
        if rcpt.address.lower() in seen:
            return make_dsn("5.4.6", f"mail forwarding loop for {rcpt.address}")
        uid = gid = -1
        if self.recipient_maps:
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                return make_dsn("5.1.1", f'unknown user: "{user}"')
            uid, gid = pw.pw_uid, pw.pw_gid
        head = (f"Return-Path: <{quote_822_local(req.sender) if req.sender else ''}>\n"
                f"Delivered-To: {quote_822_local(rcpt.address)}\n").encode(
                    "utf-8", "surrogateescape")
        with _as_user(uid, gid) if uid >= 0 else _noop():
            if self.spool_dir.endswith("/"):
                return self._maildir(self.spool_dir + user, head, lines)
            return self._mbox(os.path.join(self.spool_dir, user), user, req.sender, head,
                              lines)

    # ------------------------------------------------------------------ Maildir

    def _maildir(self, base: str, head: bytes, lines: list[bytes]) -> Dsn:
        data = head + b"".join(line + b"\n" for line in lines)
        try:
            for sub in ("", "/tmp", "/new", "/cur"):
                os.makedirs(base + sub, mode=0o700, exist_ok=True)
        except OSError as exc:
            return _fs_dsn(exc, f"create maildir {base}")
        self._count += 1
        host = self.hostname.replace("/", "\\057").replace(":", "\\072")
        name = f"{int(time.time())}.{os.getpid()}_{self._count}.{host}"
        tmp, new = f"{base}/tmp/{name}", f"{base}/new/{name}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            return _fs_dsn(exc, f"create maildir file {tmp}")
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, new)
        except OSError as exc:
            _unlink(tmp)
            return _fs_dsn(exc, f"create maildir file {tmp}")
        _unlink(tmp)
        return make_dsn("2.0.0", "delivered to maildir")

    # ------------------------------------------------------------------ mbox

    def _mbox(self, path: str, user: str, sender: str, head: bytes, lines: list[bytes]) -> Dsn:
        stamp = time.asctime(time.localtime())
        parts = [f"From {quote_822_local(sender) if sender else 'MAILER-DAEMON'}  {stamp}\n"
                 .encode("utf-8", "surrogateescape"), head]
        for line in lines:
            parts.append(b">" + line + b"\n" if line.startswith(b"From ") else line + b"\n")
        parts.append(b"\n")
        data = b"".join(parts)
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        except OSError as exc:
            return _fs_dsn(exc, f"cannot create mail spool directory {os.path.dirname(path)}")
        dotlock = ""
        if "dotlock" in self.locks:
            dotlock = path + ".lock"
            why = self._dotlock(dotlock)
            if why is not None:
                return why
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                return _fs_dsn(exc, f"cannot open mailbox {path}")
            try:
                return self._append(fd, path, user, data)
            finally:
                os.close(fd)
        finally:
            if dotlock:
                _unlink(dotlock)

    def _append(self, fd: int, path: str, user: str, data: bytes) -> Dsn:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return make_dsn("5.2.0", f"mailbox {path} is not a regular file")
        why = self._kernel_lock(fd, path)
        if why is not None:
            return why
        size = os.fstat(fd).st_size
        if self.size_limit > 0 and size + len(data) > self.size_limit:
            return make_dsn("5.2.2", f"cannot update mailbox {path} for user {user}. "
                                     "error writing message: File too large")
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            return _fs_dsn(exc, f"cannot update mailbox {path} for user {user}. "
                                "error writing message")
        return make_dsn("2.0.0", "delivered to mailbox")

    def _kernel_lock(self, fd: int, path: str) -> Dsn | None:
        """fcntl and/or flock locks per mailbox_delivery_lock; a Dsn when impossible."""
        for kind in ("fcntl", "flock"):
            if kind not in self.locks:
                continue
            for attempt in range(self.lock_attempts):
                try:
                    if kind == "fcntl":
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    else:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        return _fs_dsn(exc, f"unable to lock mailbox {path}")
                    if attempt + 1 < self.lock_attempts:
                        time.sleep(self.lock_delay)
            else:
                return make_dsn("4.2.0", f"unable to lock for exclusive access: {path}")
        return None

    def _dotlock(self, lock: str) -> Dsn | None:
        """Create ``lock`` (O_EXCL), removing a stale one; a Dsn when impossible."""
        for attempt in range(self.lock_attempts):
            try:
                os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600))
                return None
            except FileExistsError:
                try:
                    if time.time() - os.stat(lock).st_mtime > self.stale_lock_time:
                        _unlink(lock)
                        continue
                except OSError:
                    continue
            except OSError as exc:
                return _fs_dsn(exc, f"unable to create lock file {lock}")
            if attempt + 1 < self.lock_attempts:
                time.sleep(self.lock_delay)
        return make_dsn("4.2.0", f"unable to create lock file {lock}: File exists")


@contextmanager
def _noop() -> Iterator[None]:
    yield


def _delivered_to(lines: list[bytes]) -> set[str]:
    """Lower-cased values of the Delivered-To: headers (unfolded) of the message."""
    found: set[str] = set()
    current: bytes | None = None
    for line in lines:
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current += line
            continue
        if current is not None:
            found.add(_header_value(current))
        current = line if line[:13].lower() == b"delivered-to:" else None
    if current is not None:
        found.add(_header_value(current))
    return found


def _header_value(line: bytes) -> str:
    value = line[13:].decode("utf-8", "surrogateescape").strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value.lower()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def main() -> NoReturn:
    """Run the local service under single_server."""
    run(LocalAgent())


if __name__ == "__main__":
    main()
