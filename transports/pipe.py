"""pipe — the pipe(8) delivery agent: deliver to an external command.

Summary
    Postfix's pipe(8), so that its master.cf lines can be pasted (content filters,
    dovecot-lda, mailman, maildrop)::

        dovecot   unix  -  n  n  -  -  pipe
          flags=DRXhu user=vmail:vmail argv=/usr/lib/dovecot/deliver -f ${sender} -d ${recipient}

    The service runs as root (unpriv ``n``) so that it can run each command as the
    ``user=`` account; the command never runs as root nor as mail_owner.  The command
    attributes (flags=, user=, argv=, directory=, eol=, null_sender=, size=, umask=)
    are parsed by master.config.pipeattr at start-up - and already by ``qmgr-master
    start``/``reload`` - with Postfix's fatal messages, prefixed with ``service
    <name>:``.

    Per delivery request, in Postfix's order (pipe.c deliver_message):

    * flag ``D`` or ``O`` with more than one recipient: every recipient deferred,
      ``4.3.5 mail system configuration error``, and the warning ``pipe flag `D'
      requires <service>_destination_recipient_limit = 1`` (the qmgr applies that
      limit as for any transport);
    * ``size=`` exceeded (the message's content size, bytes): bounced, ``5.2.3 message
      too large``;
    * flag ``D`` and a ``Delivered-To:`` header with the recipient (case-insensitive):
      bounced, ``5.4.6 mail forwarding loop for <recipient>``;
    * the argv macros are expanded (:func:`expand_argv`): an unknown macro defers
      every recipient, ``4.3.5 mail system configuration error``, with the warning
      ``file <config_directory>/master.cf: service <name>: unknown macro name:
      "<name>"``;
    * the command runs once for the whole request (transports.pipe_command), with the
      message as transports.mailcopy writes it for ``flags=`` and ``eol=``, the sender
      (empty: ``null_sender=``) and the first recipient; as the user; in
      ``directory=`` (default: the queue directory); with ``umask=`` (default 077);
      with Postfix's environment: the ``export_environment`` variables (default TZ
      MAIL_CONFIG LANG) of the environment Postfix's master gives its daemons -
      ``import_environment``'s ``name=value`` entries set (``LANG=C`` whatever the
      starting shell had), its plain names taken when set, ``MAIL_CONFIG`` the
      configuration directory - and ``PATH=/usr/bin:/bin``; for at most
      ``<service>_time_limit`` seconds (default ``$command_time_limit``, 1000s);
    * its end decides every recipient's outcome (transports.pipe_command's table):
      exit 0 is ``2.0.0 delivered via <service> service`` (plus `` (<output>)``, the
      first 100 bytes of the command's output, when it wrote some), with the DSN
      action ``delivered`` under flag ``X`` (final delivery) and ``relayed`` without;
      failures defer (4.x.x) or bounce (5.x.x) with Postfix's texts, the output in the
      reason and, as ``x-unix`` diagnostic, in the bounce notice.

    Log lines: ``<qid>: to=<rcpt>, relay=<service>, delay=..., delays=...,
    dsn=2.0.0, status=sent (delivered via <service> service (<output>))`` and the
    deferred/bounced forms, through the agent base.

    Macros (Postfix pipe(8)): ${sender} (flag ``q`` quotes it), ${nexthop} (``h``
    lower-cases it), ${size}, ${queue_id}, ${client_address}, ${client_hostname},
    ${client_helo}, ${client_protocol}, ${client_port}, ${sasl_method},
    ${sasl_username}, ${sasl_sender} (always empty: qmgrd has no SASL), and per
    recipient ${recipient}, ${original_recipient} (``q``, ``h``, ``u`` apply),
    ${user}, ${extension} (split at ``recipient_delimiter``), ${mailbox}, ${domain}
    (``h``, ``u`` apply).  An argument that holds a per-recipient macro is repeated
    once per recipient; one holding ${user} is left out for a recipient whose user
    part is empty (Postfix: cyrus bulletin boards).

    master.cf chroot ``y`` (Postfix's master(5): "should not be used" with pipe, but
    allowed): the agent opens the queue inside the jail and runs the command there,
    in ``directory=`` (default: the queue directory, "/" in the jail), so the command
    must exist under queue_directory (a ``#!`` script: its interpreter and the
    libraries too); otherwise the mail is deferred with Postfix's ``temporary
    failure. Command output: pipe: fatal: pipe_command: execvp <argv0>: No such file
    or directory``.

    Not supported: ``chroot=`` (refused at start), trace-only requests (sendmail -bv:
    qmgrd has none), the ``${name?text}`` / ``${name:text}`` conditional forms (unknown
    macros), ``pipe_delivery_status_filter``.

Public API
    PipeAgent(DeliveryAgent)          PipeAgent(args=None); .setup(); .deliver(req, msg)
    expand_argv(command, req, flags, delimiter, null_sender) -> list[str]
        raises UnknownMacro(name)
    split_addr(localpart, delimiters) -> tuple[str, str | None]      Postfix split_addr()
    main() -> NoReturn                ``python -m transports.pipe``

Raises / logs
    ConfigError at start-up (a bad attribute; skeleton: ``fatal: service <name>:
    ...``, exit 1, the master throttles the service).  The warnings above, and those
    of transports.pipe_command.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NoReturn

from master import log
from master.config import ConfigError
from master.config.pipeattr import (
    MACROS,
    RECIPIENT_MACROS,
    PipeAttrError,
    PipeAttrs,
    parse_macros,
    parse_pipe_args,
)
from master.server.skeleton import ServerContext
from qmgrd.delivery import DeliverRequest, RecipientInfo
from qmgrd.spool.message import QueueFile
from qmgrd.spool.statuslog import quote_822_local
from transports.agent import DeliveryAgent, Dsn, make_dsn, run
from transports.mailcopy import delivered_to, mail_copy
from transports.pipe_command import run_command

__all__ = ["PipeAgent", "UnknownMacro", "expand_argv", "main", "split_addr"]

COMMAND_PATH = "/usr/bin:/bin"  # Postfix: _PATH_DEFPATH
_CONFIG_ERROR = "mail system configuration error"
_SUCCESS_OUTPUT = 100  # bytes of output in the success text (Postfix "%.100s")
_MAIL_DAEMON = "MAILER-DAEMON"
_POSTMASTER = "postmaster"
_DOUBLE_BOUNCE = "double-bounce"


class UnknownMacro(Exception):
    """An argv macro pipe(8) does not know (str = its name)."""


def split_addr(localpart: str, delimiters: str) -> tuple[str, str | None]:
    """(user, extension) of a local part, as Postfix's split_addr(): cut at the first
    character of ``delimiters``; not for postmaster, MAILER-DAEMON, double-bounce,
    nor - when ``-`` is a delimiter - owner-* and *-request, nor when the delimiter is
    the first character.  extension None: not split."""
    if not delimiters:
        return localpart, None
    low = localpart.lower()
    if low in (_POSTMASTER, _MAIL_DAEMON.lower(), _DOUBLE_BOUNCE):
        return localpart, None
    if "-" in delimiters and (low.startswith("owner-") or
                              (len(low) > 8 and low.endswith("-request"))):
        return localpart, None
    cut = next((i for i, c in enumerate(localpart) if c in delimiters), -1)
    if cut <= 0:
        return localpart, None
    return localpart[:cut], localpart[cut + 1:]


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _casefold_utf8(text: str) -> str:
    """Postfix casefold() with smtputf8_enable = yes: Unicode full case folding
    (``Straße`` -> ``strasse``, ``ΣΑΣ`` -> ``σασ``), as ICU's u_strFoldCase."""
    return text.casefold()


def _casefold_ascii(text: str) -> str:
    """Postfix casefold() with smtputf8_enable = no: ASCII letters only."""
    return text.translate(_ASCII_LOWER)


# set by PipeAgent.setup() from smtputf8_enable (default yes)
casefold = _casefold_utf8


def _fold(address: str, flags: frozenset[str]) -> str:
    """Postfix fold_addr(): ``u`` case-folds the local part, ``h`` the domain (an
    address without ``@`` is all local part), with Postfix's casefold()."""
    user, fold_host = "u" in flags, "h" in flags
    if user and fold_host:
        return casefold(address)
    at = address.rfind("@")
    if at < 0:
        return casefold(address) if user else address
    if user:
        return casefold(address[:at]) + address[at:]
    if fold_host:
        return address[:at] + casefold(address[at:])
    return address


def _morph(address: str, flags: frozenset[str], quote: bool = True) -> str:
    """A recipient address as the command sees it: quoted (``q``), then folded."""
    if quote and "q" in flags:
        address = quote_822_local(address)
    return _fold(address, flags)


def _split_at(address: str) -> tuple[str, str | None]:
    at = address.rfind("@")
    if at < 0:
        log.warning(f"no @ in recipient address: {address}")
        return address, None
    return address[:at], address[at + 1:]


def _request_values(req: DeliverRequest, flags: frozenset[str],
                    null_sender: str) -> dict[str, str]:
    """The macros that do not depend on the recipient (Postfix deliver_message)."""
    sender = req.sender or null_sender
    if sender and "q" in flags:
        sender = quote_822_local(sender)
    return {
        "sender": sender,
        "nexthop": casefold(req.nexthop) if "h" in flags else req.nexthop,
        "size": str(req.size),
        "queue_id": req.queue_id,
        "client_address": req.client_address,
        "client_hostname": req.client_name,
        "client_helo": req.helo_name,
        "client_protocol": req.protocol_name,
        "client_port": req.client_port,
        "sasl_method": "",
        "sasl_username": "",
        "sasl_sender": "",
    }


def _recipient_values(rcpt: RecipientInfo, names: set[str], flags: frozenset[str],
                      delimiter: str) -> dict[str, str] | None:
    """The per-recipient macros ``names`` for ``rcpt``; None when ${user} is empty
    (the argument is then left out for this recipient, as in Postfix)."""
    values: dict[str, str] = {}
    if "recipient" in names:
        values["recipient"] = _morph(rcpt.address, flags)
    if "original_recipient" in names:
        values["original_recipient"] = _morph(rcpt.orig_rcpt or rcpt.address, flags)
    if names & {"user", "extension", "mailbox", "domain"}:
        local, domain = _split_at(_morph(rcpt.address, flags, quote=False))
        user, extension = split_addr(local, delimiter)
        if "user" in names:
            if not user:
                return None
            values["user"] = user
        values["extension"] = extension or ""
        values["mailbox"] = local
        values["domain"] = domain or ""
    return values


def expand_argv(command: Sequence[str], req: DeliverRequest, flags: frozenset[str],
                delimiter: str, null_sender: str = _MAIL_DAEMON) -> list[str]:
    """The command's argument vector for ``req`` (module docstring: Macros).  Not
    recursive: a ``$`` in an address stays as it is.

    Raises:
        UnknownMacro: a macro pipe(8) does not know (the first one).
    """
    common = _request_values(req, flags, null_sender)
    out: list[str] = []
    for arg in command:
        parts = parse_macros(arg)
        names = {text for is_macro, text in parts if is_macro}
        for name in names:
            if name not in MACROS:
                raise UnknownMacro(name)
        if not names & RECIPIENT_MACROS:
            out.append("".join(common[t] if m else t for m, t in parts))
            continue
        for rcpt in req.recipients:
            values = _recipient_values(rcpt, names, flags, delimiter)
            if values is None:
                continue
            values.update(common)
            out.append("".join(values[t] if m else t for m, t in parts))
    return out


class PipeAgent(DeliveryAgent):
    """The pipe(8) agent (see the module docstring)."""

    name = "pipe"

    def __init__(self, args: Sequence[str] | None = None) -> None:
        super().__init__()
        self.args = list(args or [])
        self.attrs: PipeAttrs | None = None
        self.time_limit = 1000.0
        self.delimiter = ""
        self.workdir = ""
        self.env: dict[str, str] = {}
        self.run_as: tuple[int, int] | None = None
        self.master_cf = "master.cf"

    def pre_jail(self, ctx: ServerContext) -> None:
        """single_server pre-jail callback: the service's arguments, then configure.

        Raises:
            ConfigError: ``service <name> requires privileged operation`` (Postfix's
            words) when the master would drop this process to mail_owner (master.cf
            unpriv ``y`` under a root master): it could not run commands as user=.
        """
        if ctx.unpriv:
            raise ConfigError(f"service {ctx.service} requires privileged operation")
        self.args = list(ctx.args)
        super().pre_jail(ctx)

    def post_jail(self, ctx: ServerContext) -> None:
        """Skeleton post-jail callback: chrooted (master.cf chroot ``y``), the default
        ``directory=`` is the queue directory as the jail sees it ("/"), as in
        Postfix, whose pipe(8) then runs its command inside the chroot: argv[0] (and
        a script's interpreter, and the libraries they load) must exist under
        queue_directory, or the delivery defers (``execvp ...: No such file or
        directory``).  An explicit ``directory=`` is a path inside the jail too."""
        # super() also gives up root's effective ids for mail_owner's, as Postfix's pipe
        # (DeliveryAgent.drop_privileges): root only to start a command as its user=
        # and to stop it (deliver)
        super().post_jail(ctx)
        if self.attrs is not None and not self.attrs.directory:
            self.workdir = ctx.queue_directory

    def setup(self) -> None:
        """Parse the command attributes and read the pipe parameters (pre-jail).

        Raises:
            ConfigError: ``service <name>: <Postfix's message>`` for a bad attribute
            (master.config.pipeattr); a bad ``<service>_time_limit``.
        """
        cfg = self.cfg
        assert cfg is not None
        account = self.keep_mail_owner(cfg)
        owner = (account.uid, account.gid, account.name) if account is not None else None
        try:
            attrs = parse_pipe_args(self.args, owner)
        except PipeAttrError as exc:
            raise ConfigError(f"service {self.service}: {exc}") from None
        self.attrs = attrs
        self.time_limit = float(cfg.transport_time(self.service, "_time_limit"))
        global casefold
        casefold = _casefold_utf8 if cfg.get_bool("smtputf8_enable") else _casefold_ascii
        self.delimiter = cfg.get("recipient_delimiter")
        self.workdir = attrs.directory or cfg.queue_directory()
        self.run_as = (attrs.uid, attrs.gid) if os.geteuid() == 0 else None
        self.master_cf = os.path.join(cfg.config_directory, "master.cf")
        self.env = self._environment()

    def _environment(self) -> dict[str, str]:
        """Postfix's command environment (module docstring)."""
        assert self.cfg is not None
        # Postfix's master keeps only import_environment: ``name=value`` sets the value
        # (LANG=C whatever the starting shell had), ``name`` imports it when set
        imported: dict[str, str] = {}
        for item in self.cfg.get_list("import_environment"):
            name, eq, value = item.partition("=")
            if eq:
                imported[name] = value
            elif name in os.environ:
                imported[name] = os.environ[name]
        imported["MAIL_CONFIG"] = self.cfg.config_directory
        env = {name: imported[name] for name in self.cfg.get_list("export_environment")
               if name in imported}
        env["PATH"] = COMMAND_PATH
        return env

    def deliver(self, req: DeliverRequest, msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        """Run the command for ``req`` (module docstring); one outcome for every
        recipient.

        Raises:
            CorruptQueueFile: the content could not be read (read before the command
            runs, so that a damaged file never reaches it).
        """
        attrs = self.attrs
        if attrs is None:
            raise ConfigError("pipe agent used before setup()")
        self.state.relay = self.service
        rcpts = req.recipients
        for flag in ("D", "O"):
            if flag in attrs.flags and len(rcpts) > 1:
                log.warning(f"pipe flag `{flag}' requires "
                            f"{self.service}_destination_recipient_limit = 1")
                return self._all(req, make_dsn("4.3.5", _CONFIG_ERROR))
        if attrs.size_limit and req.size > attrs.size_limit:
            return self._all(req, make_dsn("5.2.3", "message too large"))
        lines = list(msg.iter_lines())
        if "D" in attrs.flags and rcpts[0].address.lower() in delivered_to(lines):
            return self._all(req, make_dsn("5.4.6",
                                           f"mail forwarding loop for {rcpts[0].address}"))
        try:
            argv = expand_argv(attrs.command, req, attrs.flags, self.delimiter,
                               attrs.null_sender)
        except UnknownMacro as exc:
            log.warning(f'file {self.master_cf}: service {self.service}: '
                        f'unknown macro name: "{exc}"')
            return self._all(req, make_dsn("4.3.5", _CONFIG_ERROR))
        first = rcpts[0]
        data = mail_copy(lines, attrs.flags, sender=req.sender or attrs.null_sender,
                         orig_rcpt=first.orig_rcpt or first.address, rcpt=first.address,
                         eol=attrs.eol)
        uid, gid = self.run_as if self.run_as is not None else (None, None)
        with self.as_root():  # to become user= in the child, and to kill its group
            result = run_command(argv, data, uid=uid, gid=gid, cwd=self.workdir,
                                 env=self.env, umask=attrs.umask,
                                 time_limit=self.time_limit)
        if result.ok:
            text = f"delivered via {self.service} service"
            # Postfix "%.100s": 100 bytes (here cut at a character boundary)
            said = result.output.rstrip().encode()[:_SUCCESS_OUTPUT].decode(
                "utf-8", "ignore")
            if said:
                text += f" ({said})"
            action = "delivered" if "X" in attrs.flags else "relayed"
            return self._all(req, make_dsn("2.0.0", text, action=action))
        return self._all(req, make_dsn(result.dsn, result.reason, diag_type="x-unix",
                                       diag_text=result.diag))

    @staticmethod
    def _all(req: DeliverRequest, dsn: Dsn) -> list[tuple[RecipientInfo, Dsn]]:
        return [(rcpt, dsn) for rcpt in req.recipients]


def main() -> NoReturn:
    """Run the pipe service under single_server (transports.agent.run: post_jail too)."""
    run(PipeAgent())


if __name__ == "__main__":
    main()
