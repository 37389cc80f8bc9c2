"""smtpd — smtpd(8): the SMTP server that takes mail in from the network.

Summary
    An ``inet`` service of master.cf (the bundled line: ``127.0.0.1:2525 inet n - n - -
    smtpd``): the master opens the listening socket and passes it (fd 6..) to the smtpd
    processes it starts on demand, up to maxproc. aiosmtpd speaks the protocol
    (transports.smtpd_session); the policy (transports.smtpd_policy) and the path into the
    queue are ours:

    * **Process model**: an smtpd process takes up to ``smtpd_process_busy_sessions``
      (qmgrd's own, default 5) clients at once, each session in a slot of its own (a
      SessionSlot): the first in the process's main thread, the others each in a thread
      of its own with an event loop of its own, kept and reused for the next session.
      It tells the master "idle" below that many sessions and "busy" at it, so the
      master starts processes on demand up to maxproc: up to maxproc x
      smtpd_process_busy_sessions clients at once. ``= 1`` is
      Postfix's model, a process per client. Why threads: each forked Python process
      writes to about 7 MiB of the master's pages it shares (reference counts, the
      interpreter's specialisation), while one more session in a process costs about
      0.4 MiB (issue 8, scenario M: 10 clients took 126 MiB of the whole system's PSS
      with a process each, about 80 MiB with two processes). A slot serves one session
      at a time and logs under its own number, the process id in the main thread and
      the thread's task id in the others (master.log), so one session's lines share one
      number that no other session has meanwhile, as with Postfix's process per client:
      pflogsumm's ``--smtpd-stats`` pairs ``connect from`` with ``disconnect from`` by
      it. The sessions of a process share read-only state (policy, tables, TLS
      context) and the locked connection counter; each queues its own messages (the
      cleanup's write and fsync block its own thread only). No smtpd process forks or
      runs commands, so threads meet the house rule (design.md: no helper threads in a
      process that spawns). Starting a Python process costs about 0.3 s of CPU, so when
      a client has waited ``OVERFLOW_DELAY`` (10 s) in the listen queue while this
      process is busy (a burst, or the service at maxproc), the process takes waiting
      clients too, up to ``smtpd_process_session_limit`` (20) sessions at once. For the
      same reason each process serves ``max_use`` x smtpd_process_session_limit sessions
      (2,000 by default) before it retires: then it reports busy, keeps accepting for
      ``HANDOVER`` s (so the master can start its successor while clients are served),
      stops accepting and exits when its sessions are done. With no session for
      ``max_idle`` seconds it exits. Each ended session is one use for the master
      (``qmgr-master status``'s USES, and a process that dies after serving a client
      does not throttle the service): a busy -> idle report counts one, the other ends
      are reported as uses, the first at once, then at most once a second. On EOF of
      the status channel (master reload or exit) it stops accepting and lets its
      sessions finish; on SIGTERM (master stop) it drops them at once and waits up to
      ``JOIN_TIMEOUT`` (2 s) for its threads - nothing that was not answered 250 is
      queued. The watchdog (master.server.watchdog) covers the
      session threads too: each thread's loop beats once a watchdog interval, and the
      main loop's keepalive re-arms the alarm only while every beat is recent, so a
      session thread that hangs gets the process killed ``daemon_timeout`` later, as a
      hung main loop does (a slot taken for ever would also keep a retiring or
      orphaned process, which waits for its sessions, from ever exiting).
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
      the session's event loop for the write + fsync; the other sessions are in other
      threads or processes, so their fsyncs overlap, as Postfix's cleanup processes do.
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
                counter=None, loop_factory=None)
                                          async .serve() -> None: the process's main loop
                                          (loop_factory: the session threads' event
                                          loops, default asyncio.new_event_loop)
    SessionSlot                           one session at a time: the SessionHost
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
import threading
import time
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
from master.server.skeleton import (
    ServerContext,
    async_server,
    event_loop_factory,
    watch_listeners,
)
from qmgrd.flow import flow_get
from qmgrd.spool.cleanup import Cleanup, _Headers
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.queue import Spool
from transports.smtpd_policy import ConnectionCounter, LazyResolver, Policy, PolicyError
from transports.smtpd_session import SmtpdParams, SmtpdSession

__all__ = ["HANDOVER", "OVERFLOW_DELAY", "SmtpdCleanup", "SmtpdServer", "main", "tls_context"]

JOIN_TIMEOUT = 2.0  # seconds a stopping process waits in all for its aborted sessions
HANDOVER = 2.0  # seconds a retiring process keeps accepting after reporting busy
FLOW_POLL = 0.02  # seconds between looks for an inbound flow token while waiting
OVERFLOW_DELAY = 10.0  # seconds a client waits before a busy process takes it too
USES_REPORT = 1.0  # seconds between reports of ended sessions to the master (uses)
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
        self._local = threading.local()  # the message in hand, per session thread

    def submit_smtp(self, env: Envelope, content: bytes, namaddr: str,
                    received: Callable[[str], list[bytes]]) -> str:
        """Cleanup.submit(origin="smtp") for content that starts with the
        ``received("?")`` lines. Returns the queue id; raises CleanupError. Safe to call
        from several session threads at once."""
        self._local.pending = (namaddr, received)
        try:
            return self.submit(env, content, origin="smtp")
        finally:
            self._local.pending = None

    def _pending(self) -> tuple[str, Callable[[str], list[bytes]]] | None:
        return getattr(self._local, "pending", None)

    def _created(self, qid: str) -> None:
        pending = self._pending()
        if pending is not None:
            log.info(f"{qid}: client={pending[0]}")

    def _build(self, env: Envelope, sender: str, rcpts: list[Recipient], lines: list[bytes],
               h: _Headers, qid: str, sec: int, usec: int, local: bool, origin: str,
               uid: int | None, smtputf8: int,
               content: bytes) -> tuple[bytearray, list[int], str]:
        pending = self._pending()
        if pending is not None:
            final = pending[1](qid)
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
                 counter: ConnectionCounter | None = None,
                 loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
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
        self.sessions: set[SessionSlot] = set()  # the slots that have a session
        self._slots: list[SessionSlot] = []  # this thread's (first), then the threads
        self.loop_factory = loop_factory or asyncio.new_event_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self.accepted = 0
        self.retiring = False
        self.terminated = False
        self._listeners: list[socket.socket] = []
        self._reading = False
        self._closed = False          # no more accepting, ever
        self._overflow: asyncio.TimerHandle | None = None
        self._busy = False
        self._wake = asyncio.Event()
        self._idle_since = 0.0
        self.completed = 0  # sessions ended
        self._unreported = 0  # ended sessions not yet told to the master as uses
        self._report_due: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ shared by sessions
    def acquire_slot(self, addr: str) -> tuple[int, int | None]:
        """Count a session of ``addr`` (from any session thread): (its number among the
        client's sessions, capped at the limit + 1; the counter's slot, None when not
        counted or over the limit)."""
        if not self.params.conn_limit or self.policy.limit_exempt(addr):
            return 1, None
        return self.counter.acquire(addr, self.params.conn_limit)

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
        try:
            conn.setblocking(False)
            slot = self._free_slot()
            slot.hand(conn)
        except Exception as exc:  # noqa: BLE001 - this client only; the process goes on
            # (a thread that cannot be started; one that has ended: its loop is closed)
            log.warning(f"cannot start a session: {type(exc).__name__}: {exc}")
            conn.close()
            return
        self.sessions.add(slot)
        self.accepted += 1
        if self.max_use and self.accepted >= self.max_use and not self.retiring:
            self.retiring = True
            asyncio.get_running_loop().call_later(HANDOVER, self._stop_accepting)
        self._wake.set()

    def _free_slot(self) -> SessionSlot:
        """The slot for a new session: this thread's when it has none, else an idle
        session thread, else a new one (its loop and thread made and started here)."""
        for slot in self._slots:
            if slot not in self.sessions and slot.usable():
                return slot
        self._slots = [slot for slot in self._slots if slot.usable()]
        loop = self.loop_factory()
        try:
            slot = SessionSlot(self, loop)
        except BaseException:
            loop.close()  # the thread could not be started (RLIMIT_NPROC)
            raise
        self._slots.append(slot)
        return slot

    def session_ended(self, slot: SessionSlot) -> None:
        """The session of ``slot`` has ended (called from the slot's thread):
        _session_done in this loop."""
        loop = self._loop
        if loop is None:  # serve() has not begun: nothing to tell
            return
        try:
            loop.call_soon_threadsafe(self._session_done, slot)
        except RuntimeError:  # this loop is closed: the process is ending anyway
            pass

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

    def _session_done(self, slot: SessionSlot) -> None:
        if slot not in self.sessions:
            return
        self.sessions.discard(slot)
        loop = asyncio.get_running_loop()
        if not self.sessions:
            self._idle_since = loop.time()
        was_busy = self._busy
        self._refresh()
        self.completed += 1
        if not (was_busy and not self._busy):  # a busy -> idle report counts as a use
            self._unreported += 1
            if self.completed == 1:
                self._report_uses()  # at once: from now on a crash is not "bad startup"
            elif self._report_due is None:
                self._report_due = loop.call_later(USES_REPORT, self._report_uses)
        self._wake.set()

    def _report_uses(self) -> None:
        """Tell the master the sessions ended since the last report as uses (its status
        view, and its crash accounting: a process that has served a client and then
        dies is not throttled as a "bad command startup"). The master counts a use at
        each busy -> idle report; with smtpd_process_busy_sessions > 1 a process may
        serve thousands of clients without ever being busy, so the other ends are
        reported here, the first at once and the rest once a second at most, as
        multi_server reports its connections."""
        if self._report_due is not None:
            self._report_due.cancel()
            self._report_due = None
        if self._unreported:
            self.ctx.uses(self._unreported)
            self._unreported = 0

    # ------------------------------------------------------------------ main loop
    def _terminate(self) -> None:
        self.terminated = True
        self.ctx.stopping.set()
        for slot in list(self.sessions):
            slot.abort()
        self._wake.set()

    async def serve(self) -> None:
        """Accept and serve until a limit, EOF on the status channel or SIGTERM."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._slots.insert(0, SessionSlot(self, loop, thread=False))
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
            self._report_uses()
            self._stop_accepting()
            for slot in list(self.sessions):
                slot.abort()
            for sock in self._listeners:
                sock.close()
            loop.remove_signal_handler(signal.SIGTERM)
            self._join(JOIN_TIMEOUT)

    def _join(self, timeout: float) -> None:
        """Stop the session threads and wait up to ``timeout`` seconds in all for them
        (their sessions were aborted, or have ended), so that a session that is
        queueing a message ends before the process does."""
        deadline = time.monotonic() + timeout
        threads = [slot for slot in self._slots if slot.thread is not None]
        for slot in threads:
            self.ctx.watchdog.unwatch(slot.alive)  # its loop stops now
            slot.stop()
        for slot in threads:
            if slot.thread is not None:
                slot.thread.join(max(0.0, deadline - time.monotonic()))


class SessionSlot:
    """Where one session at a time runs: the process's main thread (its event loop,
    which also accepts), or a thread of its own with an event loop of its own, kept for
    the life of the process and reused session after session (module docstring,
    "Process model"). It is the SessionHost of transports.smtpd_session.

    A session thread's loop is made in the accepting thread (``server.loop_factory``:
    uvloop's or asyncio's, as async_event_loop says), so that hand(), abort() and stop()
    can reach it from the moment the slot exists. What the sessions of a process share
    is safe to share between threads: the policy and TLS context are read only, the
    connection counter is locked, the cleanup keeps its per-message state per thread,
    and each log line is written whole by one write(2), its number the thread's task
    id (master.log), so that two sessions at once never log under one number."""

    def __init__(self, server: SmtpdServer, loop: asyncio.AbstractEventLoop,
                 thread: bool = True) -> None:
        self.server = server
        self.params = server.params
        self.policy = server.policy
        self.tls_context = server.tls_context
        self.tls_required = server.tls_required
        self.loop = loop
        self.session: SmtpdSession | None = None
        self._slot: int | None = None  # the connection counter's
        self.thread: threading.Thread | None = None
        # A thread's loop beats every watchdog interval; the main loop's keepalive
        # re-arms the watchdog only while each beat is recent (alive): a session thread
        # that hangs gets the process killed, as a main loop that hangs does.
        self._every = server.ctx.watchdog.interval()
        self.beat = time.monotonic()
        if thread:
            self.thread = threading.Thread(target=self._run, name="smtpd session",
                                           daemon=True)
            server.ctx.watchdog.watch(self.alive)
            try:
                self.thread.start()
            except BaseException:
                server.ctx.watchdog.unwatch(self.alive)
                raise

    # ------------------------------------------------------------------ SessionHost
    def connect(self, session: SmtpdSession) -> int:
        count, self._slot = self.server.acquire_slot(session.client.addr)
        return count

    def disconnect(self, session: SmtpdSession) -> None:
        if session is self.session:
            self._end()

    async def flow_wait(self) -> None:
        """Take an inbound flow token (qmgrd.flow), waiting up to in_flow_delay seconds
        for one: this session is slowed, never blocked, and the other sessions of the
        process go on meanwhile."""
        delay = self.server.flow_delay
        if delay <= 0 or flow_get(0):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(FLOW_POLL, left))
            if flow_get(0):
                return

    def enqueue(self, env: Envelope, content: bytes, namaddr: str,
                received: Callable[[str], list[bytes]]) -> str:
        return self.server.cleanup.submit_smtp(env, content, namaddr, received)

    def usable(self) -> bool:
        """The main thread's slot, or a thread that still runs (one that died - it
        never should - is dropped: its loop is closed)."""
        return self.thread is None or self.thread.is_alive()

    # ------------------------------------------------------------------ watchdog
    def alive(self) -> bool:
        """True while this thread's loop turns (it beat within two intervals of the
        watchdog; asked by its keepalive in the main thread)."""
        return time.monotonic() - self.beat < 2 * self._every

    def _beat(self) -> None:
        self.beat = time.monotonic()
        self.loop.call_later(self._every, self._beat)

    # ------------------------------------------------------------------ from the server
    def hand(self, conn: socket.socket) -> None:
        """Serve ``conn`` (called in the accepting thread; the slot is free)."""
        if self.thread is None:
            self.loop.call_soon(self._begin, conn)
        else:
            self.loop.call_soon_threadsafe(self._begin, conn)

    def abort(self) -> None:
        """Close the connection in hand now (process shutdown), from any thread."""
        try:
            self.loop.call_soon_threadsafe(self._abort)
        except RuntimeError:  # the loop is closed: nothing in hand
            pass

    def stop(self) -> None:
        """End the thread once what its loop has in hand is done."""
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            pass

    # ------------------------------------------------------------------ in the slot's loop
    def _begin(self, conn: socket.socket) -> None:
        try:
            session = SmtpdSession(self)
        except Exception as exc:  # noqa: BLE001 - this client only; the process goes on
            log.warning(f"cannot start a session: {type(exc).__name__}: {exc}")
            conn.close()
            self.server.session_ended(self)
            return
        self.session = session
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: session, conn))
        task.add_done_callback(lambda t: self._started(t, session, conn))

    def _started(self, task: asyncio.Task[Any], session: SmtpdSession,
                 conn: socket.socket) -> None:
        if task.cancelled() or task.exception() is not None:
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(exc, ConnectionError):
                log.warning(f"cannot start a session: {type(exc).__name__}: {exc}")
            conn.close()
            if session is self.session:
                self._end()

    def _end(self) -> None:
        slot, self._slot = self._slot, None
        self.server.counter.release(slot)
        self.session = None
        self.server.session_ended(self)

    def _abort(self) -> None:
        if self.session is not None:
            self.session.abort()

    def _run(self) -> None:
        """The thread: its loop until stop(), then what asyncio.run does at its end
        (the aborted sessions' tasks cancelled and awaited: their last log lines)."""
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_exception_handler)
        try:
            loop.call_soon(self._beat)
            loop.run_forever()
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except Exception as exc:  # noqa: BLE001 - logged; the process goes on
            log.warning(f"smtpd session thread: {type(exc).__name__}: {exc}")
        finally:
            asyncio.set_event_loop(None)
            loop.close()


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
                         _State.counter, event_loop_factory(ctx.config))
    await server.serve()


def main() -> NoReturn:
    """Run smtpd under the async server skeleton."""
    async_server(_main, pre_jail=_pre_jail, post_jail=_post_jail)


if __name__ == "__main__":
    main()
