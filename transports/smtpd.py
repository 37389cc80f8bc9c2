"""smtpd — smtpd(8): the SMTP server that takes mail in from the network.

Summary
    An ``inet`` service of master.cf (the bundled line: ``127.0.0.1:2525 inet n - n - -
    smtpd``): the master opens the listening socket and passes it (fd 6..) to the smtpd
    processes it starts on demand, up to maxproc. aiosmtpd speaks the protocol
    (transports.smtpd_session); the policy (transports.smtpd_policy) and the path into the
    queue are ours:

    * **Process model**: as Postfix, a process serves one client at a time: it tells the
      master "idle" while it has no session and "busy" while it has one, so the master
      starts processes on demand up to maxproc (and counts a use per session).
      ``smtpd_process_busy_sessions`` (qmgrd's own, default 1) raises the number of
      sessions a process takes at once before it says "busy": fewer processes (about
      8 MiB each), at the price of pflogsumm's ``--smtpd-stats`` connection counts, which
      pair ``connect from`` with ``disconnect from`` by pid. Starting a
      Python process costs about 0.3 s of CPU, so when a client has waited
      ``OVERFLOW_DELAY`` (10 s) in the listen queue while this process is busy (a burst,
      or the service at maxproc), the process takes waiting clients too, up to
      ``smtpd_process_session_limit`` (20) sessions at once on its asyncio loop. For the
      same reason each process serves ``max_use`` x smtpd_process_session_limit sessions
      (2,000 by default) before it retires: then it reports busy, keeps accepting for
      ``HANDOVER`` s (so the master can start its successor while clients are served),
      stops accepting and exits when its sessions are done. With no session for
      ``max_idle`` seconds it exits. On EOF of the status channel (master reload or exit)
      it stops accepting and lets its sessions finish; on SIGTERM (master stop) it drops
      them at once - nothing that was not answered 250 is queued. pflogsumm pairs
      ``connect from`` / ``disconnect from`` lines by pid: its connection counts are
      exact while no process serves two sessions at once (no overflow).
    * **Connection count**: at most ``smtpd_client_connection_count_limit`` (50)
      simultaneous sessions per client address, counted across all smtpd processes
      (smtpd_policy.ConnectionCounter: byte-range locks on ``pid/smtpd.conn`` in the
      queue directory, opened before the jail), except clients in
      ``smtpd_client_event_limit_exceptions`` (default ``$mynetworks``).
    * **SMTP smuggling** (Postfix >= 3.9 defaults): ``smtpd_forbid_bare_newline``
      (normalize; yes = normalize; reject; no), ``smtpd_forbid_bare_newline_exclusions``
      (``$mynetworks``), ``smtpd_forbid_bare_newline_reject_code`` (550): see
      transports.smtpd_session and transports.smtpd_tx.read_data.
    * **Into the queue**: ``Cleanup.submit(origin="smtp")`` - the one way into incoming/,
      file complete, fchmod'ed ready and fsynced before it returns - so the ``250`` comes
      only after that. The cleanup runs in the smtpd process (no cleanup daemon) and blocks
      its event loop for the write + fsync (no helper threads; other clients are served
      by other processes, so their fsyncs overlap, as Postfix's cleanup processes do).
      smtpd's ``Received:`` header gets the queue id and ``<qid>: client=<name>[<addr>]``
      is logged when the id is assigned (SmtpdCleanup hooks Cleanup._build for that: see
      its docstring). A message that exceeds ``hopcount_limit`` is queued and
      bounced by cleanup (5.4.6), as the corpus README asks, not refused at SMTP time.
    * **TLS**: STARTTLS is offered when ``smtpd_tls_cert_file`` (and
      ``smtpd_tls_key_file``, default the same file) is set and
      ``smtpd_tls_security_level`` is not ``none``; ``encrypt`` makes it mandatory before
      MAIL. A certificate that cannot be loaded is fatal under ``encrypt``, a warning
      (no STARTTLS) otherwise.
    * **Inbound flow control** (``in_flow_delay``, qmgrd.flow): the master passes its
      flow-control pipe as fds 3/4 to every child; the qmgr puts one token per message it
      moves from incoming/ to active/ (and tops the pipe up to default_process_limit when
      its incoming scan is idle). Before each Cleanup.submit smtpd takes one token,
      waiting up to in_flow_delay (0: off) when there is none, then goes on anyway:
      producers are slowed, never blocked, and a burst of inbound mail cannot starve
      outbound delivery. Only the session waits (it looks for a token every FLOW_POLL
      seconds): the other sessions of the process go on.
    * The log tag is ``<syslog_name>/smtpd`` (the program, as Postfix), whatever the
      master.cf service name (an address such as ``127.0.0.1:2525``).

    Everything is imported and opened before the jail (pre_jail): the policy (tables,
    resolver configuration), the TLS context, dnspython's lazily loaded modules; spool and
    cleanup are built after it from ``ctx.queue_directory``.

Public API
    SmtpdServer(ctx, params, policy, cleanup, tls_context=None, tls_required=False,
                counter=None)             async .serve() -> None: the process's main loop
    SmtpdCleanup(cfg, spool)              Cleanup + Received: queue id + client= line
        .submit_smtp(env, content, namaddr, received) -> str
    tls_context(cfg) -> (ssl.SSLContext | None, required: bool)
    main() -> NoReturn                    ``python -m transports.smtpd``

Logs: see transports.smtpd_session; ``warning: accept: <error>`` when accept(2) fails;
``warning: cannot start a session: <exception>`` when a session cannot be set up on an
accepted connection (the connection is closed, the process serves the next client).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any, NoReturn

import dns.asyncbackend
import dns.asyncresolver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from master import log
from master.config import Config
from master.server.skeleton import ServerContext, async_server, watch_listeners
from qmgrd.flow import flow_get
from qmgrd.spool.cleanup import Cleanup, _Headers
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.queue import Spool
from transports.smtpd_policy import ConnectionCounter, LazyResolver, Policy, PolicyError
from transports.smtpd_session import SmtpdParams, SmtpdSession

__all__ = ["HANDOVER", "OVERFLOW_DELAY", "SmtpdCleanup", "SmtpdServer", "main", "tls_context"]

HANDOVER = 2.0  # seconds a retiring process keeps accepting after reporting busy
FLOW_POLL = 0.02  # seconds between looks for an inbound flow token while waiting
OVERFLOW_DELAY = 10.0  # seconds a client waits before a busy process takes it too
COUNTER_FILE = "smtpd.conn"  # in <queue_directory>/pid: per-client session counts
_ACCEPT_BATCH = 16


class SmtpdCleanup(Cleanup):
    """Cleanup that completes smtpd's Received: header with the queue id and logs
    ``<qid>: client=...`` once the id exists.

    Note: Cleanup has no public hook for "content that depends on the queue id", so this
    class overrides Cleanup._build (signature checked by mypy); the submitted content
    starts with the Received: lines built with a placeholder id (they count for the hop
    count), and _build swaps in the final lines. A ``received=`` hook in Cleanup.submit
    would make this override unnecessary.
    """

    def __init__(self, cfg: Config, spool: Spool) -> None:
        super().__init__(cfg, spool)
        self._pending: tuple[str, Callable[[str], list[bytes]]] | None = None

    def submit_smtp(self, env: Envelope, content: bytes, namaddr: str,
                    received: Callable[[str], list[bytes]]) -> str:
        """Cleanup.submit(origin="smtp") for content that starts with the
        ``received("?")`` lines. Returns the queue id; raises CleanupError."""
        self._pending = (namaddr, received)
        try:
            return self.submit(env, content, origin="smtp")
        finally:
            self._pending = None

    def _created(self, qid: str) -> None:
        if self._pending is not None:
            log.info(f"{qid}: client={self._pending[0]}")

    def _build(self, env: Envelope, sender: str, rcpts: list[Recipient], lines: list[bytes],
               h: _Headers, qid: str, sec: int, usec: int, local: bool, origin: str,
               uid: int | None, smtputf8: int,
               content: bytes) -> tuple[bytearray, list[int], str]:
        if self._pending is not None:
            final = self._pending[1](qid)
            h.lines[: len(final)] = final
        return super()._build(env, sender, rcpts, lines, h, qid, sec, usec, local, origin,
                              uid, smtputf8, content)


def tls_context(cfg: Config) -> tuple[ssl.SSLContext | None, bool]:
    """The STARTTLS server context (None: no TLS) and whether TLS is required.

    Exits fatal when TLS is required but the certificate cannot be loaded."""
    level = cfg.get("smtpd_tls_security_level").strip().lower()
    cert = cfg.get("smtpd_tls_cert_file").strip()
    required = level == "encrypt"
    if level == "none" or (not cert and not required):
        return None, False
    key = cfg.get("smtpd_tls_key_file").strip() or cert
    try:
        if not cert:
            raise OSError("smtpd_tls_cert_file is not set")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        if required:
            log.fatal(f"cannot load TLS certificate {cert or '(none)'}: {exc}")
        log.warning(f"cannot load TLS certificate {cert}: {exc}: STARTTLS disabled")
        return None, False
    return ctx, required


class SmtpdServer:
    """The accept loop and process limits of one smtpd process (module docstring)."""

    def __init__(self, ctx: ServerContext, params: SmtpdParams, policy: Policy,
                 cleanup: SmtpdCleanup, tls_context: ssl.SSLContext | None = None,
                 tls_required: bool = False,
                 counter: ConnectionCounter | None = None) -> None:
        self.ctx = ctx
        self.params = params
        self.policy = policy
        self.cleanup = cleanup
        self.tls_context = tls_context
        self.tls_required = tls_required
        self.counter = counter or ConnectionCounter(None)
        self.session_limit = ctx.config.get_int("smtpd_process_session_limit")
        self.busy_sessions = min(ctx.config.get_int("smtpd_process_busy_sessions"),
                                 self.session_limit)
        self.max_use = ctx.config.get_int("max_use") * self.session_limit
        self.max_idle = ctx.config.get_time("max_idle")
        self.flow_delay = ctx.config.get_time("in_flow_delay")
        self.sessions: set[SmtpdSession] = set()
        self.accepted = 0
        self.retiring = False
        self.terminated = False
        self._slots: dict[SmtpdSession, int | None] = {}
        self._listeners: list[socket.socket] = []
        self._reading = False
        self._closed = False          # no more accepting, ever
        self._overflow: asyncio.TimerHandle | None = None
        self._busy = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._idle_since = 0.0

    # ------------------------------------------------------------------ SessionHost
    def connect(self, session: SmtpdSession) -> int:
        addr = session.client.addr
        if not self.params.conn_limit or self.policy.limit_exempt(addr):
            self._slots[session] = None
            return 1
        count, slot = self.counter.acquire(addr, self.params.conn_limit)
        self._slots[session] = slot
        return count

    def disconnect(self, session: SmtpdSession) -> None:
        self.counter.release(self._slots.pop(session, None))
        self._session_done(session)

    async def flow_wait(self) -> None:
        """Take an inbound flow token (qmgrd.flow), waiting up to in_flow_delay seconds
        for one: this session is slowed, never blocked, and the other sessions of the
        process go on meanwhile."""
        if self.flow_delay <= 0 or flow_get(0):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.flow_delay
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(FLOW_POLL, left))
            if flow_get(0):
                return

    def enqueue(self, env: Envelope, content: bytes, namaddr: str,
                received: Callable[[str], list[bytes]]) -> str:
        return self.cleanup.submit_smtp(env, content, namaddr, received)

    # ------------------------------------------------------------------ accepting
    def _refresh(self) -> None:
        """Watch the listeners, and tell the master busy/idle, as the state says: idle
        (and accepting at once) below smtpd_process_busy_sessions sessions; busy from
        there on, watching for a client that waits (overflow) below
        smtpd_process_session_limit."""
        loop = asyncio.get_running_loop()
        if not self.sessions and self._overflow is not None:
            self._overflow.cancel()  # free again: take the waiting client normally
            self._overflow = None
        if self._closed or self.terminated:
            reading = False
        else:
            reading = (len(self.sessions) < self.session_limit and self._overflow is None
                       and not (self.retiring and self.sessions))
        if reading != self._reading:
            self._reading = reading
            watch_listeners(loop, self._listeners, self._on_readable if reading else None)
        busy = len(self.sessions) >= self.busy_sessions or self.retiring or self._closed
        if busy != self._busy:
            self._busy = busy
            if busy:
                self.ctx.busy()
            else:
                self.ctx.idle()

    def _on_readable(self, sock: socket.socket) -> None:
        if len(self.sessions) < self.busy_sessions:
            self._accept(sock, self.busy_sessions)
        elif self._overflow is None and not self.retiring:
            # a client waits while this process is busy: give the master OVERFLOW_DELAY
            # to start another process before this one takes more sessions
            self._overflow = asyncio.get_running_loop().call_later(
                OVERFLOW_DELAY, self._overflow_due, sock)
        self._refresh()

    def _overflow_due(self, sock: socket.socket) -> None:
        self._overflow = None
        if not (self._closed or self.terminated):
            self._accept(sock, self.session_limit)
        self._refresh()

    def _accept(self, sock: socket.socket, upto: int) -> None:
        """Accept waiting clients while this process has fewer than ``upto`` sessions."""
        for _ in range(_ACCEPT_BATCH):
            if len(self.sessions) >= upto:
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning(f"accept: {exc.strerror}")
                return
            self._start(conn)

    def _start(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.setblocking(False)
            session = SmtpdSession(self)
        except Exception as exc:  # noqa: BLE001 - this client only; the process goes on
            log.warning(f"cannot start a session: {type(exc).__name__}: {exc}")
            conn.close()
            return
        self.sessions.add(session)
        self.accepted += 1
        task = loop.create_task(loop.connect_accepted_socket(lambda: session, conn))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._started(t, session, conn))
        if self.max_use and self.accepted >= self.max_use and not self.retiring:
            self.retiring = True
            loop.call_later(HANDOVER, self._stop_accepting)
        self._wake.set()

    def _started(self, task: asyncio.Task[Any], session: SmtpdSession,
                 conn: socket.socket) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is not None:
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(exc, ConnectionError):
                log.warning(f"cannot start a session: {type(exc).__name__}: {exc}")
            conn.close()
            self._session_done(session)

    def _stop_accepting(self) -> None:
        """No more clients, ever (a reload, a master gone, max_use): stop watching the
        listeners and close this process's descriptors of them, the master's too, so
        that the port is not held by a process that only finishes its sessions - after
        the master was killed, a new master could not bind it ("Address already in
        use") until the last client left."""
        self._closed = True
        if self._overflow is not None:
            self._overflow.cancel()
            self._overflow = None
        self._refresh()
        for sock in self._listeners:
            sock.close()
        self._listeners = []
        for fd in self.ctx.listen_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.ctx.listen_fds.clear()
        self._wake.set()

    def _session_done(self, session: SmtpdSession) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        if not self.sessions:
            self._idle_since = asyncio.get_running_loop().time()
        self._refresh()
        self._wake.set()

    # ------------------------------------------------------------------ main loop
    def _terminate(self) -> None:
        self.terminated = True
        self.ctx.stopping.set()
        for session in list(self.sessions):
            session.abort()
        self._wake.set()

    async def serve(self) -> None:
        """Accept and serve until a limit, EOF on the status channel or SIGTERM."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_exception_handler)
        loop.add_signal_handler(signal.SIGTERM, self._terminate)
        self._listeners = [socket.socket(fileno=os.dup(fd)) for fd in self.ctx.listen_fds]
        for sock in self._listeners:
            sock.setblocking(False)
        self._idle_since = loop.time()
        stopping = loop.create_task(self.ctx.stopping.wait())
        self._refresh()
        try:
            while not self.terminated:
                self._wake.clear()
                if self.ctx.stopping.is_set() and not self._closed:
                    self.retiring = True
                    self._stop_accepting()
                if self._closed and not self.sessions:
                    return
                timeout = None
                if not self.sessions and not self.retiring and self.max_idle > 0:
                    timeout = self._idle_since + self.max_idle - loop.time()
                    if timeout <= 0:
                        return
                waiter = loop.create_task(self._wake.wait())
                # a stop already seen is not waited for again: asyncio.wait would return
                # at once, a busy loop for as long as the sessions in hand last
                await asyncio.wait({waiter} if stopping.done() else {waiter, stopping},
                                   timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            stopping.cancel()
            self._stop_accepting()
            for session in list(self.sessions):
                session.abort()
            for sock in self._listeners:
                sock.close()
            loop.remove_signal_handler(signal.SIGTERM)


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client that vanished is not news; anything else is logged as a warning."""
    exc = context.get("exception")
    if isinstance(exc, (ConnectionError, asyncio.CancelledError, TimeoutError)):
        return
    log.warning(f"smtpd: {context.get('message', 'event loop error')}: {exc!r}")


# ---------------------------------------------------------------------- the service
class _State:
    """What pre_jail/post_jail build for main()."""

    params: SmtpdParams | None = None
    policy: Policy | None = None
    cleanup: SmtpdCleanup | None = None
    tls: tuple[ssl.SSLContext | None, bool] = (None, False)
    counter: ConnectionCounter | None = None


def _warm_up() -> None:
    """Load what dnspython and asyncio would import lazily on first use."""
    dns.asyncbackend.get_backend("asyncio")
    for rtype in ("A", "AAAA", "MX", "PTR"):
        dns.rdata.get_rdata_class(  # type: ignore[no-untyped-call]
            dns.rdataclass.IN, dns.rdatatype.from_text(rtype))


_warm_up()  # at import: the master loads this module once and forks every smtpd from it


def _pre_jail(ctx: ServerContext) -> None:
    cfg = ctx.config
    log.setup(cfg.get("process_name") or "smtpd", cfg.maillog_file(),
              cfg.get("syslog_name") or "qmgrd", foreground=ctx.foreground)
    try:  # resolv.conf read now (before the jail), the Resolver made at its first use
        resolver: LazyResolver | None = LazyResolver()
    except dns.resolver.NoResolverConfiguration:
        resolver = None
    try:
        _State.policy = Policy(cfg, resolver)
    except PolicyError as exc:
        log.fatal(str(exc))
    _State.tls = tls_context(cfg)
    _State.counter = ConnectionCounter(os.path.join(ctx.queue_directory, "pid", COUNTER_FILE))


def _post_jail(ctx: ServerContext) -> None:
    cfg = ctx.config
    spool = Spool(ctx.queue_directory, cfg.hash_queue_names(),
                  cfg.get_int("hash_queue_depth"))
    _State.cleanup = SmtpdCleanup(cfg, spool)
    _State.params = SmtpdParams.from_config(cfg, ctx.service, ctx.queue_directory)


async def _main(ctx: ServerContext) -> None:
    if _State.params is None or _State.policy is None or _State.cleanup is None:
        log.panic("smtpd: service used before initialisation")
        return
    if not ctx.listen_fds:
        log.fatal("smtpd: no listener (started outside the master without -l)")
    ctx_tls, required = _State.tls
    server = SmtpdServer(ctx, _State.params, _State.policy, _State.cleanup, ctx_tls, required,
                         _State.counter)
    await server.serve()


def main() -> NoReturn:
    """Run smtpd under the async server skeleton."""
    async_server(_main, pre_jail=_pre_jail, post_jail=_post_jail)


if __name__ == "__main__":
    main()
