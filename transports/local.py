"""local — the local(8) delivery agent: deliver to a mailbox file or a Maildir.

Summary
    Each recipient's local part (before the last ``@``, lower-cased, with the address
    extension after the first ``recipient_delimiter`` character removed) names a mailbox
    under ``mail_spool_directory``:

    * ``mail_spool_directory`` ending in ``/`` -> Maildir ``<dir><user>/{tmp,new,cur}``
      (made as needed, mode 0700): the message is written to ``tmp/<time>.<pid>_<n>.<host>``
      (O_EXCL, mode 0600), fsynced, linked into ``new/`` and the tmp name removed.
    * otherwise -> the mbox file ``<dir>/<user>`` (O_APPEND, mode 0600): a
      ``From <sender>  <asctime>`` line, the message with body lines that begin with
      ``From `` quoted as ``>From ``, and a blank line; written under the locks named in
      ``mailbox_delivery_lock`` (fcntl, flock, dotlock ``<mbox>.lock`` with
      ``deliver_lock_attempts``/``deliver_lock_delay``/``stale_lock_time``), then fsynced.
      On any write error the file is truncated back to its old size.
      ``mailbox_size_limit`` (bytes, 0 = none) bounces a delivery that would make the
      mailbox larger (5.2.2); in a Maildir it bounces a message file larger than it
      (Postfix: "the maximal size of any local(8) individual mailbox or maildir file").

    Delivery rights (Postfix set_eugid): run as root (the master keeps root for local
    only), the agent never creates or writes a mailbox as root.  Each mailbox is made
    and written with the effective uid/gid of the passwd account of its name (looked up
    also when ``local_recipient_maps`` is empty), that gid as the only supplementary
    group; for a name without an account, and for root, with those of
    ``default_privs`` (default ``nobody``; checked at start-up like Postfix's: it must
    exist and have neither uid nor gid 0, else a ConfigError, fatal for the process).
    Postfix delivers root's own mailbox as root; here root's mail is not special-cased
    (an alias in alias_maps, e.g. ``root: alice``, redirects it) and gets default_privs.  Only
    ``mail_spool_directory`` itself is opened, and made when missing, with root's rights:
    made by root it gets mode 1777 (sticky, like /tmp) so that every delivery user can
    make its mailbox there; an existing one is used as it is.  A Maildir is always made
    and written with the delivery rights (a spool the delivery user cannot write defers
    4.2.0 "Permission denied").  An mbox follows Postfix local/mailbox.c
    (spool_uid/spool_gid, chown_uid/chown_gid): the dotlock ``<mbox>.lock`` is made and
    removed, and the mbox opened or made, with rights that depend on the spool's mode -
    world-writable (1777): the delivery uid/gid; else group-writable (Debian's
    ``/var/mail``, root:mail 2775): the delivery uid with the spool's gid (a new mbox
    gets that group); else (root's 0755): root's, a new mbox (O_EXCL, never through a
    symlink, mode 0600) being then given to the delivery uid/gid with fchown.  The
    message is always written with the delivery rights.  Not run as root, everything
    is done as the invoking user.

    Symbolic links: below ``mail_spool_directory`` nothing is followed (every step is
    relative to an open directory, O_NOFOLLOW).  A Maildir, or its tmp/new/cur, that is
    a symlink bounces ``5.2.0 create maildir <dir>/<user>: <path> is a symbolic link``;
    an mbox that is one (dangling or not) bounces ``5.2.0 cannot update mailbox <path>
    for user <user>. file is a symbolic link`` - Postfix's safe_open() wording and its
    mbox_dsn() default 5.2.0 (Postfix's own exception for root-owned symlinks is not
    made).  An mbox that is not a regular file or has more than one link bounces 5.2.0.

    Ownership (Postfix ``strict_mailbox_ownership``, default yes; checked whatever the
    rights the mbox was opened with): in a world-writable spool anyone could make a
    file or directory named after another user's mailbox before that user gets mail,
    and read what is delivered into it.  An existing mbox not owned by the uid the
    agent delivers as (the recipient's, or default_privs') defers ``4.2.0 cannot
    update mailbox <path> for user <user>. destination <path> is not owned by
    recipient`` and logs Postfix's warning
    ``specify "strict_mailbox_ownership = no" to ignore mailbox ownership mismatch``
    (Postfix local/mailbox.c).  Postfix's maildir delivery has no such check; here a
    Maildir, or its tmp/new/cur, not owned by that uid defers the same way (``4.2.0
    create maildir <dir>/<user>: <path> is not owned by recipient``, same warning), and
    ``strict_mailbox_ownership = no`` turns both checks off.  Names without an account
    all deliver as default_privs, so they pass each other's check (as in Postfix, where
    default_privs is shared too).

    Every copy starts with ``Return-Path: <sender>`` and ``Delivered-To: <recipient>``;
    lines end in LF. A message whose headers already hold ``Delivered-To: <recipient>``
    (any case) bounces with ``5.4.6 mail forwarding loop for <recipient>``.

    Local part checks (Postfix local(8) behaviour, simplified): an empty name is
    ``5.1.1 unknown user: ""``; a name with ``/``, a leading ``.``, a control character
    (NUL included) or over 255 bytes is ``5.1.1 invalid mailbox name: "x"``. When
    ``local_recipient_maps`` is empty every valid name has a mailbox (the bundled
    configuration); otherwise the name must exist in the passwd database
    (``5.1.1 unknown user: "x"``).

    Aliases: before the mailbox delivery the local part is looked up in ``alias_maps``
    and a match is delivered to its targets instead (transports.local_alias); its remote
    targets are sent on as one new message through cleanup (transports.local_forward),
    logged ``status=sent (forwarded as <new queue id>)``. A recipient with NOTIFY=SUCCESS
    whose alias is expanded gets one success notice ``2.0.0 alias expanded`` (action
    ``expanded``), and what it expands to goes without SUCCESS (Postfix local/alias.c,
    RFC 3461 section 6.2.7.3).

    File system errors defer (4.2.0), except "disk quota exceeded" and "file too large"
    which bounce (5.2.2), as Postfix's mbox_dsn().

Public API
    LocalAgent(DeliveryAgent)        .deliver(req, msg); .setup()
    mailbox_name(address, delimiter="") -> str       the mailbox user for an address
    check_mailbox_name(name) -> str                  "" or the bounce reason
    main() -> NoReturn                               ``python -m transports.local``

Logs ``status=sent (delivered to maildir)`` / ``(delivered to mailbox)``, relay=local,
via the base; ``created mail spool directory <dir> (mode 1777)`` when it makes the spool;
``fatal: cannot restore root privileges: ...`` (exit 1) should switching back fail.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import pwd
import socket
import stat
import time
from typing import TYPE_CHECKING, NoReturn

from master import log
from master.config import ConfigError
from master.config.maincf import MAILBOX_LOCKS
from master.config.mastercf import NO_CHROOT
from master.server import jail
from qmgrd.delivery import DeliverRequest, RecipientInfo
from qmgrd.maps import AliasMaps
from qmgrd.spool.envelope import DSN_NOTIFY_NEVER, DSN_NOTIFY_SUCCESS
from qmgrd.spool.message import QueueFile
from qmgrd.spool.statuslog import quote_822_local
from transports.agent import DeliveryAgent, Dsn, make_dsn, run
from transports.local_alias import AliasExpander
from transports.local_forward import Forwarder
from transports.mailcopy import delivered_to as _delivered_to
from transports.privileges import privileges as _privileges

if TYPE_CHECKING:
    from master.server.skeleton import ServerContext

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
        self.default_rights: tuple[int, int] | None = None
        self.strict_owner = True
        self.aliases: AliasExpander | None = None
        self.forwarder: Forwarder | None = None
        self._count = 0

    def pre_jail(self, ctx: ServerContext) -> None:
        """single_server pre-jail callback: refuse a chroot or mail_owner's ids, then
        configure.

        Raises:
            ConfigError: ``service <name>: the local delivery agent cannot run chrooted
            (set its chroot column to n)`` when the master chroots it (master.cf chroot
            ``y`` under a root master): mailboxes, the passwd file, alias tables and
            ``.forward`` files are outside queue_directory.  Postfix's master(5) says
            chroot "should not be used" with local(8); qmgrd refuses it (at start and
            reload too: master.config.validate).  ``service <name> requires privileged
            operation`` (Postfix's words, as pipe's) when the master would drop it to
            mail_owner (unpriv ``y`` under a root master): it could not deliver with
            each recipient's rights.
        """
        if ctx.unpriv:
            raise ConfigError(f"service {ctx.service} requires privileged operation")
        if ctx.chroot:
            raise ConfigError(f"service {ctx.service}: {NO_CHROOT['transports.local']}")
        super().pre_jail(ctx)

    def setup(self) -> None:
        """Read the local parameters (pre-jail).

        Raises:
            ConfigError: a bad value; as root also a default_privs account that does not
            exist or has uid/gid 0 (Postfix's wording, master.server.jail).
        """
        cfg = self.cfg
        assert cfg is not None
        self.spool_dir = cfg.get("mail_spool_directory")
        self.delimiter = cfg.get("recipient_delimiter")
        self.recipient_maps = cfg.get_list("local_recipient_maps")
        self.size_limit = cfg.get_size("mailbox_size_limit")
        self.locks = [w.lower() for w in cfg.get_list("mailbox_delivery_lock")]
        unknown = [w for w in self.locks if w not in MAILBOX_LOCKS]
        if unknown:  # refused at start/reload too (Config.check); Postfix's words
            raise cfg.error("mailbox_delivery_lock", "unknown mailbox_delivery_lock "
                            f'value "{unknown[0]}" in "{cfg.get("mailbox_delivery_lock")}"')
        self.lock_attempts = max(1, cfg.get_int("deliver_lock_attempts"))
        self.lock_delay = float(cfg.get_time("deliver_lock_delay"))
        self.stale_lock_time = cfg.get_time("stale_lock_time")
        self.strict_owner = cfg.get_bool("strict_mailbox_ownership")
        self.aliases = AliasExpander(AliasMaps(cfg.get_list("alias_maps")), self.delimiter,
                                     cfg.get_list("mydestination"), cfg.get("myorigin"))
        assert self.spool is not None  # set by configure()
        self.forwarder = Forwarder(cfg, self.spool)
        self.hostname = cfg.get("myhostname") or self.hostname
        if os.geteuid() == 0:
            try:
                owner = jail.lookup_default_privs(cfg)
            except jail.OwnerError as exc:
                raise ConfigError(str(exc)) from None
            self.default_rights = (owner.uid, owner.gid)
            # mail_owner's effective ids after the init (DeliveryAgent.post_jail), as
            # Postfix's local(8); each delivery takes root back (deliver)
            self.keep_mail_owner(cfg)

    def deliver(self, req: DeliverRequest, msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        """Deliver ``msg`` to each recipient's mailbox.

        Raises:
            CorruptQueueFile: the content could not be read.
        """
        lines = list(msg.iter_lines())
        seen = _delivered_to(lines)
        self.state.relay = "local"
        # root again for the deliveries (each mailbox is written with its user's ids,
        # transports.privileges): between requests the agent is mail_owner
        with self.as_root():
            return [(rcpt, self._deliver_one(req, rcpt, lines, seen))
                    for rcpt in req.recipients]

    def _deliver_one(self, req: DeliverRequest, rcpt: RecipientInfo, lines: list[bytes],
                     seen: set[str], alias: bool = True) -> Dsn:
        user = mailbox_name(rcpt.address, self.delimiter)
        why = check_mailbox_name(user)
        if why:
            return make_dsn("5.1.1", why)
        if rcpt.address.lower() in seen:
            return make_dsn("5.4.6", f"mail forwarding loop for {rcpt.address}")
        if alias and self.aliases is not None:  # alias_maps (transports.local_alias)
            expanded = self.aliases.expand(
                rcpt.address,
                lambda address: self._deliver_one(
                    req, dataclasses.replace(rcpt, address=address), lines, seen, alias=False),
                lambda targets: self._forward(req, rcpt, lines, targets))
            if expanded is not None:
                return expanded
        account = _getpwnam(user)
        if account is None and self.recipient_maps:
            return make_dsn("5.1.1", f'unknown user: "{user}"')
        rights = self._rights(account)
        # The uid that must own an existing mailbox (None: not checked).
        owner = (rights[0] if rights is not None else os.geteuid()) if self.strict_owner \
            else None
        head = (f"Return-Path: <{quote_822_local(req.sender) if req.sender else ''}>\n"
                f"Delivered-To: {quote_822_local(rcpt.address)}\n").encode(
                    "utf-8", "surrogateescape")
        spool = self.spool_dir.rstrip("/") or "/"
        try:
            spool_fd = self._open_spool(spool)
        except OSError as exc:
            return _fs_dsn(exc, f"cannot open mail spool directory {spool}")
        try:
            if self.spool_dir.endswith("/"):
                with _privileges(rights):
                    return self._maildir(spool_fd, spool, user, owner, head, lines)
            return self._mbox(spool_fd, spool, user, rights, owner, req.sender, head, lines)
        finally:
            os.close(spool_fd)

    def _forward(self, req: DeliverRequest, rcpt: RecipientInfo, lines: list[bytes],
                 targets: list[str]) -> Dsn:
        """Send ``rcpt``'s remote alias targets on (transports.local_forward).

        The copy's recipients get ``rcpt``'s NOTIFY without SUCCESS (SUCCESS alone
        becomes NEVER), as Postfix's local/alias.c does (RFC 3461 section 6.2.7.3): the
        success notice is the ``alias expanded`` one (_status_entry), not the next hop's.
        """
        assert self.forwarder is not None  # set by setup()
        if rcpt.notify & DSN_NOTIFY_SUCCESS:
            notify = (DSN_NOTIFY_NEVER if rcpt.notify == DSN_NOTIFY_SUCCESS
                      else rcpt.notify & ~DSN_NOTIFY_SUCCESS)
            rcpt = dataclasses.replace(rcpt, notify=notify)
        return self.forwarder.forward(req, rcpt, lines, targets)

    @staticmethod
    def _status_entry(req: DeliverRequest, rcpt: RecipientInfo, dsn: Dsn) -> Dsn:
        """An expanded alias (action ``expanded``,
        transports.local_alias) is reported as Postfix's local/alias.c reports it:
        ``2.0.0``, action ``expanded``, ``alias expanded`` (RFC 3464; the maillog keeps
        the deliveries' text); every other outcome as it is."""
        if dsn.status[0] == "2" and dsn.action == "expanded":
            return make_dsn("2.0.0", "alias expanded", action="expanded")
        return dsn

    def _rights(self, account: pwd.struct_passwd | None) -> tuple[int, int] | None:
        """(uid, gid) to deliver with, or None to keep ours (not root: nothing to drop).

        The account of the mailbox name when it has one and it is not root, else
        default_privs (Postfix set_eugid; local(8) never writes a mailbox as root here).
        """
        if os.geteuid() != 0:
            return None
        if account is not None and account.pw_uid != 0:
            return account.pw_uid, account.pw_gid
        assert self.default_rights is not None  # set by setup() when root
        return self.default_rights

    def _open_spool(self, spool: str) -> int:
        """A descriptor of mail_spool_directory, opened with our own (root) rights, made
        when missing: mode 1777 (sticky, like /tmp) when we are root, so that every
        delivery user can make its own mailbox in it.  Raises OSError."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            return os.open(spool, flags)
        except FileNotFoundError:
            pass
        try:
            os.makedirs(spool)
        except FileExistsError:
            pass
        else:
            if os.geteuid() == 0:
                os.chmod(spool, 0o1777)
            log.info(f"created mail spool directory {spool}"
                     f"{' (mode 1777)' if os.geteuid() == 0 else ''}")
        return os.open(spool, flags)

    # ------------------------------------------------------------------ Maildir

    def _maildir(self, spool_fd: int, spool: str, user: str, owner: int | None,
                 head: bytes, lines: list[bytes]) -> Dsn:
        data = head + b"".join(line + b"\n" for line in lines)
        base = f"{spool}/{user}"
        fds: list[int] = []
        try:
            try:
                fds.append(_subdir(spool_fd, user, base, owner))
                for sub in ("tmp", "new", "cur"):
                    fds.append(_subdir(fds[0], sub, f"{base}/{sub}", owner))
            except _SymlinkError as exc:
                return make_dsn("5.2.0", f"create maildir {base}: {exc} is a symbolic link")
            except _OwnerError as exc:
                _warn_owner()
                return make_dsn("4.2.0", f"create maildir {base}: {exc} is not owned by "
                                         "recipient")
            except OSError as exc:
                return _fs_dsn(exc, f"create maildir {base}")
            return self._maildir_file(fds[1], fds[2], base, data)
        finally:
            for fd in fds:
                os.close(fd)

    def _maildir_file(self, tmp_fd: int, new_fd: int, base: str, data: bytes) -> Dsn:
        """One message file, named as Postfix's maildir delivery names it: written in
        tmp/ as ``<sec>.P<pid>Q<n>.<host>``, then linked into new/ as
        ``<sec>.V<dev>I<inode>M<usec>.<host>`` (hexadecimal device and inode, the
        microseconds of the delivery's start): the inode of a file that exists makes
        the new/ name unique, also when a pid comes back within the same second."""
        self._count += 1
        now = time.time_ns() // 1000  # microseconds
        sec, usec = divmod(now, 1_000_000)
        host = self.hostname.replace("/", "\\057").replace(":", "\\072")
        name = f"{sec}.P{os.getpid()}Q{self._count}.{host}"
        tmp = f"{base}/tmp/{name}"
        if self.size_limit > 0 and len(data) > self.size_limit:
            # Postfix set_file_limit(mailbox_size_limit): every file local(8) writes,
            # a Maildir's message files too; the write fails with EFBIG (5.2.2).
            return make_dsn("5.2.2", f"create maildir file {tmp}: File too large")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=tmp_fd)
        except OSError as exc:
            return _fs_dsn(exc, f"create maildir file {tmp}")
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            new = f"{sec}.V{st.st_dev:x}I{st.st_ino:x}M{usec}.{host}"
            os.link(name, new, src_dir_fd=tmp_fd, dst_dir_fd=new_fd, follow_symlinks=False)
        except OSError as exc:
            _unlink(name, tmp_fd)
            return _fs_dsn(exc, f"create maildir file {tmp}")
        _unlink(name, tmp_fd)
        return make_dsn("2.0.0", "delivered to maildir")

    # ------------------------------------------------------------------ mbox

    def _mbox(self, spool_fd: int, spool: str, user: str, rights: tuple[int, int] | None,
              owner: int | None, sender: str, head: bytes, lines: list[bytes]) -> Dsn:
        path = f"{spool}/{user}"
        stamp = time.asctime(time.localtime())
        parts = [f"From {quote_822_local(sender) if sender else 'MAILER-DAEMON'}  {stamp}\n"
                 .encode("utf-8", "surrogateescape"), head]
        for line in lines:
            parts.append(b">" + line + b"\n" if line.startswith(b"From ") else line + b"\n")
        parts.append(b"\n")
        data = b"".join(parts)
        # Postfix deliver_mailbox_file(): lock and open/create with the spool rights,
        # write with the recipient's.
        spool_rights, chown = _spool_rights(os.fstat(spool_fd), rights)
        dotlock = user + ".lock" if "dotlock" in self.locks else ""
        with _privileges(spool_rights):
            if dotlock:
                why = self._dotlock(spool_fd, dotlock, f"{path}.lock")
                if why is not None:
                    return why
            try:
                fd = _open_mbox(spool_fd, user, chown)
            except OSError as exc:
                if dotlock:
                    _unlink(dotlock, spool_fd)
                if exc.errno in (errno.ELOOP, errno.EMLINK) and _is_symlink(spool_fd, user):
                    # Postfix safe_open(): "file is a symbolic link", 5.2.0 (mbox_dsn)
                    return make_dsn("5.2.0", f"cannot update mailbox {path} for user "
                                             f"{user}. file is a symbolic link")
                return _fs_dsn(exc, f"cannot open mailbox {path}")
        try:
            with _privileges(rights):
                return self._append(fd, path, user, owner, data)
        finally:
            os.close(fd)
            if dotlock:
                with _privileges(spool_rights):
                    _unlink(dotlock, spool_fd)

    def _append(self, fd: int, path: str, user: str, owner: int | None,
                data: bytes) -> Dsn:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return make_dsn("5.2.0", f"mailbox {path} is not a regular file")
        if owner is not None and st.st_uid != owner:
            # Postfix local/mailbox.c, strict_mailbox_ownership: defer, and warn.
            _warn_owner()
            return make_dsn("4.2.0", f"cannot update mailbox {path} for user {user}. "
                                     f"destination {path} is not owned by recipient")
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

    def _dotlock(self, dir_fd: int, lock: str, shown: str) -> Dsn | None:
        """Create ``lock`` in ``dir_fd`` (O_EXCL, never through a symlink), removing a
        stale one; a Dsn when impossible (``shown`` is its path for the reason)."""
        for attempt in range(self.lock_attempts):
            try:
                os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600, dir_fd=dir_fd))
                return None
            except FileExistsError:
                try:
                    st = os.stat(lock, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile: try again at once
                if time.time() - st.st_mtime > self.stale_lock_time:
                    try:
                        _unlink(lock, dir_fd)
                        continue  # the stale lock is gone: try again at once
                    except OSError:
                        pass  # not ours to remove (another user's, sticky spool): wait
            except OSError as exc:
                return _fs_dsn(exc, f"unable to create lock file {shown}")
            if attempt + 1 < self.lock_attempts:
                time.sleep(self.lock_delay)
        return make_dsn("4.2.0", f"unable to create lock file {shown}: File exists")


class _SymlinkError(Exception):
    """A mailbox path component is a symbolic link (str = its path)."""


class _OwnerError(Exception):
    """A Maildir directory is not owned by the delivery uid (str = its path)."""


def _warn_owner() -> None:
    """Postfix's warning with a strict_mailbox_ownership refusal."""
    log.warning('specify "strict_mailbox_ownership = no" to ignore mailbox ownership '
                "mismatch")


def _getpwnam(name: str) -> pwd.struct_passwd | None:
    """The passwd entry of ``name``, None when there is none."""
    try:
        return pwd.getpwnam(name)
    except (KeyError, ValueError, UnicodeError):
        return None


def _spool_rights(spool_st: os.stat_result, rights: tuple[int, int] | None,
                  ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(rights to lock and open/create an mbox with, (uid, gid) to give a new mbox to)
    for the mail spool directory ``spool_st`` and the delivery ``rights``: Postfix
    local/mailbox.c spool_uid/spool_gid and chown_uid/chown_gid.  World-writable
    spool: the recipient's; group-writable: the recipient's uid with the spool's gid;
    otherwise root's (None: unchanged), a new mbox then being given to the recipient.
    Not root (``rights`` None): nothing changes."""
    if rights is None or spool_st.st_mode & stat.S_IWOTH:
        return rights, None
    if spool_st.st_mode & stat.S_IWGRP:
        return (rights[0], spool_st.st_gid), None
    return None, rights


def _open_mbox(dir_fd: int, name: str, chown: tuple[int, int] | None) -> int:
    """Open mbox ``name`` in ``dir_fd`` for appending, never through a symbolic link;
    a missing one is made (O_EXCL, mode 0600) and given to ``chown`` (uid, gid) when
    that is set, as Postfix safe_open().  Raises OSError."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    while True:
        try:
            return os.open(name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue  # made meanwhile (or a symlink): open it as an existing one
        if chown is not None:
            try:
                os.fchown(fd, *chown)
            except OSError:
                os.close(fd)
                _unlink(name, dir_fd)
                raise
        return fd


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _subdir(dir_fd: int, name: str, shown: str, owner: int | None) -> int:
    """Open directory ``name`` in ``dir_fd`` (made mode 0700 when missing), never through
    a symbolic link, and owned by ``owner`` (None: any owner).  Raises _SymlinkError,
    _OwnerError (``shown``), OSError."""
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(dir_fd, name):
            raise _SymlinkError(shown) from None
        raise
    if owner is not None and os.fstat(fd).st_uid != owner:
        os.close(fd)
        raise _OwnerError(shown)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def main() -> NoReturn:
    """Run the local service under single_server."""
    run(LocalAgent())


if __name__ == "__main__":
    main()
