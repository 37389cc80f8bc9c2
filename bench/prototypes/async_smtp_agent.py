"""bench/prototypes/async_smtp_agent.py - PROTOTYPE (measurement only, not a product): an asyncio smtp delivery agent that
serves many delivery requests concurrently in one process, with one in-process SMTP
connection cache shared by all of them.

Not a product. Runs under master.server.skeleton.async_server as the ``smtp`` service
(master.cf command ``bench.prototypes.async_smtp_agent``; bench/prototypes/compare.py
runs it against the stock agent, see bench/README.md "Prototype"):

* accepts on ctx.listen_fds up to LIMIT connections at once; tells the master "busy"
  only while at LIMIT (or retiring), "idle" otherwise; retires after max_use x LIMIT
  requests, after max_idle seconds without a request, or on ctx.stopping.
* per connection: protocol greeting, request (qmgrd.delivery framing), QueueFile.open
  (shared lock), content via transports.smtp.build_content, one SMTP transaction over
  asyncio streams (EHLO; RSET (reused session) + MAIL + RCPT... + DATA pipelined; body;
  the session is then kept in the cache keyed by nexthop, per the request's
  CONN_LOAD/CONN_STORE flags as SmtpAgent does), then DeliveryAgent._finish (marks
  done, logs the delivery line, status logs) and the reply.
* Skipped versus transports.smtp: DNS/MX (only the first address of the nexthop), the
  mx_session/address limits and trying the next server, HELO fallback, SMTPUTF8 /
  SIZE-limit / bad-address checks, per-phase Postfix timeouts (one overall timeout),
  Postfix's failure wording, and non-pipelining servers. Any failure defers every
  recipient (4.4.2, hop status set); a reused session that dies before DATA is retried
  once on a new connection.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Coroutine
from typing import Any, NoReturn

from master import log
from master.server.skeleton import ServerContext, async_server
from qmgrd import delivery
from qmgrd.delivery import AttrDecoder, DeliverRequest, DeliverStatus, ProtocolError, RecipientInfo
from qmgrd.spool.envelope import DSN_NOTIFY_SUCCESS, DSN_RET_FULL, DSN_RET_HDRS
from qmgrd.spool.message import QueueFile, QueueFileError
from transports.agent import DeliveryState, Dsn, make_dsn
from transports.smtp import SmtpAgent, _angle, _rcpt_dsn_options, build_content, xtext
from transports.smtp_dns import Address
from transports.smtp_session import Reply

LIMIT = int(os.environ.get("PROTO_SMTP_LIMIT", "50"))
_TASKS: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
_READ_ERROR = "queue file read error"


class _Fail(Exception):
    def __init__(self, status: str, reason: str, committed: bool) -> None:
        super().__init__(reason)
        self.status, self.reason, self.committed = status, reason, committed


class ASession:
    """One SMTP connection over asyncio streams."""

    def __init__(self, addr: Address, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.addr = addr
        self.reader = reader
        self.writer = writer
        self.features: dict[str, str] = {}
        self.created = time.monotonic()
        self.reuse_count = 0
        self.dead = False
        self.expires = 0.0

    @property
    def relay(self) -> str:
        if self.reuse_count:
            return f"{self.addr.relay}, conn_use={self.reuse_count + 1}"
        return self.addr.relay

    def has(self, feature: str) -> bool:
        return feature in self.features

    async def reply(self, what: str) -> Reply:
        lines: list[str] = []
        code = 0
        while True:
            line = await self.reader.readline()
            if not line:
                self.dead = True
                raise _Fail("4.4.2", f"lost connection with {self.addr.namaddr} while "
                            f"receiving reply to {what}", False)
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(text) < 3 or not text[:3].isdigit():
                self.dead = True
                raise _Fail("4.5.0", f"host {self.addr.namaddr} sent a malformed reply", False)
            code = int(text[:3])
            lines.append(text[4:])
            if text[3:4] != "-":
                break
        if code == 421:
            self.dead = True
        return Reply(code, lines)

    def close(self) -> None:
        self.dead = True
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001, S110 - a prototype: closing is best effort
            pass

    async def quit(self) -> None:
        if not self.dead:
            try:
                self.writer.write(b"QUIT\r\n")
                async with asyncio.timeout(2.0):
                    await self.reply("QUIT")
            except (Exception, TimeoutError):  # noqa: BLE001, S110 - best effort
                pass
        self.close()


class ProtoAgent(SmtpAgent):
    """SmtpAgent's configuration and bookkeeping (_finish etc.), async delivery."""

    name = "smtp"

    def __init__(self) -> None:
        super().__init__()
        self.idle_sessions: dict[str, list[ASession]] = {}

    # ---------------------------------------------------------------- connection cache
    def take(self, nexthop: str) -> ASession | None:
        lst = self.idle_sessions.get(nexthop)
        now = time.monotonic()
        while lst:
            s = lst.pop()
            if s.dead or s.reader.at_eof() or s.writer.is_closing() or now >= s.expires:
                _spawn(s.quit())
                continue
            s.reuse_count += 1
            return s
        return None

    def keep(self, nexthop: str, s: ASession, store: bool) -> None:
        p = self.params
        now = time.monotonic()
        if (not store or s.dead or p.cache_time_limit <= 0
                or (p.reuse_time_limit > 0 and now - s.created >= p.reuse_time_limit)
                or (p.reuse_count_limit > 0 and s.reuse_count >= p.reuse_count_limit)):
            _spawn(s.quit())
            return
        s.expires = now + p.cache_time_limit
        self.idle_sessions.setdefault(nexthop, []).append(s)

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for key, lst in list(self.idle_sessions.items()):
                keep = [s for s in lst if now < s.expires and not s.dead]
                for s in lst:
                    if s not in keep:
                        await s.quit()
                self.idle_sessions[key] = keep

    async def close_all(self) -> None:
        for lst in self.idle_sessions.values():
            for s in lst:
                await s.quit()
        self.idle_sessions.clear()

    # ---------------------------------------------------------------- SMTP
    async def connect(self, addr: Address) -> ASession:
        p = self.params
        try:
            async with asyncio.timeout(p.connect_timeout or None):
                reader, writer = await asyncio.open_connection(addr.ip, addr.port)
        except (OSError, TimeoutError) as exc:
            raise _Fail("4.4.1", f"connect to {addr.relay}: {exc}", False) from None
        s = ASession(addr, reader, writer)
        greet = await s.reply("initial greeting")
        if greet.code // 100 != 2:
            s.close()
            raise _Fail("4.3.0", f"host {addr.namaddr} refused to talk to me: {greet.text}",
                        False)
        writer.write(f"EHLO {p.helo_name}\r\n".encode())
        ehlo = await s.reply("EHLO")
        if ehlo.code // 100 != 2:
            s.close()
            raise _Fail("4.3.0", f"host {addr.namaddr} refused to talk to me: {ehlo.text}",
                        False)
        for line in ehlo.lines[1:]:
            word, _, arg = line.partition(" ")
            s.features[word.lower()] = arg.strip()
        return s

    async def transaction(self, s: ASession, req: DeliverRequest, content: bytes,
                          reused: bool) -> list[tuple[RecipientInfo, Dsn]]:
        """MAIL/RCPT/DATA pipelined; per-recipient Dsn. Raises _Fail."""
        rcpts = req.recipients
        opts = []
        if s.has("size"):
            opts.append(f"SIZE={len(content)}")
        if s.has("8bitmime") and (req.encoding == "8bit" or not content.isascii()):
            opts.append("BODY=8BITMIME")
        dsn_ok = s.has("dsn")
        if dsn_ok and req.envelope_id:
            opts.append(f"ENVID={xtext(req.envelope_id)}")
        if dsn_ok and req.ret_flags & (DSN_RET_FULL | DSN_RET_HDRS):
            opts.append("RET=" + ("FULL" if req.ret_flags & DSN_RET_FULL else "HDRS"))
        mail = " ".join([f"MAIL FROM:{_angle(req.sender)}", *opts])
        rcpt_lines = [" ".join([f"RCPT TO:{_angle(r.address)}"]
                               + (_rcpt_dsn_options(r) if dsn_ok else [])) for r in rcpts]
        batch = [*(["RSET"] if reused else []), mail, *rcpt_lines, "DATA"]
        s.writer.write("".join(x + "\r\n" for x in batch).encode("utf-8", "surrogateescape"))
        if reused:
            rset_r = await s.reply("RSET")
            if rset_r.code != 250:
                s.dead = True
                raise _Fail("4.4.2", "RSET refused", False)
        mail_r = await s.reply("MAIL FROM")
        rcpt_rs = [await s.reply("RCPT TO") for _ in rcpts]
        data_r = await s.reply("DATA")
        results: list[tuple[RecipientInfo, Dsn]] = []
        accepted = []
        for r, rr in zip(rcpts, rcpt_rs, strict=True):
            bad = mail_r if mail_r.code // 100 != 2 else (rr if rr.code // 100 != 2 else None)
            if bad is None:
                accepted.append(r)
            else:
                results.append((r, self._reply_dsn(s, bad)))
        if data_r.code != 354:
            if accepted:
                results += [(r, self._reply_dsn(s, data_r)) for r in accepted]
            return results
        if not accepted:
            s.writer.write(b".\r\n")
            await s.reply("end of DATA")
            return results
        s.writer.write(content + b".\r\n")
        try:
            final = await s.reply("end of DATA")
        except _Fail as exc:
            exc.committed = True
            raise
        if final.code // 100 != 2:
            return results + [(r, self._reply_dsn(s, final)) for r in accepted]
        dsn = make_dsn(final.dsn, final.text, action="relayed", diag_type="smtp",
                       diag_text=final.text, mta_type="dns", mta_mname=s.addr.hostname)
        for r in accepted:
            if dsn_ok:
                r.notify &= ~DSN_NOTIFY_SUCCESS
            results.append((r, dsn))
        return results

    @staticmethod
    def _reply_dsn(s: ASession, reply: Reply) -> Dsn:
        status = reply.dsn if reply.code // 100 in (4, 5) else "4.5.0"
        return make_dsn(status, f"host {s.addr.namaddr} said: {reply.text}",
                        diag_type="smtp", diag_text=reply.text, mta_type="dns",
                        mta_mname=s.addr.hostname)

    async def deliver_async(self, req: DeliverRequest, msg: QueueFile,
                            st: DeliveryState) -> list[tuple[RecipientInfo, Dsn]]:
        content = build_content(msg.iter_lines(), self.params.line_length_limit)
        load, store = self._cache_mode(req)
        key = req.nexthop.strip().lower()
        for attempt in range(2):
            s = self.take(key) if (load and attempt == 0) else None
            reused = s is not None
            if s is None:
                try:
                    addr = self._addresses(req.nexthop)[0]
                    s = await self.connect(addr)
                except _Fail as exc:
                    st.hop = make_dsn(exc.status, exc.reason)
                    return [(r, st.hop) for r in req.recipients]
            st.conn_setup_done = self.clock()
            try:
                async with asyncio.timeout(self.params.data_done_timeout):
                    results = await self.transaction(s, req, content, reused)
            except (_Fail, OSError, TimeoutError) as exc:
                s.close()
                committed = isinstance(exc, _Fail) and exc.committed
                if reused and not committed:
                    continue  # a dead cached session: silently a new connection
                reason = exc.reason if isinstance(exc, _Fail) else (
                    f"lost connection with {s.addr.namaddr}: {exc or type(exc).__name__}")
                st.hop = make_dsn("4.4.2", reason)
                for r in req.recipients:
                    st.set_relay(r, s.relay)
                return [(r, st.hop) for r in req.recipients]
            for r in req.recipients:
                st.set_relay(r, s.relay)
            self.keep(key, s, store)
            return results
        raise AssertionError("not reached")

    # ---------------------------------------------------------------- one request
    async def handle_conn(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(sock, delivery.protocol_greeting(delivery.DELIVER_PROTOCOL))
            dec = AttrDecoder()
            async with asyncio.timeout(self.ipc_timeout):
                common = await _read_list(loop, sock, dec)
                req, count = DeliverRequest.from_common(common)
                req.recipients = [RecipientInfo.from_attrs(await _read_list(loop, sock, dec))
                                  for _ in range(count)]
            self._check_request(req)
        except (ProtocolError, OSError, TimeoutError) as exc:
            log.warning(f"malformed or unread delivery request: {exc}")
            return
        reply = await self.handle_async(req)
        try:
            await loop.sock_sendall(sock, delivery.encode(reply.to_attrs()))
        except (ProtocolError, OSError) as exc:
            log.warning(f"{req.queue_id}: cannot send delivery status: {exc}")

    async def handle_async(self, req: DeliverRequest) -> DeliverStatus:
        assert self.spool is not None
        if not req.handoff:
            req.handoff = self.clock()
        st = DeliveryState()
        try:
            msg = QueueFile.open(self.spool, req.queue_name, req.queue_id, lock="sh")
        except (QueueFileError, OSError) as exc:
            log.warning(f"{req.queue_id}: cannot open queue file: {exc}")
            self.state = st
            return self._finish_all(req, None, make_dsn("4.3.0", _READ_ERROR))
        with msg:
            try:
                results = await self.deliver_async(req, msg, st)
            except Exception as exc:  # noqa: BLE001 - prototype: defer on anything
                log.warning(f"{req.queue_id}: prototype agent failed: {exc!r}")
                results = [(r, make_dsn("4.3.0", "unknown mail transport error"))
                           for r in req.recipients]
            # _finish and _log read self.state; nothing awaits in between, so no other
            # request can interleave here
            self.state = st
            return self._finish(req, msg, results)


async def _read_list(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                     dec: AttrDecoder) -> list[tuple[str, str]]:
    while True:
        lst = dec.pop()
        if lst is not None:
            return lst
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise ProtocolError("unexpected EOF")
        dec.feed(data)


class Server:
    """Accept loop with busy/idle reporting (see the module docstring)."""

    def __init__(self, ctx: ServerContext, agent: ProtoAgent) -> None:
        self.ctx = ctx
        self.agent = agent
        self.max_use = ctx.config.get_int("max_use") * LIMIT
        self.max_idle = ctx.config.get_time("max_idle")
        self.active = 0
        self.accepted = 0
        self.busy = False
        self.reading = False
        self.closed = False
        self.wake = asyncio.Event()
        self.listeners: list[socket.socket] = []
        self.last = 0.0

    def refresh(self) -> None:
        loop = asyncio.get_running_loop()
        reading = not self.closed and self.active < LIMIT
        if reading != self.reading:
            self.reading = reading
            for s in self.listeners:
                if reading:
                    loop.add_reader(s.fileno(), self.on_readable, s)
                else:
                    loop.remove_reader(s.fileno())
        busy = self.closed or self.active >= LIMIT
        if busy != self.busy:
            self.busy = busy
            if busy:
                self.ctx.busy()
            else:
                self.ctx.idle()

    def on_readable(self, lsock: socket.socket) -> None:
        while self.active < LIMIT and not self.closed:
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning(f"accept: {exc}")
                break
            conn.setblocking(False)
            self.active += 1
            self.accepted += 1
            if self.max_use and self.accepted >= self.max_use:
                self.closed = True
            _spawn(self.run_one(conn))
        self.refresh()

    async def run_one(self, conn: socket.socket) -> None:
        try:
            await self.agent.handle_conn(conn)
        except BaseException as exc:
            import traceback
            log.warning("prototype: request task failed: "
                        + traceback.format_exc().replace("\n", " | "))
            if not isinstance(exc, Exception):
                raise
        finally:
            conn.close()
            self.active -= 1
            self.last = asyncio.get_running_loop().time()
            self.refresh()
            self.wake.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.listeners = [socket.socket(fileno=os.dup(fd)) for fd in self.ctx.listen_fds]
        for s in self.listeners:
            s.setblocking(False)
        self.last = loop.time()
        expirer = loop.create_task(self.agent.expire_loop())
        stopping = loop.create_task(self.ctx.stopping.wait())
        self.refresh()
        try:
            while True:
                self.wake.clear()
                if self.ctx.stopping.is_set():
                    self.closed = True
                    self.refresh()
                if self.closed and not self.active:
                    return
                timeout = None
                if not self.active and self.max_idle > 0:
                    timeout = self.last + self.max_idle - loop.time()
                    if timeout <= 0:
                        return
                waiter = loop.create_task(self.wake.wait())
                await asyncio.wait({waiter, stopping}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            expirer.cancel()
            stopping.cancel()
            self.closed = True
            self.refresh()
            for s in self.listeners:
                s.close()
            await self.agent.close_all()


def main() -> NoReturn:
    agent = ProtoAgent()

    async def _main(ctx: ServerContext) -> None:
        await Server(ctx, agent).serve()

    async_server(_main, pre_jail=agent.pre_jail)


if __name__ == "__main__":
    main()
