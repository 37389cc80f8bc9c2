"""agent — the delivery-agent base every transport (smtp, local, discard, error) stands on.

Summary
    One delivery request per connection on ``private/<service>`` (postfix.md §5.2):
    :meth:`DeliveryAgent.serve` announces ``protocol=delivery_request_protocol``, reads
    the request (bounded by qmgrd.delivery), opens ``<queue_name>/<queue_id>`` with a
    shared lock, calls the transport's :meth:`DeliveryAgent.deliver` hook and then, per
    recipient, does what Postfix's ``sent()`` / ``bounce_append()`` / ``defer_append()``
    do (§5.3):

    * ``2.x.x`` — append to ``trace/<id>`` when the recipient asked NOTIFY=SUCCESS or the
      request has the RECORD flag (0x400); log ``status=sent``; mark the ``R`` record done
      when the request has DEL_REQ_FLAG_SUCCESS.
    * ``5.x.x`` — append to ``bounce/<id>``, mark done, log ``status=bounced``. If the
      append fails the recipient is deferred instead (``4.3.0 bounce or trace service
      failure``). With ``soft_bounce = yes`` a 5 becomes a 4 (action ``delayed``).
    * ``4.x.x`` — append to ``defer/<id>``, log ``status=deferred``, leave ``R``.

    The reply is a DeliverStatus: status 0 when every recipient was finished (sent or
    bounced), 1 otherwise, plus the hop DSN when the transport saw a site-level failure
    and something was deferred (negative concurrency feedback for the qmgr).

    A missing, not ready, locked or corrupt queue file defers every recipient with
    ``4.3.0 queue file read error``; a corrupt one is also chmod 0400 so that the qmgr
    moves it to corrupt/ (Postfix mark_corrupt). A file already marked so is warned
    about with one text by every agent: ``<qid>: queue file marked corrupt: delivery
    deferred``. A file that cannot be updated when a finished recipient is marked done
    (a damaged ``R`` record, a failed write) is corrupt too: marked 0400, and that
    recipient is deferred with ``4.3.0 queue file write error`` (it was logged sent or
    bounced first: the delivery happened; the file goes to corrupt/, so it is not
    repeated). A malformed request is logged as a warning and the connection is closed
    without a reply.

    The qmgr writes its request without waiting for the greeting (qmgrd.qmgr.client).
    When the greeting is late it ends its side for writing and gives up on an agent
    that has not greeted by then (it defers the recipients). The request may still wait
    in the socket, so after reading it the agent looks whether EOF follows (a
    non-blocking peek: the qmgr's side shut or closed) and, if so, delivers nothing:
    ``<qid>: the queue manager closed the connection before the delivery began: not
    delivered``. Only our qmgr connects here; a client that half-closes after its
    request gets neither a delivery nor a reply.

    Chrooted (master.cf chroot ``y`` under a root master: Debian's master.cf has it on
    smtp, error, discard...), the agent is configured before the jail and then, in
    :meth:`DeliveryAgent.post_jail`, rebuilds its spool on ``ctx.queue_directory``
    ("/" in the jail), as the qmgr builds its own: every queue file, status log and
    notice (cleanup's incoming/ and public/qmgr) is then reached inside the jail.

    Status-log entries of one request are written with one append per log
    (statuslog.append_many: one fsync for all the request's bounced recipients). A
    transport hook that raises (``software``) and a status log that cannot be written
    (``resource``) also post a postmaster notice when ``notify_classes`` has the class
    (transports.notify).

Public API
    DeliveryAgent                     subclass it; ``name`` is the default service name
        .deliver(req, msg) -> list[tuple[RecipientInfo, Dsn]]     the transport hook
        .setup() -> None              transport hook: read parameters (pre-jail)
        .configure(cfg, service)      load Config-derived state (called by pre_jail)
        async .deliver_async(req, msg)           the hook of a concurrent agent (default:
                                      deliver())
        async .request_done(req)      hook, awaited after the outcomes are recorded (logged,
                                      recipients marked done) and before the reply goes to
                                      the qmgr (default: nothing; transports.smtp: QUIT)
        .pre_jail(ctx), .post_jail(ctx), .serve(conn, ctx)   single_server callbacks
                                      (post_jail: a chrooted agent's spool is rebuilt
                                      on the jail's "/", as the qmgr's)
        async .serve_async(conn, ctx)            multi_server callback (transports.smtp)
        .handle(req) -> DeliverStatus            one request, no socket (tests)
        async .handle_async(req) -> DeliverStatus
        .state: DeliveryState         per-request measurements filled in by deliver();
                                      a context variable: each asyncio task has its own
    DeliveryState(relay="none", conn_setup_done=0.0, hop=None)
        .set_relay(rcpt, relay)       the relay= text for one recipient
    make_dsn(status, reason, **fields) -> Dsn    with the action that fits the status
    run(agent) -> NoReturn            ``single_server(agent.serve, pre_jail=agent.pre_jail,
                                      post_jail=agent.post_jail)``

Logs (master.log, Postfix's log_adhoc shape via qmgrd.logfmt)::

    <qid>: to=<rcpt>, [orig_to=<o>, ]relay=<relay>, delay=<d>, delays=<a>/<b>/<c>/<d>,
        dsn=<x.y.z>, status=sent|bounced|deferred (<reason>)

and warnings for malformed requests, queue file problems and status log failures.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import socket
import time
import traceback
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NoReturn

from master import log
from master.config import ConfigError, describe
from master.server import jail
from master.server.skeleton import ServerContext, single_server
from qmgrd import delivery
from qmgrd.delivery import DeliverRequest, DeliverStatus, ProtocolError, RecipientInfo
from qmgrd.logfmt import delivery_line
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import DSN_NOTIFY_SUCCESS, Recipient
from qmgrd.spool.message import (
    CorruptQueueFile,
    QueueFile,
    QueueFileError,
    QueueFileMarkedCorrupt,
    open_regular,
)
from qmgrd.spool.queue import MESSAGE_QUEUES, Spool
from qmgrd.spool.queueid import valid_id
from qmgrd.spool.statuslog import Dsn
from transports import notify
from transports.privileges import Dropped

if TYPE_CHECKING:
    from master.config import Config

__all__ = ["DEL_REQ_FLAG_RECORD", "DeliveryAgent", "DeliveryState", "Dsn", "make_dsn", "run"]

DEL_REQ_FLAG_RECORD = 0x400
_DSN_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_ACTIONS = {"2": "delivered", "4": "delayed", "5": "failed"}
_READ_ERROR = "queue file read error"
_WRITE_ERROR = "queue file write error"
_STATUS_LOG_ERROR = "bounce or trace service failure"
_AGENT_ERROR = "unknown mail transport error"
# the DeliveryState of the request in hand: one per asyncio task when an agent serves
# several requests at once (multi_server), one per process otherwise
_STATE: contextvars.ContextVar[DeliveryState] = contextvars.ContextVar("delivery_state")


def make_dsn(status: str, reason: str, **fields: str) -> Dsn:
    """A Dsn whose action fits ``status`` (2 delivered, 4 delayed, 5 failed) unless
    ``action=`` is given. ``fields``: action, diag_type, diag_text, mta_type, mta_mname."""
    action = fields.pop("action", "") or _ACTIONS.get(status[:1], "delayed")
    return Dsn(status, action, reason, **fields)


@dataclass
class DeliveryState:
    """What a transport measured while handling one request.

    Attributes:
        relay: the default ``relay=`` text ("none" when no peer was involved).
        conn_setup_done: epoch seconds when the connection set-up ended (0 = none):
            splits delays c (set-up) and d (transmission).
        hop: the site-level DSN for the reply (None = no hop trouble).
        relays: per-recipient relay text, keyed by ``id()`` of the RecipientInfo.
    """

    relay: str = "none"
    conn_setup_done: float = 0.0
    hop: Dsn | None = None
    relays: dict[int, str] = field(default_factory=dict)

    def set_relay(self, rcpt: RecipientInfo, relay: str) -> None:
        """Record the relay= text for one recipient."""
        self.relays[id(rcpt)] = relay

    def relay_for(self, rcpt: RecipientInfo) -> str:
        """The relay= text for ``rcpt``."""
        return self.relays.get(id(rcpt), self.relay)


def _qmgr_gone(conn: socket.socket, req: DeliverRequest) -> bool:
    """True (logged) when the qmgr closed its end before the delivery began: it gave up
    waiting for the greeting and deferred the recipients (module docstring), so the
    request it left in the socket must not be delivered."""
    timeout = conn.gettimeout()
    if timeout:  # Python would wait for readiness first: non-blocking for the look
        conn.settimeout(0.0)
    try:
        gone = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # the qmgr waits for the reply
    except OSError:  # ECONNRESET: the qmgr closed with our greeting unread
        gone = True
    finally:
        if timeout:
            conn.settimeout(timeout)
    if gone:
        log.warning(f"{req.queue_id}: the queue manager closed the connection before the "
                    "delivery began: not delivered")
    return gone


class DeliveryAgent:
    """Base class of the delivery agents (see the module docstring).

    Construction has no side effects; :meth:`configure` (called from pre-jail init, or
    lazily by :meth:`serve`) reads the configuration.
    """

    name = "agent"

    def __init__(self) -> None:
        self.cfg: Config | None = None
        self.spool: Spool | None = None
        self.service = self.name
        self.soft_bounce = False
        self.ipc_timeout = 3600.0
        self.clock = time.time
        self.owner_ids: tuple[int, int] | None = None  # mail_owner's (uid, gid), as root
        self.dropped: Dropped | None = None  # root's ids given up (drop_privileges)

    @property
    def state(self) -> DeliveryState:
        """The DeliveryState of the request in hand (of the current asyncio task when
        requests are served concurrently)."""
        try:
            return _STATE.get()
        except LookupError:
            st = DeliveryState()
            _STATE.set(st)
            return st

    @state.setter
    def state(self, st: DeliveryState) -> None:
        _STATE.set(st)

    # ------------------------------------------------------------------ configuration

    def configure(self, cfg: Config, service: str = "") -> None:
        """Load everything the agent needs from ``cfg`` (before chroot).

        Raises:
            ConfigError: a bad parameter value.
        """
        self.cfg = cfg
        self.service = service or self.name
        self.spool = Spool.from_config(cfg)
        self.soft_bounce = cfg.get_bool("soft_bounce")
        self.ipc_timeout = float(cfg.get_time("ipc_timeout"))
        self.setup()

    def setup(self) -> None:
        """Transport hook: read transport parameters from ``self.cfg`` (pre-jail)."""

    def pre_jail(self, ctx: ServerContext) -> None:
        """single_server pre-jail callback: configure from the server context."""
        self.configure(ctx.config, ctx.service)

    def post_jail(self, ctx: ServerContext) -> None:
        """Skeleton post-jail callback.  Chrooted (master.cf chroot ``y``), the agent
        finds the queue where the qmgr finds it: at ``ctx.queue_directory``, which the
        skeleton made "/" - queue files, status logs and the cleanup path of postmaster
        notices (incoming/, public/qmgr) are then opened inside the jail, not by the
        absolute queue_directory that exists only outside it."""
        if self.spool is not None:
            self.spool = self.spool.at(ctx.queue_directory)
        self.drop_privileges(ctx)

    def keep_mail_owner(self, cfg: Config) -> jail.Owner | None:
        """For an agent that runs as root (local, pipe; called by its setup()):
        mail_owner's account, its ids kept in ``self.owner_ids`` for post_jail's
        drop_privileges; None when not root. Raises ConfigError (mail_owner missing or
        privileged: master.server.jail's words)."""
        if os.geteuid() != 0:
            return None
        try:
            account = jail.lookup_mail_owner(cfg)
        except jail.OwnerError as exc:
            raise ConfigError(str(exc)) from None
        self.owner_ids = (account.uid, account.gid)
        return account

    def drop_privileges(self, ctx: ServerContext) -> None:
        """Give up root's effective ids for mail_owner's (``self.owner_ids``, set by an
        agent that runs as root: local, pipe, through keep_mail_owner; post_jail calls
        this) when this is a service of a root master,
        as Postfix's local and pipe do after their init (set_eugid(var_owner_uid,
        var_owner_gid)): between deliveries the process reads queue files, writes the
        status logs and talks to the qmgr as mail_owner, its real and saved uid staying
        0; :meth:`as_root` gives root back for the part of a delivery that needs it.
        Raises OSError when the switch fails."""
        if self.owner_ids is not None and self.dropped is None and ctx.status_fd is not None:
            self.dropped = Dropped(self.owner_ids)

    def as_root(self) -> AbstractContextManager[None]:
        """A block with root's effective ids when drop_privileges() gave them up (a
        failure to drop them again after it is fatal); else nothing changes."""
        return self.dropped.root() if self.dropped is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ the hook

    def deliver(self, req: DeliverRequest, msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        """Deliver ``msg`` to ``req.recipients``; return one (recipient, Dsn) per recipient.

        Dsn.status "2.x.x" = done, "4.x.x" = try again later, "5.x.x" = bounce. A
        recipient left out is deferred ("4.3.0 unknown mail transport error"). Set
        ``self.state`` fields for relay=, delays and the hop status.

        Raises:
            CorruptQueueFile: the content could not be read (all recipients deferred).
        """
        raise NotImplementedError

    async def deliver_async(self, req: DeliverRequest,
                            msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        """The hook of an agent that serves several requests at once (multi_server):
        as :meth:`deliver`, awaited in the request's own task. The default runs
        :meth:`deliver`."""
        return self.deliver(req, msg)

    async def request_done(self, req: DeliverRequest) -> None:
        """Hook awaited by :meth:`handle_async` once ``req``'s outcomes are recorded (the
        status lines logged, finished recipients marked done in the queue file, the queue
        file closed) and before its reply goes to the qmgr: work that must still count
        against the delivery's concurrency slot but must not hold its outcome back (the
        smtp agent's QUIT, as Postfix's smtp(8) marks a recipient done at the 250 and
        ends the session before it replies). The default does nothing."""

    # ------------------------------------------------------------------ serving

    def serve(self, conn: socket.socket, ctx: ServerContext) -> None:
        """single_server handler: one request and one reply on ``conn``."""
        if self.cfg is None:
            self.configure(ctx.config, ctx.service)
        conn.settimeout(self.ipc_timeout)
        try:
            conn.sendall(delivery.protocol_greeting(delivery.DELIVER_PROTOCOL))
            req = delivery.read_request(conn)
            self._check_request(req)
            if _qmgr_gone(conn, req):
                conn.close()
                return
        except ProtocolError as exc:
            log.warning(f"malformed delivery request: {exc}")
            conn.close()
            return
        except OSError as exc:  # the qmgr went away (restart, kill) before its request
            log.warning(f"cannot read delivery request: {exc.strerror or exc}")
            conn.close()
            return
        reply = self.handle(req)
        try:
            delivery.write_list(conn, reply.to_attrs())
        except (ProtocolError, OSError) as exc:
            log.warning(f"{req.queue_id}: cannot send delivery status: {describe(exc)}")

    @staticmethod
    def _check_request(req: DeliverRequest) -> None:
        if req.queue_name not in MESSAGE_QUEUES:
            raise ProtocolError(f"bad queue name {req.queue_name[:40]!r}")
        if not valid_id(req.queue_id):
            raise ProtocolError(f"bad queue id {req.queue_id[:40]!r}")

    async def serve_async(self, conn: socket.socket, ctx: ServerContext) -> None:
        """multi_server handler: :meth:`serve` on a non-blocking socket, the request
        handled in the caller's task (:meth:`handle_async`); ``ipc_timeout`` seconds to
        read the request and to send the reply."""
        import asyncio  # loaded by the multi_server skeleton before the jail

        loop = asyncio.get_running_loop()
        if self.cfg is None:
            self.configure(ctx.config, ctx.service)
        try:
            async with asyncio.timeout(self.ipc_timeout):
                await loop.sock_sendall(conn, delivery.protocol_greeting(
                    delivery.DELIVER_PROTOCOL))
                req = await delivery.read_request_async(conn)
            self._check_request(req)
            if _qmgr_gone(conn, req):
                return
        except ProtocolError as exc:
            log.warning(f"malformed delivery request: {exc}")
            return
        except OSError as exc:  # the qmgr went away (restart, kill) or timed out
            log.warning(f"cannot read delivery request: {exc.strerror or exc}")
            return
        reply = await self.handle_async(req)
        try:
            async with asyncio.timeout(self.ipc_timeout):
                await loop.sock_sendall(conn, delivery.encode(reply.to_attrs()))
        except (ProtocolError, OSError) as exc:
            log.warning(f"{req.queue_id}: cannot send delivery status: {describe(exc)}")

    def handle(self, req: DeliverRequest) -> DeliverStatus:
        """Process one decoded request (no socket): open the file, deliver, record.

        Raises:
            Panic: the agent was not configured.
        """
        msg = self._begin(req)
        if isinstance(msg, DeliverStatus):
            return msg
        with msg:
            try:
                results = self.deliver(req, msg)
            except Exception as exc:  # noqa: BLE001 - the request boundary: contain any agent bug
                return self._failed(req, msg, exc)
            return self._finish(req, msg, results)

    async def handle_async(self, req: DeliverRequest) -> DeliverStatus:
        """:meth:`handle` with the :meth:`deliver_async` hook (the request's own
        DeliveryState, so that concurrent requests do not mix their measurements).

        Raises:
            Panic: the agent was not configured.
        """
        msg = self._begin(req)
        if isinstance(msg, DeliverStatus):
            return msg
        with msg:
            try:
                results = await self.deliver_async(req, msg)
            except Exception as exc:  # noqa: BLE001 - the request boundary: contain any agent bug
                reply = self._failed(req, msg, exc)
            else:
                reply = self._finish(req, msg, results)
        await self.request_done(req)
        return reply

    def _begin(self, req: DeliverRequest) -> QueueFile | DeliverStatus:
        """A fresh DeliveryState and the open queue file, or the reply that defers
        every recipient when the file cannot be opened."""
        if self.spool is None:
            log.panic("delivery agent used before configure()")
        self.state = DeliveryState()
        if not req.handoff:
            req.handoff = self.clock()
        try:
            return QueueFile.open_content(self.spool, req.queue_name, req.queue_id)
        except QueueFileMarkedCorrupt as exc:
            # one text for every agent, whether its open was refused (mail_owner:
            # EACCES on the 0400 file) or not (the root local agent)
            log.warning(f"{exc}: delivery deferred")
            return self._finish_all(req, None, make_dsn("4.3.0", _READ_ERROR))
        except (QueueFileError, OSError) as exc:
            log.warning(f"{req.queue_id}: cannot open queue file: {exc}")
            if isinstance(exc, CorruptQueueFile):
                self._chmod_corrupt(req)
            return self._finish_all(req, None, make_dsn("4.3.0", _READ_ERROR))

    def _failed(self, req: DeliverRequest, msg: QueueFile, exc: Exception) -> DeliverStatus:
        """The reply after the transport hook raised ``exc`` (called in the except
        block): a read error defers (a corrupt file is marked for the qmgr), any other
        exception is an agent bug - logged with its traceback, deferred, and a
        ``software`` postmaster notice."""
        if isinstance(exc, QueueFileError):
            log.warning(f"{req.queue_id}: queue file read error: {exc}")
            if isinstance(exc, CorruptQueueFile):
                try:
                    msg.mark_corrupt()
                except OSError as err:
                    log.warning(f"{req.queue_id}: cannot mark corrupt: {err}")
            return self._finish_all(req, msg, make_dsn("4.3.0", _READ_ERROR))
        trace = traceback.format_exc()
        log.error(f"{req.queue_id}: delivery agent failed: " + trace.replace("\n", " | "))
        reply = self._finish_all(req, msg, make_dsn("4.3.0", _AGENT_ERROR))
        self._error_notice("software", req, trace)
        return reply

    def _chmod_corrupt(self, req: DeliverRequest) -> None:
        assert self.spool is not None
        try:  # not through a symbolic link (qmgrd.spool.message.open_regular): the
            # qmgr moves a link to corrupt/ itself (it is never a ready queue file)
            fd, _ = open_regular(self.spool.path(req.queue_name, req.queue_id), os.O_RDONLY)
            try:
                os.fchmod(fd, 0o400)
            finally:
                os.close(fd)
        except (QueueFileError, OSError, ValueError) as exc:
            log.warning(f"{req.queue_id}: cannot mark corrupt: {exc}")

    def _finish_all(self, req: DeliverRequest, msg: QueueFile | None, dsn: Dsn) -> DeliverStatus:
        return self._finish(req, msg, [(r, dsn) for r in req.recipients])

    def _finish(
        self,
        req: DeliverRequest,
        msg: QueueFile | None,
        results: list[tuple[RecipientInfo, Dsn]],
    ) -> DeliverStatus:
        by_id = {id(r): d for r, d in results}
        outcomes = [(rcpt, self._normalize(req, rcpt, by_id.get(id(rcpt))
                                           or make_dsn("4.3.0", _AGENT_ERROR)))
                    for rcpt in req.recipients]
        written = self._append_logs(req, outcomes)
        unfinished = 0
        for rcpt, dsn in outcomes:
            if not self._record(req, msg, rcpt, dsn, id(rcpt) in written):
                unfinished += 1
        reply = DeliverStatus(status=1 if unfinished else 0)
        hop = self.state.hop
        if hop is not None and unfinished:
            reply.dsn_status = hop.status
            reply.diag_type, reply.diag_text = hop.diag_type, hop.diag_text
            reply.mta_type, reply.mta_mname = hop.mta_type, hop.mta_mname
            reply.action = hop.action or "delayed"
            reply.reason = hop.reason
        return reply

    # ------------------------------------------------------------------ per recipient

    def _normalize(self, req: DeliverRequest, rcpt: RecipientInfo, dsn: Dsn) -> Dsn:
        """A checked status (bad codes become 4.3.0), soft_bounce applied, with the action
        that fits it (delivered unless the transport said e.g. relayed, failed, delayed)."""
        if not _DSN_RE.match(dsn.status):
            log.warning(f"{req.queue_id}: bad status {dsn.status!r} for {rcpt.address}")
            dsn = make_dsn("4.3.0", _AGENT_ERROR)
        if dsn.status[0] == "5" and self.soft_bounce:
            dsn = replace(dsn, status="4" + dsn.status[1:], action="delayed")
        if dsn.status[0] == "2":
            return replace(dsn, action=dsn.action or "delivered")
        return replace(dsn, action="failed" if dsn.status[0] == "5" else "delayed")

    @staticmethod
    def _status_log(req: DeliverRequest, rcpt: RecipientInfo, dsn: Dsn) -> str:
        """The status log a (normalized) outcome goes to ("" = none)."""
        if dsn.status[0] == "2":
            if rcpt.notify & DSN_NOTIFY_SUCCESS or req.flags & DEL_REQ_FLAG_RECORD:
                return "trace"
            return ""
        return "bounce" if dsn.status[0] == "5" else "defer"

    @staticmethod
    def _status_entry(req: DeliverRequest, rcpt: RecipientInfo, dsn: Dsn) -> Dsn:
        """The status-log entry of a (normalized) outcome: the outcome itself (a
        transport may report otherwise, e.g. transports.local's ``alias expanded``)."""
        return dsn

    def _append_logs(self, req: DeliverRequest,
                     outcomes: list[tuple[RecipientInfo, Dsn]]) -> set[int]:
        """Write the request's status-log entries, one append (one fsync) per log; return
        the ``id()`` of every recipient whose entry was written."""
        assert self.spool is not None
        groups: dict[str, list[tuple[RecipientInfo, Dsn]]] = {}
        for rcpt, dsn in outcomes:
            name = self._status_log(req, rcpt, dsn)
            if name:
                groups.setdefault(name, []).append((rcpt, dsn))
        written: set[int] = set()
        for name, items in groups.items():
            entries = [(_env_rcpt(r), self._status_entry(req, r, d)) for r, d in items]
            if name == "trace":
                # Postfix trace_append(): a success notice (or sendmail -v report)
                # says which agent or server took the mail, "delivery via <relay>: "
                entries = [(e, self._traced(r, d)) for (e, d), (r, _) in zip(entries, items)]
            try:
                statuslog.append_many(self.spool, name, req.queue_id, entries)
            except (OSError, ValueError) as exc:
                log.warning(f"{req.queue_id}: {name} log append: {exc}")
                self._error_notice("resource", req, f"{name} log append: {exc}")
                continue
            written.update(id(r) for r, _ in items)
        return written

    def _traced(self, rcpt: RecipientInfo, dsn: Dsn) -> Dsn:
        """A trace-log entry's text, as Postfix's trace_append() writes it: ``delivery
        via <relay>: <reason>`` (relay as the ``relay=`` of the log line; no prefix for
        ``none``)."""
        relay = self.state.relay_for(rcpt)
        if relay == "none":
            return dsn
        return replace(dsn, reason=f"delivery via {relay}: {dsn.reason}")

    def _record(self, req: DeliverRequest, msg: QueueFile | None, rcpt: RecipientInfo,
                dsn: Dsn, logged: bool) -> bool:
        """Log and settle one recipient's (normalized) outcome whose status-log entry was
        ``logged`` or not; True when the recipient is finished."""
        if dsn.status[0] == "4":
            self._log(req, rcpt, dsn, "deferred")
            return False
        if not logged and self._status_log(req, rcpt, dsn):
            return self._defer(req, rcpt, _env_rcpt(rcpt), make_dsn("4.3.0", _STATUS_LOG_ERROR))
        self._log(req, rcpt, dsn, "sent" if dsn.status[0] == "2" else "bounced")
        if msg is not None and (dsn.status[0] == "5" or req.flags & delivery.DEL_REQ_FLAG_SUCCESS):
            return self._mark_done(req, msg, rcpt)
        return True

    def _defer(
        self, req: DeliverRequest, rcpt: RecipientInfo, env_rcpt: Recipient, dsn: Dsn
    ) -> bool:
        assert self.spool is not None
        try:
            statuslog.append(self.spool, "defer", req.queue_id, env_rcpt, dsn)
        except (OSError, ValueError) as exc:
            log.warning(f"{req.queue_id}: defer log append: {exc}")
        self._log(req, rcpt, dsn, "deferred")
        return False

    def _error_notice(self, klass: str, req: DeliverRequest, text: str) -> None:
        """A postmaster notice per notify_classes (transports.notify)."""
        if self.cfg is not None and self.spool is not None:
            notify.error_notice(self.cfg, self.spool, klass, service=self.service,
                                qid=req.queue_id, sender=req.sender, text=text)

    def _mark_done(self, req: DeliverRequest, msg: QueueFile, rcpt: RecipientInfo) -> bool:
        """Mark the finished ``rcpt`` done in the queue file; True when it is done.

        A file that cannot be updated (its ``R`` record damaged, the write failed) is a
        corrupt file, as in Postfix: it is marked (0400) so that the qmgr moves it to
        corrupt/ when the message completes, and the recipient is reported deferred
        with ``4.3.0 queue file write error`` - never finished, which would let the
        qmgr remove the file, and never delivered again, as the file leaves the queue.
        """
        if rcpt.offset <= 0:
            log.warning(f"{req.queue_id}: recipient {rcpt.address} has no file offset")
            return True
        try:
            msg.mark_done(rcpt.offset)
        except (QueueFileError, OSError) as exc:
            log.warning(f"{req.queue_id}: cannot update queue file: {exc}: "
                        "marking it corrupt")
            try:
                msg.mark_corrupt()
            except OSError as err:
                log.warning(f"{req.queue_id}: cannot mark corrupt: {err}")
            return self._defer(req, rcpt, _env_rcpt(rcpt), make_dsn("4.3.0", _WRITE_ERROR))
        return True

    def _log(self, req: DeliverRequest, rcpt: RecipientInfo, dsn: Dsn, status: str) -> None:
        log.info(delivery_line(
            req.queue_id, rcpt.address, rcpt.orig_rcpt, self.state.relay_for(rcpt),
            req.arrival, req.active_arrival, req.handoff, self.state.conn_setup_done,
            self.clock(), dsn.status, status, dsn.reason,
        ))


def _env_rcpt(rcpt: RecipientInfo) -> Recipient:
    return Recipient(rcpt.address, rcpt.orig_rcpt, rcpt.dsn_orcpt, rcpt.notify, rcpt.offset)


def run(agent: DeliveryAgent) -> NoReturn:
    """Serve ``agent`` under the single_server skeleton (the ``main()`` of an agent)."""
    single_server(agent.serve, pre_jail=agent.pre_jail, post_jail=agent.post_jail)
