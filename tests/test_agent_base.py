"""Tests for transports.agent: the request/reply round trip and per-recipient recording."""

from __future__ import annotations

import itertools
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from harness import wait_for
from hypothesis import given
from hypothesis import strategies as st
from test_agent_support import (
    Env,
    close_log,  # noqa: F401 - autouse fixture
    make_env,
    round_trip,
)

from qmgrd import delivery
from qmgrd.delivery import DeliverRequest, DeliverStatus, RecipientInfo
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import DSN_NOTIFY_SUCCESS, Recipient
from qmgrd.spool.message import QueueFile
from transports.agent import DeliveryAgent, Dsn, make_dsn
from transports.discard import DiscardAgent
from transports.error import ErrorAgent, split_dsn

LINE_RE = re.compile(
    r"(?P<qid>\w+): to=<(?P<to>[^>]*)>, (?:orig_to=<(?P<orig>[^>]*)>, )?relay=(?P<relay>\S+), "
    r"delay=(?P<delay>[\d.]+), delays=(?P<delays>[\d.]+/[\d.]+/[\d.]+/[\d.]+), "
    r"dsn=(?P<dsn>\d\.\d+\.\d+), status=(?P<status>\w+) \((?P<reason>.*)\)$")


class ScriptAgent(DeliveryAgent):
    """Answers by the recipient's local part: ok*, soft*, hard*; boom raises."""

    name = "script"

    def __init__(self) -> None:
        super().__init__()
        self.seen_lines: list[bytes] = []
        self.hop: Dsn | None = None

    def deliver(self, req: DeliverRequest, msg: QueueFile) -> list[tuple[RecipientInfo, Dsn]]:
        self.seen_lines = list(msg.iter_lines())
        out = []
        for r in req.recipients:
            local = r.address.split("@")[0]
            if local == "boom":
                raise RuntimeError("agent bug")
            if local.startswith("ok"):
                out.append((r, make_dsn("2.0.0", "delivered fine")))
            elif local.startswith("soft"):
                out.append((r, make_dsn("4.2.0", "try later")))
            elif local.startswith("hard"):
                out.append((r, make_dsn("5.1.1", "no such user", diag_type="smtp",
                                        diag_text="550 5.1.1 no", mta_type="dns",
                                        mta_mname="mx.example")))
            # anything else: left out on purpose
        if self.hop is not None:
            self.state.hop = self.hop
        self.state.relay = "scripted"
        return out


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def log_lines(env: Env) -> list[re.Match[str]]:
    return [m for ln in env.log().splitlines() if (m := LINE_RE.search(ln))]


def test_mixed_outcomes_round_trip(env: Env) -> None:
    qid = env.queue(["ok1@example.net", "soft@example.net", "hard@example.net", "ok2@x.org"])
    agent = ScriptAgent()
    greeting, reply = round_trip(agent, env.request(qid), env.ctx())
    assert greeting == [("protocol", "delivery_request_protocol")]
    assert reply is not None and reply.status == 1 and not reply.hop_failed
    assert b"hello" in agent.seen_lines
    # sent and bounced are marked done; the deferred one stays R
    assert env.undone(qid) == ["soft@example.net"]
    bounced = statuslog.read(env.spool, "bounce", qid)
    assert [(r.address, d.status, d.action) for r, d in bounced] == [
        ("hard@example.net", "5.1.1", "failed")]
    assert bounced[0][1].diag_text == "550 5.1.1 no" and bounced[0][0].offset > 0
    deferred = statuslog.read(env.spool, "defer", qid)
    assert [(r.address, d.status, d.action, d.reason) for r, d in deferred] == [
        ("soft@example.net", "4.2.0", "delayed", "try later")]
    lines = {m["to"]: m for m in log_lines(env)}
    assert lines["ok1@example.net"]["status"] == "sent"
    assert lines["ok1@example.net"]["reason"] == "delivered fine"
    assert lines["ok1@example.net"]["relay"] == "scripted"
    assert lines["soft@example.net"]["status"] == "deferred"
    assert lines["hard@example.net"]["status"] == "bounced"
    assert lines["hard@example.net"]["dsn"] == "5.1.1"
    assert all(m["qid"] == qid for m in lines.values())


def test_a_request_whose_qmgr_has_gone_is_not_delivered(env: Env) -> None:
    """The qmgr writes its request before the greeting and closes the connection when
    the greeting is late (it has deferred the recipients). Closed before the agent
    greets: the greeting cannot be written, nothing is delivered."""
    qid = env.queue(["ok1@example.net"])
    agent = ScriptAgent()
    client, server = socket.socketpair()
    with server:
        with client:
            client.sendall(env.request(qid).encode())
        agent.serve(server, env.ctx())
    assert agent.seen_lines == []  # deliver() never ran
    assert env.undone(qid) == ["ok1@example.net"]
    assert log_lines(env) == []
    assert "cannot read delivery request" in env.log()


@pytest.mark.parametrize("multi", [False, True])
def test_eof_behind_the_request_means_the_qmgr_has_gone(env: Env, multi: bool) -> None:
    """Closed after the agent greeted but before it read the request: the request is
    still in the socket, with EOF behind it (here: the qmgr's end shut for writing).
    The agent looks for that EOF before delivering (single_server and multi_server)."""
    import asyncio

    qid = env.queue(["ok1@example.net"])
    agent = ScriptAgent()
    client, server = socket.socketpair()
    with client, server:
        client.sendall(env.request(qid).encode())
        client.shutdown(socket.SHUT_WR)
        if multi:
            server.setblocking(False)
            asyncio.run(agent.serve_async(server, env.ctx()))
        else:
            server.settimeout(30)  # as serve() sets ipc_timeout: the look must not wait
            agent.serve(server, env.ctx())
        server.close()  # as the skeleton does after the handler
        client.settimeout(5)
        got = b""
        while data := client.recv(65536):
            got += data
    assert got == delivery.protocol_greeting(delivery.DELIVER_PROTOCOL)  # no reply
    assert agent.seen_lines == []
    assert env.undone(qid) == ["ok1@example.net"]
    assert (f"{qid}: the queue manager closed the connection before the delivery began: "
            "not delivered") in env.log()


def test_a_qmgr_that_waits_gets_its_delivery_over_an_async_agent(env: Env) -> None:
    import asyncio

    qid = env.queue(["ok1@example.net"])
    agent = ScriptAgent()
    client, server = socket.socketpair()
    server.setblocking(False)
    with client, server:
        client.sendall(env.request(qid).encode())  # and the connection stays open
        asyncio.run(agent.serve_async(server, env.ctx()))
        client.settimeout(5)
        dec = delivery.AttrDecoder()
        lists = []
        while len(lists) < 2:
            dec.feed(client.recv(65536))
            while (lst := dec.pop()) is not None:
                lists.append(lst)
    assert env.undone(qid) == []
    assert DeliverStatus.from_attrs(lists[1]).status == 0


@pytest.mark.parametrize("live", [True, False])
def test_the_look_behind_the_request_never_waits(env: Env, live: bool) -> None:
    """transports.agent._qmgr_gone on a blocking socket: a live qmgr (no EOF) gives
    False at once; a qmgr that closed with the greeting unread gives ECONNRESET: gone."""
    from transports.agent import _qmgr_gone

    qid = env.queue(["ok1@example.net"])
    req = env.request(qid)
    qmgr, agent = socket.socketpair()
    with agent:
        qmgr.sendall(req.encode())
        agent.sendall(delivery.protocol_greeting(delivery.DELIVER_PROTOCOL))
        assert len(agent.recv(65536)) == len(req.encode())
        agent.settimeout(None)  # blocking: a plain recv would hang on a live qmgr
        if not live:
            qmgr.close()  # the greeting unread
        assert _qmgr_gone(agent, req) is (not live)
        assert agent.gettimeout() is None  # restored
    if live:
        qmgr.close()


@pytest.mark.parametrize(("greet_at", "stall"), [(0.40, True), (0.55, True), (1.0, False)])
def test_a_late_greeting_is_never_both_given_up_and_delivered(
        env: Env, greet_at: float, stall: bool) -> None:
    """The qmgr writes its request before the greeting (qmgrd.qmgr.client). A greeting
    that comes while the qmgr's loop is busy across greeting_timeout (0.5 s), or after
    it: either the qmgr reports TransportUnavailable and the agent delivers nothing, or
    the agent delivers and the qmgr gets its reply - never TransportUnavailable (the
    recipients deferred, "not attempted") for mail that went out."""
    import asyncio
    import threading
    import time

    from qmgrd.qmgr.client import AgentClient, TransportUnavailable

    qid = env.queue(["ok1@example.net"])
    req = env.request(qid)
    qdir = env.spool.queue_directory
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{qdir}/private/script")
    listener.listen(5)
    agent = ScriptAgent()
    gave_up = threading.Event()
    t0 = time.monotonic()

    def serve() -> None:
        if stall:
            time.sleep(max(0.0, t0 + greet_at - time.monotonic()))
        else:  # only after the qmgr's look, however late a loaded machine makes it
            gave_up.wait(10)
        conn, _ = listener.accept()
        with conn:
            agent.serve(conn, env.ctx())

    worker = threading.Thread(target=serve)
    worker.start()

    async def run() -> str:
        if stall:  # one busy pass of the qmgr's loop across the deadline
            asyncio.get_running_loop().call_later(0.35, time.sleep, 0.3)
        try:
            status = await AgentClient(qdir, greeting_timeout=0.5, reply_timeout=5).deliver(
                "script", req)
        except TransportUnavailable:
            return "unavailable"
        finally:
            gave_up.set()
        return f"status {status.status}"

    try:
        outcome = asyncio.run(run())
    finally:
        worker.join(10)
        listener.close()
    if stall:  # the agent greeted before the qmgr's late look: it delivers (unless a
        # very slow machine ran it only after that look: then nothing; never both)
        delivered = env.undone(qid) == []
        assert (outcome, delivered) in {("status 0", True), ("unavailable", False)}
    else:
        assert outcome == "unavailable"
        assert env.undone(qid) == ["ok1@example.net"]  # closed: its greeting cannot go out
        assert "cannot read delivery request" in env.log()


def test_all_finished_status_zero(env: Env) -> None:
    qid = env.queue(["ok@example.net", "hard@example.net"])
    _, reply = round_trip(ScriptAgent(), env.request(qid), env.ctx())
    assert reply is not None and reply.status == 0
    assert env.undone(qid) == []


def test_orig_to_and_delays_format(env: Env) -> None:
    qid = env.queue([Recipient("ok@example.net", "Alias@example.org")])
    req = env.request(qid)
    req.arrival = 1000.0
    req.active_arrival = 1000.5
    req.handoff = 1001.0
    agent = ScriptAgent()
    agent.clock = lambda: 1013.25
    round_trip(agent, req, env.ctx())
    (m,) = log_lines(env)
    assert m["orig"] == "Alias@example.org"
    assert m["delay"] == "13"
    assert m["delays"] == "0.5/0.5/0/12"


def test_soft_bounce_turns_5_into_4(tmp_path: Path) -> None:
    env = make_env(tmp_path, soft_bounce="yes")
    qid = env.queue(["hard@example.net"])
    _, reply = round_trip(ScriptAgent(), env.request(qid), env.ctx())
    assert reply is not None and reply.status == 1
    assert env.undone(qid) == ["hard@example.net"]
    assert statuslog.read(env.spool, "bounce", qid) == []
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert dsn.status == "4.1.1" and dsn.action == "delayed"


def test_missing_recipient_result_and_agent_exception_defer(env: Env) -> None:
    qid = env.queue(["other@example.net", "ok@example.net"])
    _, reply = round_trip(ScriptAgent(), env.request(qid), env.ctx())
    assert reply is not None and reply.status == 1
    assert env.undone(qid) == ["other@example.net"]
    qid2 = env.queue(["boom@example.net", "ok@example.net"])
    _, reply2 = round_trip(ScriptAgent(), env.request(qid2), env.ctx())
    assert reply2 is not None and reply2.status == 1
    assert env.undone(qid2) == ["boom@example.net", "ok@example.net"]
    reasons = {d.reason for _, d in statuslog.read(env.spool, "defer", qid2)}
    assert reasons == {"unknown mail transport error"}
    assert "delivery agent failed" in env.log()


def test_hop_status_only_with_deferrals(env: Env) -> None:
    agent = ScriptAgent()
    agent.hop = make_dsn("4.4.1", "connect to x[1.2.3.4]:25: Connection refused")
    qid = env.queue(["soft@example.net"])
    _, reply = round_trip(agent, env.request(qid), env.ctx())
    assert reply is not None and reply.hop_failed
    assert reply.dsn_status == "4.4.1" and reply.action == "delayed"
    assert reply.reason.startswith("connect to x")
    qid2 = env.queue(["ok@example.net"])
    _, reply2 = round_trip(agent, env.request(qid2), env.ctx())
    assert reply2 is not None and reply2.status == 0 and not reply2.hop_failed


def test_notify_success_writes_trace(env: Env) -> None:
    qid = env.queue([Recipient("ok@example.net", notify=DSN_NOTIFY_SUCCESS),
                     Recipient("ok2@example.net")])
    round_trip(ScriptAgent(), env.request(qid), env.ctx())
    traced = statuslog.read(env.spool, "trace", qid)
    assert [(r.address, d.status, d.action) for r, d in traced] == [
        ("ok@example.net", "2.0.0", "delivered")]


def test_without_success_flag_sent_is_not_marked(env: Env) -> None:
    qid = env.queue(["ok@example.net", "hard@example.net"])
    req = env.request(qid, flags=delivery.DEL_REQ_FLAG_BOUNCE)
    _, reply = round_trip(ScriptAgent(), req, env.ctx())
    assert reply is not None and reply.status == 0
    assert env.undone(qid) == ["ok@example.net"]


def test_bounce_log_failure_defers(env: Env) -> None:
    qid = env.queue(["hard@example.net"])
    bdir = Path(env.spool.queue_path("bounce"))
    bdir.rmdir()
    bdir.write_text("not a directory")
    _, reply = round_trip(ScriptAgent(), env.request(qid), env.ctx())
    assert reply is not None and reply.status == 1
    assert env.undone(qid) == ["hard@example.net"]
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert dsn.status == "4.3.0" and dsn.reason == "bounce or trace service failure"


def test_missing_queue_file_defers_all(env: Env) -> None:
    qid = env.queue(["ok@example.net", "ok2@example.net"])
    req = env.request(qid)
    os.unlink(env.spool.path("active", qid))
    _, reply = round_trip(ScriptAgent(), req, env.ctx())
    assert reply is not None and reply.status == 1
    got = statuslog.read(env.spool, "defer", qid)
    assert [(r.address, d.status, d.reason) for r, d in got] == [
        ("ok@example.net", "4.3.0", "queue file read error"),
        ("ok2@example.net", "4.3.0", "queue file read error")]


def test_not_ready_file_defers(env: Env) -> None:
    qid = env.queue(["ok@example.net"])
    req = env.request(qid)
    path = env.spool.path("active", qid)
    os.chmod(path, 0o600)
    _, reply = round_trip(ScriptAgent(), req, env.ctx())
    assert reply is not None and reply.status == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_corrupt_file_is_marked_0400(env: Env) -> None:
    qid = env.queue(["ok@example.net"])
    req = env.request(qid)
    path = env.spool.path("active", qid)
    data = bytearray(Path(path).read_bytes())
    data[0] = ord("Q")  # the C (size) record, the one envelope record an agent reads
    Path(path).write_bytes(bytes(data))
    _, reply = round_trip(ScriptAgent(), req, env.ctx())
    assert reply is not None and reply.status == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert dsn.reason == "queue file read error"


def test_the_agent_reads_the_content_not_the_envelope(env: Env) -> None:
    """The envelope is the qmgr's (it read it, and the request carries the sender and
    the recipients with their offsets): the agent reads the C record and the content,
    as Postfix's deliver_request_get() seeks to the data offset. Damage after the
    content (the final E record) is not the agent's to see; the qmgr sees it at its
    next read of the file. Reading the whole envelope for every request cost a message
    of N recipients N / recipient-limit x N records."""
    qid = env.queue(["ok@example.net"])
    req = env.request(qid)
    path = env.spool.path("active", qid)
    data = bytearray(Path(path).read_bytes())
    data[-2:] = b"Q\x00"  # the final E record becomes junk
    Path(path).write_bytes(bytes(data))
    agent = ScriptAgent()
    _, reply = round_trip(agent, req, env.ctx())
    assert reply is not None and reply.status == 0
    assert agent.seen_lines and stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_corrupt_content_during_delivery(env: Env) -> None:
    qid = env.queue(["ok@example.net"])
    req = env.request(qid)
    path = env.spool.path("active", qid)
    data = bytearray(Path(path).read_bytes())
    data[req.offset] = ord("Z")  # first content record: a type that has no business there
    Path(path).write_bytes(bytes(data))
    _, reply = round_trip(ScriptAgent(), req, env.ctx())
    assert reply is not None and reply.status == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    os.chmod(path, 0o700)
    assert env.undone(qid) == ["ok@example.net"]


@pytest.mark.parametrize("junk", [
    b"garbage without terminators",
    b"flags\x003\x00\x00",  # common list without the required attributes
    delivery.encode([("flags", "x"), ("queue_name", "active")]),
])
def test_malformed_request_closes_without_reply(env: Env, junk: bytes) -> None:
    greeting, reply = round_trip(ScriptAgent(), junk, env.ctx())
    assert greeting == [("protocol", "delivery_request_protocol")]
    assert reply is None
    assert "warning: malformed delivery request" in env.log()


def test_bad_queue_id_or_name_is_malformed(env: Env) -> None:
    qid = env.queue(["ok@example.net"])
    for name, value in (("queue_id", "../../etc/passwd"), ("queue_name", "private")):
        req = env.request(qid)
        setattr(req, name, value)
        _, reply = round_trip(ScriptAgent(), req, env.ctx())
        assert reply is None
    assert env.undone(qid) == ["ok@example.net"]


def test_discard_agent(env: Env) -> None:
    qid = env.queue(["a@example.net", "b@example.net"])
    _, reply = round_trip(DiscardAgent(), env.request(qid, nexthop="spam trap"), env.ctx())
    assert reply is not None and reply.status == 0
    assert env.undone(qid) == []
    assert [(m["status"], m["reason"], m["relay"]) for m in log_lines(env)] == [
        ("sent", "spam trap", "none")] * 2
    qid2 = env.queue(["c@example.net"])
    round_trip(DiscardAgent(), env.request(qid2), env.ctx())
    assert log_lines(env)[-1]["reason"] == "discarded"


def test_split_dsn() -> None:
    assert split_dsn("5.1.1 User unknown", "5.0.0") == ("5.1.1", "User unknown")
    assert split_dsn("4.7.1   later", "5.0.0") == ("4.7.1", "later")
    assert split_dsn("no code here", "5.0.0") == ("5.0.0", "no code here")
    assert split_dsn("5.1.1x text", "4.0.0") == ("4.0.0", "5.1.1x text")
    assert split_dsn("", "5.0.0") == ("5.0.0", "")


def test_error_agent_bounces_and_defers(env: Env) -> None:
    qid = env.queue(["a@example.net"])
    _, reply = round_trip(ErrorAgent(), env.request(
        qid, nexthop="5.1.1 User unknown in virtual alias table"), env.ctx("error"))
    assert reply is not None and reply.status == 0
    ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
    assert (dsn.status, dsn.reason) == ("5.1.1", "User unknown in virtual alias table")
    qid2 = env.queue(["b@example.net"])
    _, reply2 = round_trip(ErrorAgent(), env.request(qid2, nexthop="4.3.2 not now"),
                           env.ctx("error"))
    assert reply2 is not None and reply2.status == 1
    assert env.undone(qid2) == ["b@example.net"]


def test_retry_agent_always_defers(env: Env) -> None:
    qid = env.queue(["a@example.net"])
    agent = ErrorAgent()
    _, reply = round_trip(agent, env.request(qid, nexthop="5.7.1 relay suspended"),
                          env.ctx("retry"))
    assert reply is not None and reply.status == 1
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert (dsn.status, dsn.reason) == ("4.7.1", "relay suspended")
    assert log_lines(env)[-1]["status"] == "deferred"


@pytest.mark.parametrize(("module", "service", "nexthop", "status"), [
    ("transports.discard", "discard", "", b"status\x000\x00"),
    ("transports.error", "error", "5.1.1 no such user", b"status\x000\x00"),
    ("transports.error", "retry", "4.3.0 later", b"status\x001\x00"),
    ("transports.local", "local", "mail.test.example", b"status\x000\x00"),
])
def test_python_m_agent_serves_one_request(tmp_path: Path, module: str, service: str,
                                           nexthop: str, status: bytes) -> None:
    env = make_env(tmp_path, mail_spool_directory=f"{tmp_path}/mail/")
    sock_path = tmp_path / f"{service}.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "-c", str(tmp_path / "etc"), "-n", service,
         "-l", str(sock_path), "-o", "max_idle=10s", "-o", "max_use=1"],
        cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True,
        stdin=subprocess.DEVNULL)
    try:
        wait_for(sock_path.exists, 15, f"{service} socket")
        qid = env.queue(["bob@example.net"])
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(str(sock_path))
            s.sendall(env.request(qid, nexthop).encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"protocol\x00delivery_request_protocol\x00\x00")
        assert data.endswith(status + b"\x00")
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    program = module.rpartition(".")[2]  # "retry" logs as error(8) does: qmgrd/error
    log = env.log()
    assert f"qmgrd/{program}[" in log and (service == program or f"qmgrd/{service}[" not in log)


@pytest.mark.parametrize("pairs", [
    [("", "x")], [("a\0b", "x")], [("a", "x\0y")], [("é", "x")], [("n" * 101, "x")],
    [("a", "é" * (delivery.MAX_VALUE // 2 + 1))],
], ids=["empty-name", "nul-name", "nul-value", "non-ascii-name", "long-name",
        "long-utf8-value"])
def test_encode_refuses_what_the_protocol_cannot_carry(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(delivery.ProtocolError):
        delivery.encode(pairs)


def test_encode_frames_names_values_and_the_terminator() -> None:
    assert delivery.encode([]) == b"\0"
    assert delivery.encode([("a", 1), ("b", "é\udcff")]) == b"a\x001\x00b\x00\xc3\xa9\xff\x00\x00"
    value = "x" * delivery.MAX_VALUE  # at the bound: allowed
    assert delivery.encode([("v", value)]).endswith(b"x\0\0")


_names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                 max_size=delivery.MAX_NAME)
_values = st.text(alphabet=st.characters(blacklist_characters="\0",
                                         blacklist_categories=("Cs",)), max_size=40)
_lists = st.lists(st.lists(st.tuples(_names, _values), max_size=8), max_size=4)


@given(lists=_lists, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6))
def test_decoder_returns_what_encode_framed_however_the_bytes_arrive(
        lists: list[list[tuple[str, str]]], cuts: list[int]) -> None:
    data = b"".join(delivery.encode(lst) for lst in lists)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    dec = delivery.AttrDecoder()
    got: list[list[tuple[str, str]]] = []
    for a, b in itertools.pairwise(points):
        dec.feed(data[a:b])
        while (lst := dec.pop()) is not None:
            got.append(lst)
    assert got == lists
    assert not dec.pending


@pytest.mark.parametrize("data", [
    b"n" * (delivery.MAX_NAME + 1) + b"\0v\0\0",
    b"n\0" + b"v" * (delivery.MAX_VALUE + 1) + b"\0\0",
    b"n\0" + b"v" * (delivery.MAX_VALUE + 2),  # still arriving, already too long
    b"\xc3\xa9\0v\0\0",
    b"".join(b"n%d\0v\0" % i for i in range(delivery.MAX_ATTRS + 1)) + b"\0",
], ids=["long-name", "long-value", "long-partial-value", "non-ascii-name", "too-many"])
def test_decoder_refuses_what_the_protocol_does_not_allow(data: bytes) -> None:
    with pytest.raises(delivery.ProtocolError):
        delivery.AttrDecoder().feed(data)


def test_encode_checks_a_value_with_nul_after_its_name_was_seen() -> None:
    assert delivery.encode([("seen_name", "ok")])
    with pytest.raises(delivery.ProtocolError):
        delivery.encode([("seen_name", "x\0y")])


def test_symlinked_queue_file_is_not_followed(env: Env) -> None:
    """A symbolic link under the queue id's name in active/ (queue files are regular
    files): the agent neither reads through it nor marks its target 0400; every
    recipient is deferred with the read error, as for a damaged file."""
    qid = env.queue(["ok@example.net"])
    req = env.request(qid)
    path = env.spool.path("active", qid)
    target = Path(path + ".target")
    os.rename(path, target)  # a complete, ready queue file elsewhere
    os.symlink(target, path)
    _, reply = round_trip(ScriptAgent(), req, env.ctx())
    assert reply is not None and reply.status == 1
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert os.path.islink(path)
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert dsn.reason == "queue file read error"


def test_a_recipient_record_that_cannot_be_marked_done_marks_the_file_corrupt(
        env: Env) -> None:
    """The R record of a delivered recipient is damaged, which the agent sees only when
    it marks the recipient done: the delivery happened (status=sent), but the queue file
    cannot be updated. As Postfix, that file is corrupt: the agent marks it (0400) for
    the qmgr to move it to corrupt/, and reports the recipient deferred with ``4.3.0
    queue file write error``, so that the message is neither removed as if finished nor
    delivered again at each retry. The other recipient is marked done as usual."""
    qid = env.queue(["ok@example.net", "ok2@example.net"])
    req = env.request(qid)
    path = env.spool.path("active", qid)
    data = bytearray(Path(path).read_bytes())
    data[req.recipients[0].offset] = ord("Q")  # not R, not D
    Path(path).write_bytes(bytes(data))
    _, reply = round_trip(ScriptAgent(), req, env.ctx())
    assert reply is not None and reply.status == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    assert [(r.address, d.status, d.reason)
            for r, d in statuslog.read(env.spool, "defer", qid)] == [
        ("ok@example.net", "4.3.0", "queue file write error")]
    assert [(m["to"], m["status"], m["reason"]) for m in log_lines(env)] == [
        ("ok@example.net", "sent", "delivered fine"),
        ("ok@example.net", "deferred", "queue file write error"),
        ("ok2@example.net", "sent", "delivered fine")]
    assert f"warning: {qid}: cannot update queue file" in env.log()
    with open(path, "rb") as f:
        f.seek(req.recipients[1].offset)
        assert f.read(1) == b"D"


@pytest.mark.parametrize("agent_class", [ScriptAgent, DiscardAgent, ErrorAgent])
@pytest.mark.parametrize("refused", [False, True], ids=["root", "mail_owner"])
def test_a_file_already_marked_corrupt_gets_one_warning(
        env: Env, monkeypatch: pytest.MonkeyPatch, agent_class: type[DeliveryAgent],
        refused: bool) -> None:
    """A queue file an earlier delivery marked corrupt (mode 0400) is warned about with
    one text by every agent: whether the open succeeds (the local agent runs as root)
    or is refused (the other agents run as mail_owner: EACCES for O_RDWR on a 0400
    file, simulated here). It was 'file is not ready (mode 100400)' for one and
    'Permission denied: <path>' for the others."""
    qid = env.queue(["ok@example.net"])
    req = env.request(qid, nexthop="5.0.0 no")
    path = env.spool.path("active", qid)
    os.chmod(path, 0o400)
    if refused:
        from qmgrd.spool import regular

        def eacces(p: str, flags: int) -> tuple[int, os.stat_result]:
            if flags & os.O_RDWR:
                raise PermissionError(13, "Permission denied", p)
            raise AssertionError("the agent opens O_RDWR")
        monkeypatch.setattr(regular, "open_regular", eacces)
    _, reply = round_trip(agent_class(), req, env.ctx())
    assert reply is not None and reply.status == 1
    warnings = [ln.split("warning: ", 1)[1] for ln in env.log().splitlines()
                if "warning: " in ln]
    assert warnings == [f"{qid}: queue file marked corrupt: delivery deferred"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
    assert (dsn.status, dsn.reason) == ("4.3.0", "queue file read error")
