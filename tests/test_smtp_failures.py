"""transports.smtp against misbehaving peers: refused, silent, garbage, lost connections,
HELO fallback, DSN parameters and trying the next server. Such failures defer (never
bounce) and set the hop status."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import free_port, terminate, wait_for
from test_agent_support import (
    Env,
    close_log,  # noqa: F401 - autouse fixture
    make_env,
    round_trip,
)

from master import log
from qmgrd.delivery import DeliverStatus
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import DSN_NOTIFY_DELAY, DSN_NOTIFY_FAILURE, DSN_RET_HDRS, Recipient
from transports.smtp import SmtpAgent

# A scripted SMTP peer in its own process. Steps: "<" read one command line, "<." read
# message data up to the lone dot ("<.slow": 64 KiB every 0.02 s), "!close" close the
# connection, "!raw:TEXT" send TEXT as it is (no CRLF added), anything else is sent as a
# reply (with CRLF). Everything read is written as JSON to OUT when the script ends.
PEER = r"""
import json, os, socket, sys, time
port, steps, out = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
srv = socket.create_server(("127.0.0.1", port))
print("ready", flush=True)
conn, _ = srv.accept()
f = conn.makefile("rb")
got = []
for step in steps:
    if step == "<":
        got.append(f.readline().decode("utf-8", "replace"))
    elif step in ("<.", "<.slow"):
        parts = []
        size = mark = 0
        while True:
            line = f.readline()
            if line in (b".\r\n", b""):
                break
            parts.append(line)
            size += len(line)
            if step == "<.slow" and size - mark >= 65536:
                mark = size
                time.sleep(0.02)
        got.append(b"".join(parts).decode("utf-8", "replace"))
    elif step == "!close":
        break
    elif step.startswith("!raw:"):
        conn.sendall(step[5:].encode("utf-8", "surrogateescape"))
    else:
        conn.sendall(step.encode("utf-8", "surrogateescape") + b"\r\n")
f.close()
conn.close()
srv.close()
with open(out + ".tmp", "w") as fh:
    json.dump(got, fh)
os.rename(out + ".tmp", out)
"""


class ScriptedPeer:
    def __init__(self, root: Path, steps: list[str]) -> None:
        self.port = free_port()
        self.out = root / f"peer-{self.port}.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER, str(self.port), json.dumps(steps), str(self.out)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n"

    def received(self) -> list[str]:
        wait_for(self.out.exists, 10, "peer transcript")
        got: list[str] = json.loads(self.out.read_text())
        return got

    def stop(self) -> None:
        terminate(self.proc, grace=0)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path, smtp_helo_timeout="2s", smtp_mail_timeout="2s",
                    smtp_rcpt_timeout="2s", smtp_data_done_timeout="2s",
                    smtp_quit_timeout="2s")


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[list[ScriptedPeer]]:
    made: list[ScriptedPeer] = []
    yield made
    for p in made:
        p.stop()


def script(peers: list[ScriptedPeer], root: Path, steps: list[str]) -> ScriptedPeer:
    p = ScriptedPeer(root, steps)
    peers.append(p)
    return p


EHLO_OK = "250-peer.test\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES"
FULL = ["220 peer.test ESMTP", "<", EHLO_OK, "<", "250 2.1.0 Ok", "<", "250 2.1.5 Ok",
        "<", "354 go ahead", "<.", "250 2.0.0 Ok: queued as XYZ", "<", "221 2.0.0 Bye"]


def deliver(env: Env, nexthop: str, rcpts: list[str | Recipient] | None = None,
            **envkw: Any) -> tuple[str, DeliverStatus]:
    qid = env.queue(rcpts or ["bob@example.net"], **envkw)
    agent = SmtpAgent()
    agent.configure(env.cfg, "smtp")
    _, reply = round_trip(agent, env.request(qid, nexthop), env.ctx())
    assert reply is not None
    return qid, reply


def deferred_reason(env: Env, qid: str) -> str:
    assert statuslog.read(env.spool, "bounce", qid) == []
    got = statuslog.read(env.spool, "defer", qid)
    assert got, "nothing deferred"
    return got[-1][1].reason


def test_connection_refused(env: Env) -> None:
    port = free_port()
    qid, reply = deliver(env, f"[127.0.0.1]:{port}")
    assert reply.status == 1 and reply.hop_failed and reply.dsn_status == "4.4.1"
    reason = deferred_reason(env, qid)
    assert reason == f"connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused"
    assert reply.reason == reason
    assert "relay=none" in env.log() and "status=deferred" in env.log()


def test_silent_server_times_out(tmp_path: Path) -> None:
    env = make_env(tmp_path, smtp_helo_timeout="1s")
    with socket.create_server(("127.0.0.1", 0)) as srv:  # listens, never answers
        port = srv.getsockname()[1]
        qid, reply = deliver(env, f"[127.0.0.1]:{port}")
    assert reply.status == 1 and reply.hop_failed
    assert deferred_reason(env, qid) == ("conversation with 127.0.0.1[127.0.0.1] timed out "
                                         "while receiving the initial server greeting")


def test_5xx_greeting_defers(env: Env, peers: list[ScriptedPeer], tmp_path: Path) -> None:
    p = script(peers, tmp_path, ["554 5.7.1 go away", "<", "221 bye"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 1 and reply.hop_failed
    assert deferred_reason(env, qid) == ("host 127.0.0.1[127.0.0.1] refused to talk to me: "
                                         "554 5.7.1 go away")
    # connected: the log names the server, as Postfix does (relay=none only when no
    # connection was made)
    assert f"relay=127.0.0.1[127.0.0.1]:{p.port}," in env.log()


@pytest.mark.parametrize("steps", [
    ["garbage greeting"],
    ["220 peer.test ESMTP", "<", EHLO_OK, "<", "250 2.1.0 Ok", "<", "x5x what?"],
    ["220 peer.test ESMTP", "<", EHLO_OK, "<", "250 2.1.0 Ok", "<", "250 2.1.5 Ok", "<",
     "354 go", "<.", "9999 nonsense"],
])
def test_garbage_reply_defers_never_bounces(env: Env, peers: list[ScriptedPeer],
                                            tmp_path: Path, steps: list[str]) -> None:
    p = script(peers, tmp_path, steps)
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 1 and reply.hop_failed
    reason = deferred_reason(env, qid)
    assert "malformed reply" in reason
    assert repr(steps[-1]) in reason  # quoted whole, as the peer sent it
    assert env.undone(qid) == ["bob@example.net"]


RCPT_STEPS = ["220 peer.test ESMTP", "<", EHLO_OK, "<", "250 2.1.0 Ok", "<"]
DOT_STEPS = FULL[:9] + ["<."]


@pytest.mark.parametrize("steps", [
    RCPT_STEPS + ["550_5.1.1 no such user", "<"],  # no separator after the code
    RCPT_STEPS + ["5500 5.1.1 no such user", "<"],  # four digits
    RCPT_STEPS + ["550-5.1.1 no\r\n550\t5.1.1 such user", "<"],  # a bad last line
    DOT_STEPS + ["250_2.0.0 queued"],  # not taken as the message accepted either
])
def test_a_code_without_its_separator_is_malformed(env: Env, peers: list[ScriptedPeer],
                                                   tmp_path: Path, steps: list[str]) -> None:
    """Postfix smtp_chat_resp(): a reply line is three digits and then "-", a space or
    its end; anything else is garbage, never a rejection (a bounce) or an acceptance."""
    p = script(peers, tmp_path, steps)
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 1 and reply.dsn_status == "4.5.0", env.log()
    assert "malformed reply" in deferred_reason(env, qid)
    assert env.undone(qid) == ["bob@example.net"]


@pytest.mark.parametrize(("steps", "phase"), [
    (RCPT_STEPS + ["!raw:550 5.1.1 no such user"], "sending RCPT TO"),
    (DOT_STEPS + ["!raw:250 2.0.0 Ok: queued"],
     "sending end of data -- message may be sent more than once"),
    (["220 peer.test", "<", "!raw:250-peer.test\r\n250 SIZE"],
     "performing the EHLO handshake"),
])
def test_a_reply_cut_short_by_the_end_of_the_connection_is_lost(
        env: Env, peers: list[ScriptedPeer], tmp_path: Path, steps: list[str],
        phase: str) -> None:
    """Postfix smtp_get(): EOF within a line is a lost connection, not a reply: a 550
    without its line end does not bounce (nor a 250 deliver)."""
    p = script(peers, tmp_path, [*steps, "!close"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 1 and reply.dsn_status == "4.4.2", env.log()
    assert deferred_reason(env, qid) == f"lost connection with 127.0.0.1[127.0.0.1] while {phase}"


def test_control_characters_in_a_reply_are_not_logged(env: Env, peers: list[ScriptedPeer],
                                                      tmp_path: Path) -> None:
    """Postfix printable(): NUL, ESC and bytes that are not UTF-8 in a server's reply
    become "?" in the log and the bounce; UTF-8 text is kept."""
    p = script(peers, tmp_path, RCPT_STEPS + [
        "550 5.1.1 bad\0user \x1b[31m\udcff caf\u00e9", "<"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 0, env.log()
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    want = "550 5.1.1 bad?user ?[31m? caf\u00e9"
    assert dsn.reason == f"host 127.0.0.1[127.0.0.1] said: {want} (in reply to RCPT TO command)"
    assert f"status=bounced (host 127.0.0.1[127.0.0.1] said: {want} " in env.log()
    assert "\0" not in env.log() and "\x1b" not in env.log()


@pytest.mark.parametrize(("cut", "phase"), [
    (0, "receiving the initial server greeting"),
    (2, "performing the EHLO handshake"),
    (4, "sending MAIL FROM"),
    (6, "sending RCPT TO"),
    (8, "sending DATA command"),
    (10, "sending end of data -- message may be sent more than once"),
])
def test_lost_connection_defers(env: Env, peers: list[ScriptedPeer], tmp_path: Path,
                                cut: int, phase: str) -> None:
    p = script(peers, tmp_path, FULL[:cut] + ["!close"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 1 and reply.hop_failed and reply.dsn_status == "4.4.2"
    assert deferred_reason(env, qid) == f"lost connection with 127.0.0.1[127.0.0.1] while {phase}"


def test_helo_fallback_and_no_esmtp_options(env: Env, peers: list[ScriptedPeer],
                                            tmp_path: Path) -> None:
    p = script(peers, tmp_path, ["220 old.test SMTP", "<", "502 5.5.2 what is EHLO", "<",
                                 "250 old.test"] + FULL[3:])
    _qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 0, env.log()
    got = p.received()
    assert got[0] == "EHLO mail.test.example\r\n"
    assert got[1] == "HELO mail.test.example\r\n"
    assert got[2] == "MAIL FROM:<alice@example.com>\r\n"
    assert got[3] == "RCPT TO:<bob@example.net>\r\n"
    assert got[4] == "DATA\r\n"
    assert got[5].endswith("\r\nhello\r\nworld\r\n")
    assert got[6] == "QUIT\r\n"


def test_dsn_parameters_when_offered(env: Env, peers: list[ScriptedPeer],
                                     tmp_path: Path) -> None:
    ehlo = "250-peer.test\r\n250-DSN\r\n250 SIZE"
    p = script(peers, tmp_path, ["220 peer.test ESMTP", "<", ehlo, "<", "250 2.1.0 Ok",
                                 "<", "250 2.1.5 Ok", "<", "250 2.1.5 Ok"] + FULL[7:])
    rcpts: list[str | Recipient] = [
        Recipient("bob@example.net", "alias@example.net", "rfc822;bob+x@example.net",
                  DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY),
        Recipient("carol@example.net", "c=1@example.org")]
    _qid, reply = deliver(env, f"[127.0.0.1]:{p.port}", rcpts, envid="env id 1",
                         ret=DSN_RET_HDRS)
    assert reply.status == 0, env.log()
    got = p.received()
    assert got[1].startswith("MAIL FROM:<alice@example.com> SIZE=")
    assert got[1].endswith(" ENVID=env+20id+201 RET=HDRS\r\n")
    assert got[2] == ("RCPT TO:<bob@example.net> NOTIFY=FAILURE,DELAY "
                      "ORCPT=rfc822;bob+2Bx@example.net\r\n")
    assert got[3] == "RCPT TO:<carol@example.net> ORCPT=rfc822;c+3D1@example.org\r\n"


def test_next_server_after_refusal_and_4xx(env: Env, peers: list[ScriptedPeer],
                                           tmp_path: Path) -> None:
    refused = free_port()
    busy = script(peers, tmp_path, ["220 busy.test", "<", EHLO_OK, "<", "250 2.1.0 Ok",
                                    "<", "451 4.3.0 try the backup", "<", "221 Bye"])
    good = script(peers, tmp_path, FULL)
    nexthop = f"[127.0.0.1]:{refused}, [127.0.0.1]:{busy.port}, [127.0.0.1]:{good.port}"
    qid, reply = deliver(env, nexthop)
    assert reply.status == 0 and not reply.hop_failed, env.log()
    assert env.undone(qid) == []
    assert f"relay=127.0.0.1[127.0.0.1]:{good.port}" in env.log()
    assert good.received()[2] == "RCPT TO:<bob@example.net>\r\n"


def test_5xx_rcpt_is_final_even_with_more_servers(env: Env, peers: list[ScriptedPeer],
                                                  tmp_path: Path) -> None:
    first = script(peers, tmp_path, ["220 a.test", "<", EHLO_OK, "<", "250 2.1.0 Ok",
                                     "<", "550 5.1.1 no such user", "<", "221 Bye"])
    other = free_port()
    qid, reply = deliver(env, f"[127.0.0.1]:{first.port}, [127.0.0.1]:{other}")
    assert reply.status == 0
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert dsn.status == "5.1.1"


def test_all_servers_refuse_keeps_last_reason(env: Env) -> None:
    p1, p2 = free_port(), free_port()
    qid, reply = deliver(env, f"[127.0.0.1]:{p1} [127.0.0.1]:{p2}")
    assert reply.status == 1 and reply.hop_failed
    assert deferred_reason(env, qid).endswith(f":{p2}: Connection refused")


def test_unresolvable_nexthop(env: Env) -> None:
    qid, reply = deliver(env, "[host name with spaces")
    assert reply.status == 1
    assert "bad nexthop" in deferred_reason(env, qid)


@pytest.mark.parametrize("domain", ["exa%mple.com", "Exa%Mple.COM.", "example.net:2525",
                                    "a.example,b.example"])
def test_an_invalid_recipient_domain_bounces(env: Env, domain: str) -> None:
    """The nexthop is the recipient's own domain (nothing configured one): an invalid one
    bounces 5.4.4 as Postfix's smtp client does (dns_lookup: HOST_NOT_FOUND for an
    invalid name) instead of waiting for maximal_queue_lifetime. A port or a list in a
    domain is invalid too: the sender does not choose our port or servers."""
    qid, reply = deliver(env, domain.lower().rstrip("."), [f"bob@{domain}"])
    assert reply.status == 0 and not reply.hop_failed
    assert statuslog.read(env.spool, "defer", qid) == []
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert dsn.status == "5.4.4"
    assert dsn.reason == (f"Name service error for {domain.lower().rstrip('.')}: invalid "
                          "host or domain name")
    assert "status=bounced" in env.log()


@pytest.mark.parametrize("nexthop", ["exa%mple.com", "example.net:99999"])
def test_an_invalid_configured_nexthop_defers(env: Env, nexthop: str) -> None:
    """The same names from a transport map (the nexthop is not the recipient's domain)
    are a configuration error: deferred until it is fixed, as Postfix defers on a bad
    transport table entry."""
    qid, reply = deliver(env, nexthop, ["bob@example.net"])
    assert reply.status == 1 and reply.hop_failed
    reason = deferred_reason(env, qid)
    assert reason.startswith(f"bad nexthop {nexthop!r}: ")


def test_python_m_transports_smtp_imports(tmp_path: Path) -> None:
    """``python -m transports.smtp`` starts (stand-alone), serves a request and exits 0
    (max_use=1 with one delivery per process: at once, not after max_idle)."""
    env = make_env(tmp_path)
    sock_path = tmp_path / "smtp.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "transports.smtp", "-c", str(tmp_path / "etc"), "-n", "smtp",
         "-l", str(sock_path), "-o", "max_idle=10s", "-o", "max_use=1",
         "-o", "smtp_process_delivery_limit=1"],
        cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True,
        stdin=subprocess.DEVNULL)
    try:
        wait_for(sock_path.exists, 15, "smtp agent socket")
        qid = env.queue(["bob@example.net"])
        port = free_port()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(str(sock_path))
            s.sendall(env.request(qid, f"[127.0.0.1]:{port}").encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert b"delivery_request_protocol" in data
        assert b"Connection refused" in data
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


EHLO_PIPE = "250-peer.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES"


def test_pipelining_sends_mail_rcpts_and_data_at_once(env: Env, peers: list[ScriptedPeer],
                                                      tmp_path: Path) -> None:
    """RFC 2920: with PIPELINING the peer reads MAIL, both RCPTs and DATA before it
    answers anything (a client that waited for each reply would time out here); the
    replies are matched in order: one recipient refused, the other delivered."""
    p = script(peers, tmp_path, ["220 peer.test ESMTP", "<", EHLO_PIPE, "<", "<", "<", "<",
                                 "250 2.1.0 Ok", "550 5.1.1 no such user", "250 2.1.5 Ok",
                                 "354 go ahead", "<.", "250 2.0.0 Ok: queued", "<", "221 Bye"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}", ["bob@example.net", "carol@example.net"])
    assert reply.status == 0, env.log()
    got = p.received()
    assert got[1:5] == ["MAIL FROM:<alice@example.com>\r\n", "RCPT TO:<bob@example.net>\r\n",
                        "RCPT TO:<carol@example.net>\r\n", "DATA\r\n"]
    assert got[6] == "QUIT\r\n"
    ((rcpt, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert (rcpt.address, dsn.status) == ("bob@example.net", "5.1.1")
    assert env.undone(qid) == []
    assert "to=<carol@example.net>" in env.log() and "status=sent" in env.log()


def test_pipelining_mail_refused_answers_every_recipient(env: Env,
                                                         peers: list[ScriptedPeer],
                                                         tmp_path: Path) -> None:
    p = script(peers, tmp_path, ["220 peer.test ESMTP", "<", EHLO_PIPE, "<", "<", "<",
                                 "550 5.7.1 sender refused", "503 5.5.1 no MAIL",
                                 "503 5.5.1 no valid recipients", "<", "221 Bye"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 0, env.log()
    assert p.received()[4] == "QUIT\r\n"  # no content after the refused DATA
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert dsn.status == "5.7.1" and "sender refused" in dsn.reason


def test_pipelining_data_accepted_without_recipients_is_ended_empty(
        env: Env, peers: list[ScriptedPeer], tmp_path: Path) -> None:
    """A server that answers 354 to the pipelined DATA although it refused every
    recipient gets an empty message (a lone dot), and nothing is delivered."""
    p = script(peers, tmp_path, ["220 peer.test ESMTP", "<", EHLO_PIPE, "<", "<", "<",
                                 "250 2.1.0 Ok", "450 4.2.0 try later", "354 go ahead",
                                 "<.", "554 5.5.1 no valid recipients", "<", "221 Bye"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status != 0
    got = p.received()
    assert got[4] == "" and got[5] == "QUIT\r\n"  # the empty message, then QUIT
    assert "try later" in deferred_reason(env, qid)


# A peer that greets, reads EHLO and then sends "250-" continuation lines without end.
FLOOD = r"""
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
conn, _ = srv.accept()
conn.sendall(b"220 flood.test ESMTP\r\n")
conn.recv(1000)
line = b"250-" + b"x" * 200 + b"\r\n"
try:
    while True:
        conn.sendall(line * 50)
except OSError:
    pass
"""


def test_flooding_peer_holds_up_nothing_and_times_out(env: Env, peers: list[ScriptedPeer],
                                                      tmp_path: Path) -> None:
    """One agent process, two deliveries at once: the peer of one floods continuation
    lines of its EHLO reply. That delivery is deferred when smtp_helo_timeout (2 s) is up,
    with bounded memory, and the other one is sent meanwhile (fresh-eyes finding: the
    flood froze the whole process and its timeout never fired)."""
    import asyncio
    import time

    port = free_port()
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(port)], stdout=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert flood.stdout is not None and flood.stdout.readline() == b"ready\n"
        good = script(peers, tmp_path, FULL)
        agent = SmtpAgent()
        agent.configure(env.cfg, "smtp")
        flooded = env.queue(["a@flood.test"])
        normal = env.queue(["b@example.net"])
        done: dict[str, float] = {}

        async def one(qid: str, nexthop: str) -> DeliverStatus:
            reply = await agent.handle_async(env.request(qid, nexthop))
            done[qid] = time.monotonic()
            return reply

        async def both() -> tuple[DeliverStatus, DeliverStatus]:
            first = asyncio.ensure_future(one(flooded, f"[127.0.0.1]:{port}"))
            await asyncio.sleep(0.3)  # the flood is under way
            second = await one(normal, f"[127.0.0.1]:{good.port}")
            return await first, second

        t0 = time.monotonic()
        r_flood, r_normal = asyncio.run(both())
    finally:
        terminate(flood, grace=0)
    assert r_normal.status == 0, "the other delivery was held up or failed"
    assert done[normal] < done[flooded], "the other delivery waited for the flood to end"
    assert r_flood.status == 1 and r_flood.dsn_status == "4.4.2"
    assert deferred_reason(env, flooded) == (
        "conversation with 127.0.0.1[127.0.0.1] timed out while performing the EHLO "
        "handshake")
    assert done[flooded] - t0 < 10, "smtp_helo_timeout (2 s) did not end the flood"


def test_overlong_reply_line_is_cut_warned_and_used(env: Env, peers: list[ScriptedPeer],
                                                    tmp_path: Path) -> None:
    """Postfix's smtp_chat_resp(): a reply line over line_length_limit (2048) is cut,
    the rest read and dropped, a warning logged, and the reply used - an overlong 250
    after the message is a delivery, not a deferral (and a duplicate at the retry)."""
    path = tmp_path / "maillog"
    log.setup("test", str(path))
    try:
        steps = list(FULL)
        steps[steps.index("250 2.0.0 Ok: queued as XYZ")] = "250 2.0.0 Ok " + "y" * 9000
        steps[steps.index("250 2.1.0 Ok")] = "250 2.1.0 " + "z" * 3000
        p = script(peers, tmp_path, steps)
        qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    finally:
        log.close()
    assert reply.status == 0, statuslog.read(env.spool, "defer", qid)
    warnings = [x.split(": ", 1)[1] for x in path.read_text().splitlines() if "warning" in x]
    head = f"warning: 127.0.0.1[127.0.0.1]:{p.port}: response longer than 2048: "
    assert warnings == [head + "250 2.1.0 " + "z" * 20 + "...",
                        head + "250 2.0.0 Ok " + "y" * 17 + "..."]


# Postfix smtp_site_fail()/smtp_bulk_fail(): a hard (5xx) failure after the greeting
# bounces at once, even with more servers left; a soft one tries the next server.
HELO_REFUSED = ["220 a.test ESMTP", "<", "550 5.7.1 not you", "<", "550 5.7.1 not you",
                "<", "221 Bye"]
GREETING_5XX = ["554 5.7.1 go away", "<", "221 Bye"]


@pytest.mark.parametrize(("steps", "skip", "reason"), [
    (HELO_REFUSED, "yes", "refused to talk to me: 550 5.7.1 not you"),
    (GREETING_5XX, "no", "refused to talk to me: 554 5.7.1 go away"),
    (["220 a.test", "<", EHLO_OK, "<", "550 5.7.1 sender refused", "<", "221 Bye"], "yes",
     "said: 550 5.7.1 sender refused (in reply to MAIL FROM command)"),
])
def test_hard_failure_bounces_without_trying_the_next_server(
        tmp_path: Path, peers: list[ScriptedPeer], steps: list[str], skip: str,
        reason: str) -> None:
    env = make_env(tmp_path, smtp_helo_timeout="2s", smtp_mail_timeout="2s",
                   smtp_skip_5xx_greeting=skip)
    first = script(peers, tmp_path, steps)
    good = script(peers, tmp_path, FULL)  # would take the mail: must not be used
    qid, reply = deliver(env, f"[127.0.0.1]:{first.port}, [127.0.0.1]:{good.port}")
    assert reply.status == 0 and not reply.hop_failed, env.log()
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert dsn.status == "5.7.1"
    assert dsn.reason == f"host 127.0.0.1[127.0.0.1] {reason}"
    assert statuslog.read(env.spool, "defer", qid) == []
    assert f"relay=127.0.0.1[127.0.0.1]:{first.port}," in env.log()
    assert "status=sent" not in env.log()


@pytest.mark.parametrize(("steps", "main"), [
    (GREETING_5XX, {}),  # smtp_skip_5xx_greeting = yes (default): counts as 4xx
    (HELO_REFUSED, {"soft_bounce": "yes"}),  # Postfix's soft_bounce_error: keep
])
def test_next_server_after_5xx_that_counts_as_soft(tmp_path: Path,
                                                   peers: list[ScriptedPeer],
                                                   steps: list[str],
                                                   main: dict[str, str]) -> None:
    env = make_env(tmp_path, smtp_helo_timeout="2s", smtp_mail_timeout="2s", **main)
    first = script(peers, tmp_path, steps)
    good = script(peers, tmp_path, FULL)
    qid, reply = deliver(env, f"[127.0.0.1]:{first.port}, [127.0.0.1]:{good.port}")
    assert reply.status == 0 and not reply.hop_failed, env.log()
    assert env.undone(qid) == []
    assert statuslog.read(env.spool, "bounce", qid) == []
    assert f"relay=127.0.0.1[127.0.0.1]:{good.port}" in env.log()


def test_hard_failure_from_the_last_server_with_soft_bounce_defers(
        tmp_path: Path, peers: list[ScriptedPeer]) -> None:
    env = make_env(tmp_path, smtp_helo_timeout="2s", soft_bounce="yes")
    p = script(peers, tmp_path, HELO_REFUSED)
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 1
    assert deferred_reason(env, qid) == ("host 127.0.0.1[127.0.0.1] refused to talk to me: "
                                         "550 5.7.1 not you")


def test_helo_after_a_4xx_ehlo_but_not_after_421(env: Env, peers: list[ScriptedPeer],
                                                 tmp_path: Path) -> None:
    """Postfix smtp_helo(): an EHLO reply other than 2xx and 421 makes it try HELO; 421
    is a refusal (soft: deferred)."""
    p = script(peers, tmp_path, ["220 old.test", "<", "451 4.3.0 EHLO later", "<",
                                 "250 old.test"] + FULL[3:])
    _qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 0, env.log()
    assert p.received()[1] == "HELO mail.test.example\r\n"
    p2 = script(peers, tmp_path, ["220 old.test", "<", "421 4.3.2 closing", "<",
                                  "221 Bye"])
    qid2, reply2 = deliver(env, f"[127.0.0.1]:{p2.port}")
    assert reply2.status == 1 and reply2.hop_failed
    assert deferred_reason(env, qid2) == ("host 127.0.0.1[127.0.0.1] refused to talk to "
                                          "me: 421 4.3.2 closing")
    assert not any(line.startswith("HELO") for line in p2.received())


@pytest.mark.parametrize(("level", "ehlo", "status", "reason"), [
    ("encrypt", EHLO_OK, "4.7.4",
     "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]"),
    ("fingerprint", "250-peer.test\r\n250 STARTTLS", "4.7.5",
     "TLS is required, but our TLS engine is unavailable"),
    ("dane-only", "250-peer.test\r\n250 STARTTLS", "4.7.5",
     "TLS is required, but our TLS engine is unavailable"),
])
def test_required_tls_defers_and_sends_nothing_in_the_clear(
        tmp_path: Path, peers: list[ScriptedPeer], level: str, ehlo: str, status: str,
        reason: str) -> None:
    """A level that requires TLS, and no TLS to be had (not offered; or a level whose
    certificate checks are not implemented): what Postfix's smtp_helo() does then, a
    soft site failure after EHLO, never MAIL FROM in plain text."""
    env = make_env(tmp_path, smtp_helo_timeout="2s", smtp_tls_security_level=level)
    p = script(peers, tmp_path, ["220 peer.test ESMTP", "<", ehlo, "<"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 1 and reply.hop_failed and reply.dsn_status == status, env.log()
    assert deferred_reason(env, qid) == reason
    assert not any(line.startswith(("MAIL", "STARTTLS")) for line in p.received())
    assert f"relay=127.0.0.1[127.0.0.1]:{p.port}," in env.log()


def test_starttls_refused_defers_when_tls_is_required(tmp_path: Path,
                                                      peers: list[ScriptedPeer]) -> None:
    """encrypt, STARTTLS offered but answered 454: Postfix's smtp_helo() fails the
    session with the reply (``TLS is required, but host H[ip] refused to start TLS``),
    MAIL FROM never sent."""
    env = make_env(tmp_path, smtp_helo_timeout="2s", smtp_tls_security_level="encrypt")
    p = script(peers, tmp_path, ["220 peer.test ESMTP", "<", "250-peer.test\r\n250 STARTTLS",
                                 "<", "454 4.7.0 TLS not available due to local problem",
                                 "<"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 1 and reply.dsn_status == "4.7.0", env.log()
    assert deferred_reason(env, qid) == (
        "TLS is required, but host 127.0.0.1[127.0.0.1] refused to start TLS: 454 4.7.0 "
        "TLS not available due to local problem")
    assert p.received()[1] == "STARTTLS\r\n"
    assert not any(line.startswith("MAIL") for line in p.received())


def test_starttls_answered_421_is_a_refusal(tmp_path: Path,
                                            peers: list[ScriptedPeer]) -> None:
    """may, STARTTLS answered 421 (the server closes): no MAIL FROM on the dead
    connection; deferred with the reply, as a 421 to EHLO is."""
    env = make_env(tmp_path, smtp_helo_timeout="2s", smtp_tls_security_level="may")
    p = script(peers, tmp_path, ["220 peer.test ESMTP", "<", "250-peer.test\r\n250 STARTTLS",
                                 "<", "421 4.3.2 shutting down", "<"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 1 and reply.dsn_status == "4.3.2", env.log()
    assert deferred_reason(env, qid) == ("host 127.0.0.1[127.0.0.1] refused to talk to me: "
                                         "421 4.3.2 shutting down")
    assert not any(line.startswith("MAIL") for line in p.received())


def test_starttls_refused_goes_on_in_the_clear_at_may(tmp_path: Path,
                                                      peers: list[ScriptedPeer]) -> None:
    """may, STARTTLS answered 454: on in the clear on the same connection (Postfix:
    "Else try to continue in plain-text mode")."""
    env = make_env(tmp_path, smtp_helo_timeout="2s", smtp_tls_security_level="may")
    p = script(peers, tmp_path, ["220 peer.test ESMTP", "<", "250-peer.test\r\n250 STARTTLS",
                                 "<", "454 4.7.0 TLS not available", *FULL[3:]])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 0, env.log()
    assert env.undone(qid) == []
    got = p.received()
    assert got[1] == "STARTTLS\r\n" and got[2].startswith("MAIL FROM:<alice@example.com>")


def test_a_slow_but_steady_transfer_is_not_cut_off(tmp_path: Path,
                                                   peers: list[ScriptedPeer]) -> None:
    """smtp_data_xfer_timeout limits a transfer that makes no progress (Postfix: per
    write), not the whole: 16 MB read at 64 KiB per 0.02 s (some 4 s beyond what the
    socket buffers hold) gets through a 2 s limit."""
    env = make_env(tmp_path, smtp_data_xfer_timeout="2s", smtp_data_done_timeout="10s",
                   message_size_limit="0")
    line = b"x" * 76
    content = b"Subject: big\n\n" + b"\n".join([line] * 210_000) + b"\n"
    qid = env.queue(["bob@example.net"], content)
    steps = ["220 peer.test ESMTP", "<", "250-peer.test\r\n250 8BITMIME", *FULL[3:9],
             "<.slow", *FULL[10:]]
    p = script(peers, tmp_path, steps)
    agent = SmtpAgent()
    agent.configure(env.cfg, "smtp")
    _, reply = round_trip(agent, env.request(qid, f"[127.0.0.1]:{p.port}"), env.ctx())
    assert reply is not None and reply.status == 0, env.log()
    assert "status=sent (250 2.0.0 Ok: queued as XYZ)" in env.log()
    assert len(p.received()[4]) > 16_000_000


def test_the_outcome_does_not_wait_for_the_reply_to_quit(peers: list[ScriptedPeer],
                                                          tmp_path: Path) -> None:
    """A server that accepts the message and never answers QUIT: the recipient is
    marked done and logged sent at once (Postfix smtp_rcpt_done()), not after
    smtp_quit_timeout, so that an agent stopped meanwhile cannot deliver it twice; the
    reply to the qmgr waits for the QUIT (the session still holds its concurrency
    slot), and an agent that exits gives the QUIT up."""
    import asyncio

    env = make_env(tmp_path, smtp_quit_timeout="120s")  # QUIT would be waited for so long
    p = script(peers, tmp_path, FULL[:-1] + ["<"])  # reads QUIT, answers nothing
    qid = env.queue(["bob@example.net"])
    agent = SmtpAgent()
    agent.configure(env.cfg, "smtp")

    async def run() -> DeliverStatus:
        nexthop = f"[127.0.0.1]:{p.port}"
        reply = asyncio.ensure_future(agent.handle_async(env.request(qid, nexthop)))
        deadline = time.monotonic() + 30
        while not (env.undone(qid) == [] and "status=sent" in env.log()):
            assert time.monotonic() < deadline, "no outcome while the server keeps QUIT"
            assert not reply.done()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert not reply.done(), "the reply went before the session was closed"
        await agent.timer_async(True)  # the agent exits: the QUIT is given up
        return await asyncio.wait_for(reply, 10)

    assert asyncio.run(run()).status == 0
    assert p.received()[-1] == ""  # QUIT read, then the connection closed by us


def test_a_refusal_sent_before_closing_mid_message_is_read(tmp_path: Path,
                                                           peers: list[ScriptedPeer]) -> None:
    """A server that refuses the message part way through (552, then closes): the
    lost connection while sending is followed by a read of that reply, which decides,
    as in Postfix's smtp_loop() (LOST_CONNECTION_INSIDE_DATA): a bounce with its DSN,
    whatever the message's size, not a deferral that retries for days."""
    env = make_env(tmp_path, smtp_data_done_timeout="10s", message_size_limit="0")
    line = b"x" * 76
    content = b"Subject: big\n\n" + b"\n".join([line] * 210_000) + b"\n"  # 16 MB
    qid = env.queue(["bob@example.net"], content)
    steps = ["220 peer.test ESMTP", "<", "250-peer.test\r\n250 8BITMIME", *FULL[3:9], "<",
             "552 5.3.4 Message size exceeds fixed limit", "!close"]
    p = script(peers, tmp_path, steps)
    agent = SmtpAgent()
    agent.configure(env.cfg, "smtp")
    _, reply = round_trip(agent, env.request(qid, f"[127.0.0.1]:{p.port}"), env.ctx())
    assert reply is not None and reply.status == 0, env.log()
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert dsn.status == "5.3.4"
    assert dsn.reason == ("host 127.0.0.1[127.0.0.1] said: 552 5.3.4 Message size exceeds "
                          "fixed limit (in reply to end of DATA command)")


def test_any_3xx_to_data_is_go_ahead(env: Env, peers: list[ScriptedPeer],
                                     tmp_path: Path) -> None:
    """Postfix smtp_loop(): DATA is refused when its reply is not 3xx (code / 100 != 3),
    so a server's "350" (not the usual 354) still gets the message."""
    p = script(peers, tmp_path, [*FULL[:8], "350 send it", *FULL[9:]])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 0, env.log()
    assert env.undone(qid) == [] and "status=sent (250 2.0.0 Ok: queued as XYZ)" in env.log()


def test_a_reply_with_mixed_codes_is_quoted_as_sent(env: Env, peers: list[ScriptedPeer],
                                                    tmp_path: Path) -> None:
    """Lines of one reply with different codes (RFC 5321 forbids it): the last line's
    code decides, as in Postfix, and the reason quotes each line with its own code."""
    p = script(peers, tmp_path, RCPT_STEPS + ["250-2.1.5 fine\r\n550 5.1.1 not fine", "<"])
    qid, reply = deliver(env, f"[127.0.0.1]:{p.port}")
    assert reply.status == 0, env.log()
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert dsn.status == "5.0.0"  # the first line's 2.1.5 is not of class 5
    assert dsn.reason == ("host 127.0.0.1[127.0.0.1] said: 250-2.1.5 fine 550 5.1.1 not fine "
                          "(in reply to RCPT TO command)")
