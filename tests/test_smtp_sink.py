"""transports.smtp against Postfix's own smtp-sink (skipped when absent; a failure when
CI=true): the corpus, DSN/8BITMIME arguments as the sink records them, soft and hard
rejects, and a 421 disconnect."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import free_port, require_tool, terminate, wait_for
from test_agent_support import (
    CORPUS,
    Env,
    close_log,  # noqa: F401 - autouse fixture
    make_env,
    round_trip,
)

from qmgrd.delivery import DeliverStatus
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import DSN_NOTIFY_SUCCESS, Recipient
from qmgrd.spool.message import QueueFile
from transports.smtp import SmtpAgent


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


class SmtpSink:
    """smtp-sink on 127.0.0.1 dumping to a directory that ``nobody`` can reach (as root the
    sink runs as nobody, and pytest's tmp_path parents are mode 0700)."""

    def __init__(self, extra: tuple[str, ...]) -> None:
        binary = require_tool("smtp-sink")
        self.port = free_port()
        self.dumpdir = Path(tempfile.mkdtemp(prefix="qmgrd-sink-"))
        os.chmod(self.dumpdir, 0o777)
        args = [binary, "-d", f"{self.dumpdir}/%M.", "-h", "sink.test.example"]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        self.proc = subprocess.Popen([*args, *extra, f"127.0.0.1:{self.port}", "16"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._listening, 10, "smtp-sink to listen")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.recv(100)
            return True
        except OSError:
            return False

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in self.dumpdir.rglob("*") if p.is_file()]

    def count(self) -> int:
        return sum(1 for p in self.dumpdir.rglob("*") if p.is_file())

    def stop(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self.dumpdir, ignore_errors=True)


def sink(tmp_path: Path, *extra: str) -> Iterator[SmtpSink]:
    s = SmtpSink(extra)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def plain_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    yield from sink(tmp_path)


def deliver(env: Env, port: int, rcpts: list[str | Recipient], content: bytes | None = None,
            **envkw: Any) -> tuple[str, DeliverStatus]:
    qid = env.queue(rcpts, content, **envkw) if content is not None else env.queue(
        rcpts, **envkw)
    agent = SmtpAgent()
    agent.configure(env.cfg, "smtp")
    _, reply = round_trip(agent, env.request(qid, f"[127.0.0.1]:{port}"), env.ctx())
    assert reply is not None
    return qid, reply


def test_corpus_through_smtp_sink(env: Env, plain_sink: SmtpSink) -> None:
    names = sorted(p.name for p in CORPUS.glob("*.eml") if not p.name.startswith("10-"))
    expected = []
    for name in names:
        qid, reply = deliver(env, plain_sink.port, ["bob@example.net"],
                             (CORPUS / name).read_bytes())
        assert reply.status == 0, (name, env.log())
        with QueueFile.open(env.spool, "active", qid, lock=None, readonly=True) as qf:
            lines = list(qf.iter_lines())
        if name.startswith("04-"):
            continue  # folded at 998 bytes: covered by the aiosmtpd tests
        expected.append((name, b"".join(x + b"\n" for x in lines)))
    wait_for(lambda: plain_sink.count() >= len(names), 10, "sink dumps")
    dumps = plain_sink.messages()
    for name, text in expected:  # the sink's dump drops a lone CR (05-mixed-line-endings)
        assert any(text.replace(b"\r", b"") in d for d in dumps), name
    assert env.log().count("status=sent (250 2.0.0 Ok)") == len(names)


def test_sink_sees_dsn_and_8bitmime(env: Env, plain_sink: SmtpSink) -> None:
    rcpt = Recipient("bob@example.net", "alias@example.net", "", DSN_NOTIFY_SUCCESS)
    qid, reply = deliver(env, plain_sink.port, [rcpt],
                         (CORPUS / "03-utf8-8bit.eml").read_bytes(), envid="E1")
    assert reply.status == 0
    wait_for(lambda: plain_sink.count() >= 1, 10, "sink dump")
    (dump,) = plain_sink.messages()
    assert b"X-Mail-Args: <alice@example.com> BODY=8BITMIME ENVID=E1\n" in dump
    assert (b"X-Rcpt-Args: <bob@example.net> NOTIFY=SUCCESS ORCPT=rfc822;alias@example.net"
            in dump)
    # the sink offers DSN and took NOTIFY=SUCCESS: it notifies the sender, we do not
    # (Postfix's smtp_rcpt_done), so there is no trace entry for a success notice
    assert statuslog.read(env.spool, "trace", qid) == []
    assert "status=sent" in env.log()


def test_sink_soft_reject_defers(env: Env, tmp_path: Path) -> None:
    for s in sink(tmp_path, "-r", "RCPT"):
        qid, reply = deliver(env, s.port, ["bob@example.net"])
        assert reply.status == 1 and not reply.hop_failed
        ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
        assert dsn.status == "4.3.0" and "(in reply to RCPT TO command)" in dsn.reason


def test_sink_hard_reject_bounces(env: Env, tmp_path: Path) -> None:
    for s in sink(tmp_path, "-f", "RCPT"):
        qid, reply = deliver(env, s.port, ["bob@example.net"])
        assert reply.status == 0
        ((_, dsn),) = statuslog.read(env.spool, "bounce", qid)
        assert dsn.status[0] == "5" and dsn.diag_text.startswith("5")


def test_sink_421_disconnect_defers(env: Env, tmp_path: Path) -> None:
    for s in sink(tmp_path, "-Q", "MAIL"):
        qid, reply = deliver(env, s.port, ["bob@example.net"])
        assert reply.status == 1
        assert statuslog.read(env.spool, "bounce", qid) == []
        ((_, dsn),) = statuslog.read(env.spool, "defer", qid)
        assert dsn.status[0] == "4"
