"""smtp connection reuse (transports.smtp_cache, issue 8): the smtp agent keeps a session
after a delivery when the request asks for it (the qmgr's DEL_REQ_FLAG_CONN_STORE, or
smtp_connection_cache_destinations) and the next request to the same destination uses it
(RSET, no connect, greeting or EHLO; ``conn_use=N`` in the log). Dead cached sessions are
replaced silently; the reuse count limit and the idle time limit hold; idle sessions get
QUIT. Peers are a counting SMTP server in its own process (PEER below)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import MailSystem, fill_deferred, free_port, terminate, wait_for
from test_agent_support import (
    Env,
    close_log,  # noqa: F401 - autouse fixture
    make_env,
    round_trip,
)

from qmgrd.delivery import (
    DEL_REQ_FLAG_CONN_LOAD,
    DEL_REQ_FLAG_CONN_MASK,
    DEL_REQ_FLAG_DEFLT,
    DeliverStatus,
)
from qmgrd.trigger import send_trigger
from transports.smtp import SmtpAgent
from transports.smtp_cache import CacheDestinations, ConnCache, dest_key, endpoint_key
from transports.smtp_dns import Address
from transports.smtp_session import SmtpParams, SmtpSession

# A counting SMTP peer: every event is one JSON line appended to OUT ("open", "cmd" with
# the verb, "msg" with the Message-ID after the final dot, "idle_close", "close").
# OPTS: idle_close (s: close a connection idle that long, after "421" if idle_421),
# rset (the reply to RSET; a 421 also closes), drop_after_rset (close on a MAIL that
# follows a RSET), pipelining (offer PIPELINING: the client then sends the cached
# session's RSET first in its MAIL/RCPT/DATA batch).
PEER = r"""
import asyncio, json, os, sys, time
port, opts, out = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
seq = [0]

def ev(c, kind, **kw):
    os.write(fd, (json.dumps({"c": c, "ev": kind, "t": time.time(), **kw}) + "\n").encode())

async def session(r, w):
    seq[0] += 1
    c = seq[0]
    ev(c, "open")
    after_rset = False
    try:
        w.write(b"220 peer.test ESMTP\r\n")
        while True:
            idle = opts.get("idle_close")
            try:
                line = await asyncio.wait_for(r.readline(), idle)
            except asyncio.TimeoutError:
                if opts.get("idle_421"):
                    w.write(b"421 4.4.2 peer.test Error: timeout exceeded\r\n")
                    await w.drain()
                ev(c, "idle_close")
                break
            if not line:
                break
            verb = line.decode("ascii", "replace").strip().split(" ")[0].upper()
            ev(c, "cmd", cmd=verb)
            if verb in ("EHLO", "HELO"):
                pipe = b"250-PIPELINING\r\n" if opts.get("pipelining") else b""
                w.write(b"250-peer.test\r\n" + pipe + b"250-SIZE 10000000\r\n250 8BITMIME\r\n")
            elif verb == "MAIL":
                if after_rset and opts.get("drop_after_rset"):
                    break
                w.write(b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                w.write(b"250 2.1.5 Ok\r\n")
            elif verb == "DATA":
                w.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                await w.drain()
                mid = ""
                while True:
                    body = await r.readline()
                    if body in (b".\r\n", b""):
                        break
                    if body.lower().startswith(b"message-id:"):
                        mid = body[11:].strip().decode("ascii", "replace")
                if not body:  # lost before the final dot: no message (RFC 5321 4.1.1.4)
                    break
                ev(c, "msg", mid=mid)
                w.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == "RSET":
                after_rset = True
                reply = opts.get("rset", "250 2.0.0 Ok")
                w.write(reply.encode() + b"\r\n")
                if reply.startswith("421"):
                    await w.drain()
                    break
            elif verb == "QUIT":
                w.write(b"221 2.0.0 Bye\r\n")
                await w.drain()
                break
            else:
                w.write(b"502 5.5.2 Error: command not recognized\r\n")
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        ev(c, "close")
        w.close()

async def main():
    srv = await asyncio.start_server(session, "127.0.0.1", port)
    print("ready", flush=True)
    async with srv:
        await srv.serve_forever()

asyncio.run(main())
"""


class Peer:
    """The counting peer in its own process (see PEER)."""

    def __init__(self, root: Path, **opts: Any) -> None:
        self.port = free_port()
        self.out = root / f"peer-{self.port}.jsonl"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER, str(self.port), json.dumps(opts), str(self.out)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n"

    @property
    def nexthop(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def connections(self) -> int:
        return sum(1 for e in self.events() if e["ev"] == "open")

    def messages(self) -> list[str]:
        return [e["mid"] for e in self.events() if e["ev"] == "msg"]

    def per_connection(self, kind: str, cmd: str = "") -> Counter[int]:
        return Counter(e["c"] for e in self.events()
                       if e["ev"] == kind and (not cmd or e.get("cmd") == cmd))

    def closed(self) -> set[int]:
        return {e["c"] for e in self.events() if e["ev"] == "close"}

    def quit_then_closed(self) -> bool:
        """Every connection ended with QUIT from the client."""
        ev = self.events()
        opened = {e["c"] for e in ev if e["ev"] == "open"}
        quits = {e["c"] for e in ev if e["ev"] == "cmd" and e["cmd"] == "QUIT"}
        return bool(opened) and opened == quits == self.closed()

    def stop(self) -> None:
        terminate(self.proc, grace=0)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.stop()


def peer(peers: list[Peer], root: Path, **opts: Any) -> Peer:
    p = Peer(root, **opts)
    peers.append(p)
    return p


@pytest.fixture
def agents() -> Iterator[list[SmtpAgent]]:
    made: list[SmtpAgent] = []
    yield made
    for a in made:
        a.timer(True)  # QUIT whatever is still cached (no socket left open)


def agent_for(env: Env, agents: list[SmtpAgent]) -> SmtpAgent:
    a = SmtpAgent()
    a.configure(env.cfg, "smtp")
    agents.append(a)
    return a


STORE = DEL_REQ_FLAG_DEFLT | DEL_REQ_FLAG_CONN_MASK
LOAD = DEL_REQ_FLAG_DEFLT | DEL_REQ_FLAG_CONN_LOAD


def send(env: Env, agent: SmtpAgent, nexthop: str, flags: int, n: int = 0) -> DeliverStatus:
    content = f"Subject: t{n}\nMessage-ID: <m{n}@test>\n\nbody {n}\n".encode()
    qid = env.queue([f"bob{n}@example.net"], content=content)
    _, reply = round_trip(agent, env.request(qid, nexthop, flags=flags), env.ctx())
    assert reply is not None
    return reply


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path, smtp_connection_cache_time_limit="30s",
                    smtp_quit_timeout="2s", smtp_rset_timeout="2s")


# ------------------------------------------------------------------ one agent, in-process


def test_reuse_skips_connect_greeting_and_ehlo(env: Env, tmp_path: Path,
                                               peers: list[Peer], agents: list[SmtpAgent]) -> None:
    p = peer(peers, tmp_path)
    a = agent_for(env, agents)
    for n in range(3):
        assert send(env, a, p.nexthop, STORE, n).status == 0
    assert p.connections() == 1
    assert p.messages() == ["<m0@test>", "<m1@test>", "<m2@test>"]
    assert p.per_connection("cmd", "EHLO") == {1: 1}
    assert p.per_connection("cmd", "RSET") == {1: 2}  # checked before each reuse
    assert p.per_connection("cmd", "QUIT") == {}  # still cached
    log = env.log()
    relay = f"relay=127.0.0.1[127.0.0.1]:{p.port}"
    assert f"to=<bob0@example.net>, {relay}, delay=" in log
    assert f"to=<bob1@example.net>, {relay}, conn_use=2, delay=" in log
    assert f"to=<bob2@example.net>, {relay}, conn_use=3, delay=" in log
    a.timer(True)
    wait_for(p.quit_then_closed, 10, "QUIT when the agent exits")


def test_without_store_flag_every_delivery_quits(env: Env, tmp_path: Path,
                                                 peers: list[Peer],
                                                 agents: list[SmtpAgent]) -> None:
    p = peer(peers, tmp_path)
    a = agent_for(env, agents)
    for n in range(2):
        assert send(env, a, p.nexthop, DEL_REQ_FLAG_DEFLT, n).status == 0
    wait_for(lambda: p.connections() == 2 and p.quit_then_closed(), 10, "two sessions")
    assert "conn_use=" not in env.log()


def test_load_without_store_reuses_then_quits(env: Env, tmp_path: Path, peers: list[Peer],
                                              agents: list[SmtpAgent]) -> None:
    """The last message of a burst (qmgr: nothing more waiting) uses the cached session
    and closes it instead of leaving it idle."""
    p = peer(peers, tmp_path)
    a = agent_for(env, agents)
    assert send(env, a, p.nexthop, STORE, 0).status == 0
    assert send(env, a, p.nexthop, LOAD, 1).status == 0
    wait_for(p.quit_then_closed, 10, "QUIT after the last message")
    assert p.connections() == 1 and len(p.messages()) == 2
    assert len(a.cache) == 0


def test_cache_destinations_without_qmgr_flags(tmp_path: Path, peers: list[Peer],
                                              agents: list[SmtpAgent]) -> None:
    env = make_env(tmp_path, smtp_connection_cache_on_demand="no",
                   smtp_connection_cache_destinations="127.0.0.1",
                   smtp_connection_cache_time_limit="30s")
    p = peer(peers, tmp_path)
    a = agent_for(env, agents)
    for n in range(3):
        assert send(env, a, p.nexthop, DEL_REQ_FLAG_DEFLT, n).status == 0
    assert p.connections() == 1 and len(p.messages()) == 3
    # on_demand = no: the qmgr's flags alone do not cache
    env2 = make_env(tmp_path / "b", smtp_connection_cache_on_demand="no")
    b = agent_for(env2, agents)
    q = peer(peers, tmp_path)
    for n in range(2):
        assert send(env2, b, q.nexthop, STORE, n).status == 0
    wait_for(lambda: q.connections() == 2 and q.quit_then_closed(), 10, "no reuse")


@pytest.mark.parametrize("opts", [
    {"idle_close": 0.3},                      # the peer closed the idle connection
    {"idle_close": 0.3, "idle_421": True},    # ... after an unsolicited 421
    {"rset": "421 4.7.0 peer.test Error: too many connections"},
    {"rset": "554 5.5.1 Error: no thanks"},
    {"drop_after_rset": True},                # lost while sending MAIL FROM
], ids=["closed", "421-idle", "421-rset", "5xx-rset", "lost-mail"])
@pytest.mark.parametrize("pipelining", [False, True], ids=["", "pipelined"])
def test_dead_cached_session_is_replaced_silently(env: Env, tmp_path: Path, peers: list[Peer],
                                                  agents: list[SmtpAgent],
                                                  opts: dict[str, Any],
                                                  pipelining: bool) -> None:
    p = peer(peers, tmp_path, **opts, pipelining=pipelining)
    a = agent_for(env, agents)
    assert send(env, a, p.nexthop, STORE, 0).status == 0
    if "idle_close" in opts:
        wait_for(lambda: p.closed() == {1}, 10, "the peer to drop the idle connection")
    reply = send(env, a, p.nexthop, STORE, 1)
    assert reply.status == 0 and not reply.hop_failed
    assert p.messages() == ["<m0@test>", "<m1@test>"]
    assert p.connections() == 2
    log = env.log()
    assert "status=deferred" not in log and "warning" not in log
    assert log.count("status=sent") == 2 and "conn_use=" not in log


def test_reuse_count_limit(tmp_path: Path, peers: list[Peer], agents: list[SmtpAgent]) -> None:
    """With smtp_connection_reuse_count_limit = N a connection carries N + 1 messages."""
    env = make_env(tmp_path, smtp_connection_reuse_count_limit="2",
                   smtp_connection_cache_time_limit="30s")
    p = peer(peers, tmp_path)
    a = agent_for(env, agents)
    for n in range(7):
        assert send(env, a, p.nexthop, STORE, n).status == 0
    assert sorted(p.per_connection("msg").values()) == [1, 3, 3]
    # the two used-up connections were closed with QUIT right after their third message
    assert set(p.per_connection("cmd", "QUIT")) == {1, 2}
    assert "conn_use=4" not in env.log() and "conn_use=3" in env.log()


def test_idle_time_limit_quits(tmp_path: Path, peers: list[Peer],
                               agents: list[SmtpAgent]) -> None:
    env = make_env(tmp_path, smtp_connection_cache_time_limit="1s")
    p = peer(peers, tmp_path)
    a = agent_for(env, agents)
    assert send(env, a, p.nexthop, STORE, 0).status == 0
    wake = a.timer(False)
    assert wake is not None and 0 < wake <= 1.0
    assert len(a.cache) == 1 and p.per_connection("cmd", "QUIT") == {}
    wait_for(lambda: a.timer(False) is None, 10, "the idle session to expire")
    wait_for(p.quit_then_closed, 10, "QUIT at the peer")
    # an expired session is not used: a new connection
    assert send(env, a, p.nexthop, STORE, 1).status == 0
    assert p.connections() == 2


def test_sessions_are_not_shared_across_policies_or_destinations(tmp_path: Path) -> None:
    async def check(a: socket.socket, b: socket.socket) -> None:
        sess = SmtpSession(Address("h", "127.0.0.1", 25), SmtpParams())
        sess.sock = a
        cache = ConnCache(30, 300, 0)
        plain = ("mail.example", "")
        assert await cache.store(sess, dest_key("[h]:25", plain),
                                 endpoint_key(sess.addr, plain))
        other = ("mail.example", "encrypt")
        assert await cache.take_dest(dest_key("[h]:25", other)) is None
        assert await cache.take_endpoint(endpoint_key(sess.addr, other)) is None
        assert await cache.take_dest(dest_key("[other]:25", plain)) is None
        assert len(cache) == 1
        sess.close()
        await cache.close_all()  # a dead session gets no QUIT
        assert len(cache) == 0
        # too old for smtp_connection_reuse_time_limit: not kept
        fresh = SmtpSession(Address("h", "127.0.0.1", 25), SmtpParams())
        fresh.sock = b
        fresh.created -= 301
        assert not await cache.store(fresh, None, endpoint_key(fresh.addr, plain))
        fresh.sock = None

    a, b = socket.socketpair()
    with a, b:
        asyncio.run(check(a, b))


def test_cache_destinations_match(tmp_path: Path) -> None:
    listed = tmp_path / "list"
    listed.write_text("# relays\nrelay.example, [ignored]\n")
    table = tmp_path / "table"
    table.write_text("mx.example whatever\n")
    cd = CacheDestinations(["Example.COM", str(listed), f"texthash:{table}"])
    assert cd.match("example.com") and cd.match("[example.com]:587")
    assert cd.match("relay.example:2525") and cd.match("mx.example")
    assert not cd.match("other.example") and not cd.match("")
    assert not CacheDestinations([])


# ------------------------------------------------------------------ a whole system

DOMAIN = "reuse.example"


def system(mailsys: Any, p: Peer, **main: str) -> MailSystem:
    ms: MailSystem = mailsys(main=main)
    table = ms.etc / "transport"
    table.write_text(f"{DOMAIN} smtp:{p.nexthop}\n")
    ms.write_main(transport_maps=f"texthash:{table}")
    ms.start()
    return ms


def release(ms: MailSystem, n: int, tag: str) -> None:
    fill_deferred(ms, "alice@test.example", [f"u{i}@{DOMAIN}" for i in range(n)], tag=tag,
                  age=0)
    assert send_trigger(str(ms.spool / "public" / "qmgr"), b"D")


def smtp_pids(ms: MailSystem) -> set[int]:
    import re

    return {int(m) for m in re.findall(r"smtp\[(\d+)\]: \w+: to=<", ms.log())}


def test_system_drain_reuses_connections(mailsys: Any, tmp_path: Path,
                                         peers: list[Peer]) -> None:
    n, limit = 200, 4
    p = peer(peers, tmp_path)
    ms = system(mailsys, p, smtp_destination_concurrency_limit=str(limit),
                smtp_connection_cache_time_limit="30s")
    release(ms, n, "bulk")
    wait_for(lambda: len(p.messages()) >= n, 120, "every message at the peer")
    wait_for(ms.queue_empty, 30, "an empty queue")
    got = Counter(p.messages())
    assert len(got) == n and set(got.values()) == {1}, "each message exactly once"
    log = ms.log()
    assert log.count("status=sent") == n and "status=deferred" not in log
    # One agent process carries every delivery (`limit` at once, fewer than
    # smtp_process_delivery_limit), shares its cache among them and makes a new session
    # only when none is idle: at most about one per delivery running at once.
    conns, pids = p.connections(), smtp_pids(ms)
    assert len(pids) == 1, pids
    assert conns < n / 5, (conns, len(pids))
    assert conns <= 2 * limit, (conns, len(pids))
    assert "conn_use=" in log
    ms.stop()
    wait_for(p.quit_then_closed, 15, "QUIT on every connection when the agents exit")


def test_system_idle_sessions_quit_while_agents_live(mailsys: Any, tmp_path: Path,
                                                     peers: list[Peer]) -> None:
    """smtp_connection_cache_time_limit: the agents (multi_server timer hook) close
    idle sessions with QUIT between requests, not only when they exit."""
    n = 30
    p = peer(peers, tmp_path)
    ms = system(mailsys, p, smtp_connection_cache_time_limit="1s",
                smtp_destination_concurrency_limit="3")
    release(ms, n, "idle")
    wait_for(lambda: len(p.messages()) >= n, 60, "every message at the peer")
    assert "conn_use=" in ms.log()
    pids = smtp_pids(ms)
    wait_for(p.quit_then_closed, 20, "QUIT on every idle connection")
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert alive, "the agents are still alive (max_idle): the idle timer sent QUIT"
    assert sorted(Counter(p.messages()).values()) == [1] * n
    assert "status=deferred" not in ms.log()
    ms.stop()


def test_system_peer_closes_idle_cached_connections(mailsys: Any, tmp_path: Path,
                                                    peers: list[Peer]) -> None:
    p = peer(peers, tmp_path, idle_close=0.5)
    ms = system(mailsys, p, smtp_connection_cache_time_limit="60s",
                smtp_destination_concurrency_limit="2")
    release(ms, 10, "first")
    wait_for(lambda: len(p.messages()) >= 10, 60, "the first batch at the peer")
    opened = p.connections()
    wait_for(lambda: len(p.closed()) == opened, 20, "the peer to drop idle connections")
    release(ms, 10, "second")
    wait_for(lambda: len(p.messages()) >= 20, 60, "the second batch at the peer")
    wait_for(ms.queue_empty, 30, "an empty queue")
    assert sorted(Counter(p.messages()).values()) == [1] * 20
    log = ms.log()
    assert log.count("status=sent") == 20 and "status=deferred" not in log
    ms.stop()


def test_eviction_does_not_wait_for_the_evicted_servers_quit() -> None:
    """A full cache closes its oldest session to keep a new one: store() returns at
    once, the QUIT (unanswered here) goes on in the background, so the delivery that
    stores its session is not held up by another server's 221."""
    async def check(a: socket.socket, peer_a: socket.socket, b: socket.socket) -> None:
        params = SmtpParams(quit_timeout=60)
        old = SmtpSession(Address("h", "127.0.0.1", 25), params)
        old.sock, old._loop = a, asyncio.get_running_loop()
        new = SmtpSession(Address("h2", "127.0.0.2", 25), params)
        new.sock = b
        cache = ConnCache(30, 300, 0, max_sessions=1, quit_timeout=60)
        assert await cache.store(old, None, endpoint_key(old.addr, ("x", "")))
        key = endpoint_key(new.addr, ("x", ""))
        stored = asyncio.ensure_future(cache.store(new, None, key))
        done, _ = await asyncio.wait({stored}, timeout=20)
        assert done and stored.result(), "store() waited for the evicted session's QUIT"
        loop = asyncio.get_running_loop()
        assert await loop.sock_recv(peer_a, 100) == b"QUIT\r\n"
        await loop.sock_sendall(peer_a, b"221 bye\r\n")
        new.sock = None
        await cache.close_all()  # the background QUIT is awaited
        assert old.dead and old.sock is None

    a, peer_a = socket.socketpair()
    b, _peer_b = socket.socketpair()
    with a, peer_a, b, _peer_b:
        a.setblocking(False)
        peer_a.setblocking(False)
        asyncio.run(check(a, peer_a, b))
