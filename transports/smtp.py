"""smtp — the smtp(8) delivery agent: relay a queued message to the next SMTP server.

Summary
    For each delivery request: read the content from the queue file (lines joined with
    CRLF, lines over ``smtp_line_length_limit`` folded with CRLF SPACE as Postfix does,
    leading dots doubled), find the servers for the request's nexthop, and run one SMTP
    transaction (transports.smtp_session) with the first server that will talk, trying the next address
    after a site-level failure (postfix.md §6.3 nexthop syntax):

    * Where: transports.smtp_dns turns the nexthop (``[host]:port``, ``[host]``,
      ``host:port``, ``domain``, or a list) into addresses (MX by preference, then
      A/AAAA; no MX -> the domain's addresses; null MX -> bounce 5.1.0). At most
      ``smtp_mx_address_limit`` addresses and ``smtp_mx_session_limit`` sessions are tried.
    * Session: connect (``smtp_connect_timeout``), greeting, EHLO ``smtp_helo_name``
      (HELO after a 4xx/5xx EHLO reply other than 421), the transaction, ``QUIT``. Each
      phase has Postfix's timeout parameter (``smtp_helo_timeout`` ...
      ``smtp_quit_timeout``).
    * Transaction (transports.smtp_tx): ``MAIL FROM`` with its ESMTP options, one
      ``RCPT TO`` per recipient, ``DATA`` (pipelined when offered); 8-bit content for a
      server without 8BITMIME, SMTPUTF8, the server's SIZE limit and the outcome of each
      reply as Postfix's smtp(8) (2xx -> ``relayed``; 4xx deferred, kept for the next
      server; 5xx bounced), recorded per recipient in transports.smtp_attempt.
    * Site-level failures (connection refused or timed out, a 4xx greeting, HELO
      refused with 4xx, lost connection, timeout, malformed reply) move on to the next
      address; if none is left the remaining recipients are deferred and the hop status
      is set. A hard one (a 5xx greeting with ``smtp_skip_5xx_greeting = no``, HELO
      refused with 5xx, 5.4.6 mail loop) bounces the remaining recipients at once, even
      when more servers are left, as Postfix's smtp_site_fail()/smtp_bulk_fail(); with
      ``soft_bounce = yes`` the next server is tried first. A 5xx greeting with
      ``smtp_skip_5xx_greeting = yes`` (the default) counts as 4xx: next server. A
      malformed reply never bounces.
    * A nexthop that is not a valid destination (master.config.nexthop): when it is the
      recipients' own domain (the request's nexthop equals the domain of each of its
      recipients: no relayhost, transport setting or transport map chose it), the
      address is bad, not the configuration: bounce ``5.4.4 Name service error for
      <domain>: invalid host or domain name``, as Postfix's dns_lookup() answers an
      invalid name (HOST_NOT_FOUND, which its smtp client bounces with 5.4.4). Such a
      domain must be one host name or one ``[address]``: a port or a list in it
      (``user@host:587``) is invalid too, so that no sender picks our port or servers.
      A configured nexthop that is invalid (a transport map entry; relayhost and the
      transport settings are checked at start) is a configuration error: defer ``4.3.5
      bad nexthop '<nexthop>': <why>`` until it is fixed, as Postfix defers on a bad
      transport table entry.
    * A lookup of the nexthop that fails for good (5.x.x: the name does not exist, a
      null MX) when that nexthop is ``relayhost`` (the request's nexthop equals main.cf's
      ``relayhost`` string) is a configuration problem, not the recipient's: it logs
      ``warning: relayhost configuration problem`` and defers with 4.3.5, the reason
      kept, as Postfix's smtp_connect_remote() does ("Don't bounce mail after a host
      lookup problem with a relayhost"). Postfix has this safety net for relayhost and
      smtp_fallback_relay only (not implemented here); a transport map or
      sender_dependent_relayhost_maps nexthop that does not exist bounces, as in Postfix.
    * TLS (``smtp_tls_security_level``; transports.smtp_session and transports.smtp_tls):
      STARTTLS when the server offers it at ``may`` and above, as Postfix's smtp(8).
      The SSL context is made once in :meth:`SmtpAgent.setup` (before the chroot: the
      ``smtp_tls_CAfile``/``smtp_tls_CApath``/``smtp_tls_cert_file`` files are read
      there; a context that cannot be made logs ``warning: TLS library problem: ...``
      and leaves no TLS engine). A failed handshake at ``may`` is followed by a new
      connection to the same server in the clear only for a message that waited
      ``minimal_backoff_time`` or more before this attempt (active arrival minus
      arrival), as Postfix's PLAINTEXT_FALLBACK_OK_AFTER_STARTTLS_FAILURE; a first
      attempt is deferred ``4.7.5 Cannot start TLS: handshake failure`` and the retry
      goes through in the clear. Not implemented: the fallback after a TLS session
      that fails later (PLAINTEXT_FALLBACK_OK_AFTER_TLS_SESSION_FAILURE),
      ``smtp_tls_policy_maps``, DANE.
    * Mail that loops back to this mail system: a server on port 25 that replies to EHLO
      with our ``myhostname`` fails with 5.4.6 ``mail for <nexthop> loops back to
      myself`` (4.4.6 for a backup MX: the next one is tried), as Postfix's smtp_helo()
      (transports.smtp_session).

    relay= is ``host[ip]:port`` of the server that gave the answer, ``none`` before any
    connection; on a reused connection Postfix's ``, conn_use=N`` follows it (the N-th
    transaction on that connection): ``relay=h[ip]:port, conn_use=2, delay=...``.

    Concurrency: one process carries up to ``smtp_process_delivery_limit`` (default 50)
    deliveries at once, each an asyncio task (master.server.skeleton.multi_server), where
    Postfix runs one process per delivery; with 1 it is Postfix's one at a time. The
    qmgr still caps a transport's deliveries in flight at its master.cf maxproc, so
    maxproc keeps its meaning (deliveries, not processes). Reading the queue file and
    writing the status logs (a deferral's fsync) happen in the loop and hold up the
    other deliveries of the process for that long; DNS lookups run in the loop's default
    executor (threads: this process never forks). A bug that kills the process defers
    every delivery in hand; the qmgr retries them.

    Connection reuse (Postfix's connection cache, kept in the agent process by
    transports.smtp_cache and shared by the deliveries it carries): a request
    uses the cache when its nexthop host is in ``smtp_connection_cache_destinations``,
    or, with ``smtp_connection_cache_on_demand = yes``, as the qmgr asks in the request
    flags (DEL_REQ_FLAG_CONN_LOAD 0x800: look for a cached session; _CONN_STORE 0x1000:
    keep the session afterwards; the qmgr sets STORE while the destination has more mail
    waiting or in delivery). Lookup first by nexthop (no DNS lookup, connect, greeting
    or EHLO then), else by server address before each connect. A cached session is
    checked (peer still there, RSET 250) before use; one found dead, or one that fails
    (lost connection, 421) before the message content was sent, is dropped silently
    and a new connection made: never a deferral. After the transaction the session is
    kept (not QUIT) subject to ``smtp_connection_reuse_time_limit`` and
    ``smtp_connection_reuse_count_limit``; idle ones get QUIT after
    ``smtp_connection_cache_time_limit`` (the skeleton's timer hook, see :func:`main`)
    and when the agent exits (max_use, max_idle, SIGTERM, master gone). Sessions are
    keyed with the HELO name and the TLS level they were made at, so no session
    crosses policies (a session retried in the clear after a failed handshake is
    ``none``, not ``may``); a TLS-encrypted session is kept only with
    ``smtp_tls_connection_reuse = yes`` (Postfix's default ``no``: it is QUIT after
    its delivery), and a request whose level requires TLS takes only encrypted ones
    from the cache. A session
    not kept gets its QUIT after the delivery's outcome is recorded (the status lines
    logged, the recipients marked done in the queue file, as Postfix's smtp_rcpt_done()
    marks them when the message is accepted) and before the reply to the qmgr, so an
    agent stopped while a server keeps its answer to QUIT (up to ``smtp_quit_timeout``)
    delivers nothing twice, and the session still counts against the destination's
    concurrency until it is closed, as a Postfix smtp process does; QUITs still
    waiting when the agent exits get at most 2 s.

    The session itself (timeouts, Postfix's failure wording) is transports.smtp_session.
    dnspython and the executor are imported at module import time and the resolver reads
    /etc/resolv.conf in :meth:`SmtpAgent.setup`: both before the chroot.

Public API
    SmtpAgent(DeliveryAgent)     await .deliver_async(req, msg), await .timer_async(final)
                                 (multi_server); .deliver(req, msg), .timer(final) ->
                                 float | None: the same on the agent's own loop (tests);
                                 .setup(); .params (SmtpParams); .process_limit;
                                 .resolver (HostResolver, replaceable in tests);
                                 .cache (ConnCache)
    re-exported: parse_nexthop, Nexthop, Address, HostResolver, DnsError (smtp_dns);
                 Reply, SmtpParams (smtp_session); build_content, xtext, a_label (smtp_tx)
    main() -> NoReturn                                           ``python -m transports.smtp``
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 - the executor of DNS lookups, before the jail
import ssl
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

from master import log
from master.config.maincf import TLS_LEVELS
from master.server.skeleton import ServerContext, multi_server
from qmgrd.delivery import (
    DEL_REQ_FLAG_CONN_LOAD,
    DEL_REQ_FLAG_CONN_STORE,
    DeliverRequest,
    RecipientInfo,
)
from qmgrd.spool.message import QueueFile
from transports.agent import DeliveryAgent, Dsn, make_dsn
from transports.smtp_attempt import Attempt
from transports.smtp_cache import CacheDestinations, ConnCache, Key, dest_key, endpoint_key
from transports.smtp_dns import Address, DnsError, HostResolver, Nexthop, parse_nexthop
from transports.smtp_session import (
    Reply,
    SmtpFailure,
    SmtpParams,
    SmtpSession,
    TlsHandshakeFailure,
)
from transports.smtp_tls import OPPORTUNISTIC, TLS_REQUIRED, client_context, level_of
from transports.smtp_tx import Content, a_label, build_content, transaction, xtext

__all__ = ["Address", "DnsError", "HostResolver", "Nexthop", "Reply", "SmtpAgent",
           "SmtpParams", "a_label", "build_content", "main", "parse_nexthop", "xtext"]

_T = TypeVar("_T")


def _domain_nexthop(req: DeliverRequest) -> bool:
    """True when ``req.nexthop`` is its recipients' own domain (each recipient's, case
    and a final dot aside): what the qmgr's resolver uses when nothing configured a
    nexthop, so a bad one is the address's fault."""
    nexthop = req.nexthop.lower().rstrip(".")
    return bool(req.recipients) and all(
        rcpt.address.rpartition("@")[2].lower().rstrip(".") == nexthop
        for rcpt in req.recipients)


def _one_domain(text: str) -> bool:
    """``text`` (a valid destination) names one host without a port: ``name`` or
    ``[address]``."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return text.count("[") == 1
    return not any(c in text for c in ":,[ \t")


# ---------------------------------------------------------------------- the agent


class SmtpAgent(DeliveryAgent):
    """The smtp(8) client (see the module docstring)."""

    name = "smtp"

    def __init__(self) -> None:
        super().__init__()
        self.params = SmtpParams()
        self.resolver: HostResolver | None = None
        self.cache = ConnCache(0.0, 0.0, 0)
        self.cache_destinations = CacheDestinations([])
        self.process_limit = 1
        self.relayhost = ""  # main.cf's relayhost, as the qmgr's resolver uses it
        self.min_backoff = 300.0  # minimal_backoff_time (s): the plaintext fallback's
        self.need_tls = False  # the level requires TLS: reuse only encrypted sessions
        self._req_quits: dict[int, list[asyncio.Task[None]]] = {}  # id(request): its QUITs
        self._loop: asyncio.AbstractEventLoop | None = None  # the synchronous facade's

    def setup(self) -> None:
        """Read the smtp_* parameters and make the DNS resolver (pre-jail)."""
        cfg = self.cfg
        assert cfg is not None

        def t(name: str) -> float:
            return float(cfg.get_time(name))

        self.params = SmtpParams(
            helo_name=cfg.get("smtp_helo_name") or cfg.get("myhostname") or "localhost",
            myhostname=cfg.get("myhostname"),
            connect_timeout=t("smtp_connect_timeout"),
            helo_timeout=t("smtp_helo_timeout"),
            mail_timeout=t("smtp_mail_timeout"),
            rcpt_timeout=t("smtp_rcpt_timeout"),
            data_init_timeout=t("smtp_data_init_timeout"),
            data_xfer_timeout=t("smtp_data_xfer_timeout"),
            data_done_timeout=t("smtp_data_done_timeout"),
            quit_timeout=t("smtp_quit_timeout"),
            line_length_limit=cfg.get_int("smtp_line_length_limit"),
            mx_address_limit=cfg.get_int("smtp_mx_address_limit"),
            mx_session_limit=cfg.get_int("smtp_mx_session_limit"),
            skip_5xx_greeting=cfg.get_bool("smtp_skip_5xx_greeting"),
            smtputf8_enable=cfg.get_bool("smtputf8_enable"),
            rset_timeout=t("smtp_rset_timeout"),
            cache_on_demand=cfg.get_bool("smtp_connection_cache_on_demand"),
            cache_time_limit=t("smtp_connection_cache_time_limit"),
            reuse_time_limit=t("smtp_connection_reuse_time_limit"),
            reuse_count_limit=cfg.get_int("smtp_connection_reuse_count_limit"),
            cache_destinations=cfg.get_list("smtp_connection_cache_destinations"),
            tls_security_level=cfg.get("smtp_tls_security_level"),
            tls_level=level_of(cfg.get("smtp_tls_security_level")),
            tls_loglevel=cfg.get_int("smtp_tls_loglevel"),
            starttls_timeout=t("smtp_starttls_timeout"),
            tls_connection_reuse=cfg.get_bool("smtp_tls_connection_reuse"),
            disable_mime_output_conversion=cfg.get_bool("disable_mime_output_conversion"),
            mime_nesting_limit=cfg.get_int("mime_nesting_limit"),
        )
        p = self.params
        if p.tls_level not in TLS_LEVELS:  # Postfix's smtp exits fatal; reload refuses it
            raise cfg.error("smtp_tls_security_level", "invalid TLS security level "
                            f'"{p.tls_level}" in smtp_tls_security_level')
        if p.tls_level != "none":
            try:  # before the chroot: the CA and certificate files are read here
                p.tls_context = client_context(
                    p.tls_level, cfg.get("smtp_tls_CAfile").strip(),
                    cfg.get("smtp_tls_CApath").strip(), cfg.get("smtp_tls_protocols"),
                    cfg.get("smtp_tls_mandatory_protocols"),
                    cfg.get("smtp_tls_cert_file").strip(),
                    cfg.get("smtp_tls_key_file").strip())
            except (OSError, ssl.SSLError, ValueError) as exc:
                # Postfix: no TLS engine; "may" goes on in the clear, the levels that
                # require TLS defer ("TLS is required, but our TLS engine is unavailable")
                log.warning(f"TLS library problem: {exc}")
                p.tls_context = None
        self.min_backoff = float(cfg.get_time("minimal_backoff_time"))
        self.need_tls = p.tls_level in TLS_REQUIRED
        self.process_limit = cfg.get_int("smtp_process_delivery_limit")
        self.relayhost = cfg.get("relayhost").strip()
        # room for an idle session per delivery in hand (at least Postfix-like 8)
        self.cache = ConnCache(p.cache_time_limit, p.reuse_time_limit, p.reuse_count_limit,
                               max_sessions=max(8, 2 * self.process_limit))
        self.cache_destinations = CacheDestinations(p.cache_destinations)
        if self.resolver is None:
            self.resolver = HostResolver(cfg.get_list("smtp_host_lookup") or ["dns"],
                                         cfg.get_list("inet_protocols"))

    # -- connection management --------------------------------------------------------

    async def _session(self, addr: Address, req: DeliverRequest) -> SmtpSession:
        """An open session with ``addr``, a server of ``req.nexthop`` (named when mail
        for it loops back to myself). A failed TLS handshake at ``may`` is followed by a
        new connection to the same server in the clear when :meth:`_plaintext_ok`.
        Raises SmtpFailure."""
        sess = SmtpSession(addr, self.params)
        sess.nexthop, sess.best_mx = req.nexthop, addr.best
        try:
            await sess.open()
        except TlsHandshakeFailure as exc:
            exc.relay = sess.relay
            sess.close()
            if not self._plaintext_ok(req):
                raise
            sess = SmtpSession(addr, self.params)
            sess.nexthop, sess.best_mx, sess.tls_level = req.nexthop, addr.best, "none"
            try:
                await sess.open()
            except SmtpFailure as exc2:
                if sess.connected:
                    exc2.relay = sess.relay
                sess.close()
                raise
        except SmtpFailure as exc:
            if sess.connected:  # greeting or EHLO failed: Postfix names the server
                exc.relay = sess.relay
            sess.close()
            raise
        return sess

    def _plaintext_ok(self, req: DeliverRequest) -> bool:
        """After a failed TLS handshake: may the same server be tried in the clear?
        Postfix's PLAINTEXT_FALLBACK_OK_AFTER_STARTTLS_FAILURE: at an opportunistic
        level only, and only for a message that waited ``minimal_backoff_time`` or more
        before this delivery attempt (its queue manager's active arrival minus its
        arrival: not on the first attempt, which is deferred 4.7.5 ``Cannot start TLS:
        handshake failure`` so that the retry gets it through)."""
        return (self.params.tls_level in OPPORTUNISTIC
                and req.active_arrival - req.arrival >= self.min_backoff)

    async def _release(self, sess: SmtpSession, dest: Key | None, store: bool,
                       req: DeliverRequest) -> None:
        """Done with ``sess`` after a clean transaction: keep it in the cache (``store``,
        under ``dest`` and its address) or QUIT and close it - in a task that
        :meth:`request_done` awaits once ``req``'s outcome is recorded: not after the
        server's answer to QUIT (up to ``smtp_quit_timeout``, 300 s) is the recipient
        marked done (Postfix's smtp_rcpt_done() marks it when the message is accepted),
        so a server that accepts the mail and never answers QUIT can neither hold its
        status back nor, if the agent is stopped meanwhile, have it delivered twice."""
        if sess.tls_level != self.params.tls_level:  # a retry in the clear after TLS failed
            policy = self._policy(sess.tls_level)
            dest = dest_key(sess.nexthop, policy) if dest is not None else None
        else:
            policy = self._policy()
        if (store and (sess.tls is None or self.params.tls_connection_reuse)
                and await self.cache.store(sess, dest, endpoint_key(sess.addr, policy))):
            return
        task = asyncio.get_running_loop().create_task(sess.quit())
        self._req_quits.setdefault(id(req), []).append(task)

    async def request_done(self, req: DeliverRequest) -> None:
        """The QUITs of ``req``'s sessions (see :meth:`_release`): awaited after its
        outcome is recorded and before the qmgr gets the reply, so the session counts
        against the destination's concurrency until it is closed, as a Postfix smtp
        process ends its session before it replies (the peer never sees more sessions
        than the qmgr's window)."""
        try:  # left in _req_quits while awaited: an agent exit (_end_quits) cancels them
            tasks = self._req_quits.get(id(req))
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._req_quits.pop(id(req), None)

    async def _end_quits(self, limit: float | None) -> None:
        """Wait for the QUITs in progress, at most ``limit`` seconds (None: no limit),
        then close what is left without its reply."""
        pending = {t for tasks in self._req_quits.values() for t in tasks if not t.done()}
        if not pending:
            return
        _done, late = await asyncio.wait(pending, timeout=limit)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    def _policy(self, level: str = "") -> tuple[str, ...]:
        """What must match for a cached session to be shared (never across policies):
        the HELO name and the TLS level the session was made at (``level``, default the
        agent's; a session retried in the clear after a failed handshake has ``none``,
        so that it serves no ``may`` request, as in Postfix)."""
        return (self.params.helo_name.lower(), level or self.params.tls_level)

    def _cache_mode(self, req: DeliverRequest) -> tuple[bool, bool]:
        """(look in the cache, store in the cache) for ``req``."""
        if self.cache_destinations and self.cache_destinations.match(req.nexthop):
            return True, True
        if self.params.cache_on_demand:
            return (bool(req.flags & DEL_REQ_FLAG_CONN_LOAD),
                    bool(req.flags & DEL_REQ_FLAG_CONN_STORE))
        return False, False

    async def timer_async(self, final: bool) -> float | None:
        """The multi_server timer hook: QUIT idle cached sessions (all of them when
        ``final``: the agent exits); the seconds until the next is due, or None."""
        if final:
            await asyncio.gather(self.cache.close_all(),
                                 self._end_quits(min(2.0, self.params.quit_timeout)))
            return None
        return await self.cache.expire()

    # -- the synchronous facade (tests, tools: one request at a time) --------------------

    def _sync(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on this agent's own event loop, kept between calls while the
        connection cache holds sessions (their sockets belong to that loop)."""
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        try:
            return self._loop.run_until_complete(coro)
        finally:
            # one request at a time: its QUIT ends before the call returns (deliver()
            # is not followed by request_done())
            self._loop.run_until_complete(self._end_quits(None))
            self._req_quits.clear()
            self._loop.run_until_complete(self.cache.evicted())
            if not len(self.cache):  # nothing for the loop to keep watching
                self._loop.close()
                self._loop = None

    def timer(self, final: bool) -> float | None:
        """:meth:`timer_async` for a caller without a loop."""
        return self._sync(self.timer_async(final))

    def deliver(self, req: DeliverRequest, msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        """:meth:`deliver_async` for a caller without a loop (one request at a time)."""
        return self._sync(self.deliver_async(req, msg))

    # -- delivery ------------------------------------------------------------------------

    async def deliver_async(self, req: DeliverRequest,
                            msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        """Relay ``msg`` to the servers of ``req.nexthop``; one Dsn per recipient.
        Concurrent calls share the connection cache; each has its own DeliveryState.

        Raises:
            CorruptQueueFile: the content could not be read.
        """
        rcpts = req.recipients
        lines = list(msg.iter_lines())
        limit_len = self.params.line_length_limit
        content = Content(lines, limit_len, self.params.mime_nesting_limit)
        if limit_len > 0:
            folded = sum(1 for line in lines if len(line) > limit_len)
            if folded:
                # RFC 5321 4.5.3.1.6: a text line is at most 998 characters; Postfix breaks
                # longer lines with CRLF SPACE. Say so, since the content changes.
                log.info(f"{req.queue_id}: {folded} line(s) longer than {limit_len} "
                         f"characters folded (smtp_line_length_limit)")
        att = Attempt()
        pending = list(range(len(rcpts)))
        load, store = self._cache_mode(req)
        policy = self._policy()
        dest = dest_key(req.nexthop, policy)
        sessions = 0
        tried: set[Address] = set()
        if load:
            cached = await self.cache.take_dest(dest, tls=self.need_tls)
            if cached is not None and await self._use(cached, req, content, pending, att,
                                                      last=False, dest=dest, store=store):
                sessions = 1
                tried.add(cached.addr)
                pending = [i for i in pending if i not in att.final]
        if not pending:
            return self._results(req, att, pending)
        try:
            addrs = await self._addresses(req.nexthop, _domain_nexthop(req))
        except DnsError as exc:
            dsn = make_dsn(self._configured(req, exc.status), exc.reason)
            if dsn.status[0] == "4":
                self.state.hop = dsn
            for i in pending:
                if i not in att.soft:
                    att.final[i] = dsn
            return self._results(req, att, [])
        limit = self.params.mx_address_limit
        addrs = addrs[:limit] if limit > 0 else addrs
        for n, addr in enumerate(addrs):
            if addr in tried:  # the cached session was with this server
                continue
            last = n == len(addrs) - 1
            # Postfix stores under the nexthop only sessions with the first (best) server.
            home = dest if n == 0 else None
            cached = (await self.cache.take_endpoint(endpoint_key(addr, policy),
                                                     tls=self.need_tls)
                      if load else None)
            if cached is None or not await self._use(cached, req, content, pending, att,
                                                     last=last, dest=home, store=store):
                try:
                    sess = await self._session(addr, req)
                except SmtpFailure as exc:
                    att.fail(pending, exc, exc.relay, last=last,
                             soft_bounce=self.soft_bounce)
                    pending = [i for i in pending if i not in att.final]
                    continue
                await self._use(sess, req, content, pending, att, last=last, dest=home,
                                store=store)
            sessions += 1
            pending = [i for i in pending if i not in att.final]
            if not pending:
                break
            if self.params.mx_session_limit > 0 and sessions >= self.params.mx_session_limit:
                break
        return self._results(req, att, pending)

    def _configured(self, req: DeliverRequest, status: str) -> str:
        """The status for a failed lookup of ``req.nexthop`` (``status``, e.g. "5.4.4"):
        a hard failure of the relayhost becomes "4.3.5" after the warning ``relayhost
        configuration problem`` (Postfix smtp_connect_remote(): the nexthop string
        compared with var_relayhost); anything else is returned unchanged."""
        if status[0] == "4" or not self.relayhost or req.nexthop != self.relayhost:
            return status
        log.warning("relayhost configuration problem")
        return "4.3.5"

    async def _use(self, sess: SmtpSession, req: DeliverRequest, content: Content,
                   pending: list[int], att: Attempt, *, last: bool, dest: Key | None,
                   store: bool) -> bool:
        """One transaction on ``sess``; then cache or QUIT it (a failed one is closed).

        Returns False, with ``att`` as it was and the session closed, when a reused
        session turned out dead (lost, timed out, 421) before the content was sent: the
        caller makes a new connection instead; nothing is logged."""
        reused = sess.reuse_count > 0
        saved = att.save()
        sess.committed = False
        self.state.conn_setup_done = self.clock()
        try:
            await transaction(sess, req, content, pending, att, self.params)
        except SmtpFailure as exc:
            sess.close()
            if reused and not sess.committed:
                att.restore(saved)
                return False
            left = [i for i in pending if i not in att.final]
            att.fail(left, exc, sess.relay, last=last, soft_bounce=self.soft_bounce)
            return True
        if reused and sess.dead and not sess.committed:
            sess.close()
            att.restore(saved)
            return False
        att.site = None
        await self._release(sess, dest, store, req)
        return True

    def _results(self, req: DeliverRequest, att: Attempt,
                 pending: list[int]) -> list[tuple[RecipientInfo, Dsn]]:
        """One Dsn per recipient (relay= recorded); the hop status when some are left."""
        results: list[tuple[RecipientInfo, Dsn]] = []
        for rcpt, dsn, relay in att.results(req):
            self.state.set_relay(rcpt, relay)
            results.append((rcpt, dsn))
        if pending and att.site is not None:
            self.state.hop = att.site
        return results

    async def _addresses(self, nexthop: str, domain: bool = False) -> list[Address]:
        """The servers of ``nexthop``; a name is looked up in the default executor
        (dnspython and getaddrinfo block), so the other deliveries of the process go on
        meanwhile; an IP literal needs no lookup.  ``domain``: the nexthop is the
        recipients' domain (module docstring).

        Raises:
            DnsError: 5.4.4 for an invalid recipient domain, 4.3.5 for an invalid
                configured nexthop, else what the lookup raised.
        """
        try:
            hops = parse_nexthop(nexthop)
            if domain and not _one_domain(nexthop):
                raise ValueError("a port or a list in a domain")
        except ValueError as exc:
            if domain:
                raise DnsError("5.4.4", f"Name service error for {nexthop}: invalid host "
                                        "or domain name") from None
            raise DnsError("4.3.5", f"bad nexthop {nexthop!r}: {exc}") from None
        if all(hop.literal for hop in hops):
            return self._lookup(hops)
        return await asyncio.get_running_loop().run_in_executor(None, self._lookup, hops)

    def _lookup(self, hops: list[Nexthop]) -> list[Address]:
        assert self.resolver is not None
        addrs: list[Address] = []
        error: DnsError | None = None
        for hop in hops:
            try:
                addrs.extend(self.resolver.resolve(hop))
            except DnsError as exc:
                error = exc
        if not addrs:
            assert error is not None
            raise error
        return addrs

def main() -> NoReturn:
    """Run the smtp service under multi_server: up to ``smtp_process_delivery_limit``
    deliveries at once per process, with the agent's timer hook (idle cached sessions
    are closed every second or so and when the process exits)."""
    agent = SmtpAgent()

    def limit(ctx: ServerContext) -> int:
        return agent.process_limit

    multi_server(agent.serve_async, limit=limit, pre_jail=agent.pre_jail,
                 post_jail=agent.post_jail, timer=agent.timer_async)


if __name__ == "__main__":
    main()
