"""Issue 6 acceptance 5: abuse does not harm the server. 200 concurrent idle connections,
garbage bytes, a 10 MB line (as a command and as message data), pipelining of 1,000
commands, clients that disconnect mid-DATA, and a killed smtpd process: the smtpd
processes recover or are replaced, the master stays up, no partial message is queued,
and mail still flows afterwards."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator

import psutil
import pytest

from tests.harness import LogCursor, MailSystem, MakeSystem, wait_for
from tests.tools.smtpd_system import smtp, smtpd_pids, start

pytestmark = pytest.mark.timeout(120)

SENDER = "alice@mail.test.example"
# service_throttle_time: a killed smtpd that had served nobody yet throttles the service
MAIN = {"smtpd_timeout": "4s", "smtpd_error_sleep_time": "0s", "defer_transports": "smtp",
        "service_throttle_time": "2s"}


@pytest.fixture
def system(mailsys: MakeSystem) -> Iterator[tuple[MailSystem, int]]:
    ms, port = start(mailsys, MAIN)
    yield ms, port
    assert ms.proc is not None and ms.proc.poll() is None, "the master died"
    # nothing half-written anywhere in the queue
    for path in ms.queue_files("incoming", "active", "deferred", "hold", "maildrop"):
        assert os.stat(path).st_mode & 0o100, f"not ready: {path}"


def read_reply(sock: socket.socket, buf: bytearray, timeout: float = 20) -> bytes:
    """One reply line (the last line of a multi-line reply); b"" at EOF."""
    sock.settimeout(timeout)
    while True:
        nl = buf.find(b"\n")
        while nl >= 0:
            line = bytes(buf[: nl + 1])
            del buf[: nl + 1]
            if len(line) < 4 or line[3:4] != b"-":
                return line
            nl = buf.find(b"\n")
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closed with our unread input: RST
            return b""
        if not chunk:
            return b""
        buf += chunk


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=20)


def mail_flows(ms: MailSystem, port: int, tag: str) -> None:
    with smtp(port) as s:
        assert s.sendmail(SENDER, ["bob@mail.test.example"],
                          f"Subject: {tag}\r\n\r\nstill fine\r\n".encode()) == {}
    wait_for(lambda: any(f"Subject: {tag}".encode() in p.read_bytes() for p in ms.maildir("bob")),
             30, f"delivery of {tag}")


def test_two_hundred_idle_connections(system: tuple[MailSystem, int]) -> None:
    ms, port = system
    socks = [connect(port) for _ in range(200)]
    try:
        bufs = [bytearray() for _ in socks]
        greetings = [read_reply(s, b) for s, b in zip(socks, bufs)]
        assert all(g.startswith(b"220 mail.test.example ESMTP") for g in greetings)
        # the server still serves while 200 clients sit idle
        mail_flows(ms, port, "during-idle")
        # smtpd_timeout (4 s) ends every idle session with 421
        ends = [read_reply(s, b) for s, b in zip(socks, bufs)]
        assert all(e == b"421 4.4.2 mail.test.example Error: timeout exceeded\r\n"
                   for e in ends), set(ends)
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: ms.log().count("timeout after CONNECT from localhost[127.0.0.1]") == 200,
             20, "200 timeout log lines")
    mail_flows(ms, port, "after-idle")


def test_garbage_and_huge_lines(system: tuple[MailSystem, int]) -> None:
    ms, port = system
    rnd = random.Random(6)
    # random bytes: errors until smtpd_hard_error_limit, then 421 and hang-up
    for _ in range(3):
        with connect(port) as s:
            buf = bytearray()
            read_reply(s, buf)
            try:
                s.sendall(bytes(rnd.getrandbits(8) for _ in range(20_000)))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server had heard enough
            replies = []
            while line := read_reply(s, buf):
                replies.append(line)
            assert all(r[:1] in b"45" or r.startswith(b"221 2.7.0") for r in replies), replies
    ends = [t for t in ms.log().splitlines() if "smtpd[" in t and (
        "too many errors after" in t or "non-SMTP command from" in t)]
    assert len(ends) == 3, ends
    # a 10 MB command line is refused and the session goes on; a 10 MB line of data
    # is over message_size_limit (10240000): 552 5.3.4, and the session goes on
    with connect(port) as s:
        buf = bytearray()
        read_reply(s, buf)
        s.sendall(b"EHLO client.test.example\r\n")
        read_reply(s, buf)
        s.sendall(b"MAIL FROM:<" + b"a" * 10_485_760 + b"@x.example>\r\n")
        assert read_reply(s, buf) == b"500 5.5.2 Error: command line too long\r\n"
        s.sendall(b"MAIL FROM:<alice@mail.test.example>\r\nRCPT TO:<bob@mail.test.example>\r\n"
                  b"DATA\r\n")
        assert [read_reply(s, buf)[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        s.sendall(b"Subject: huge\r\n\r\n" + b"b" * 10_485_760 + b"\r\n.\r\n")
        assert read_reply(s, buf, 60) == b"552 5.3.4 Error: message file too big\r\n"
        s.sendall(b"QUIT\r\n")
        assert read_reply(s, buf) == b"221 2.0.0 Bye\r\n"
    mail_flows(ms, port, "after-garbage")
    assert not any(b"Subject: huge" in p.read_bytes() for p in ms.maildir("bob"))


def test_pipelining_a_thousand_commands(system: tuple[MailSystem, int]) -> None:
    ms, port = system
    # one transaction of 1,000 pipelined commands: MAIL, 997 RCPT, DATA, QUIT
    rcpts = [f"r{i}@far.example" for i in range(997)]
    batch = (b"EHLO client.test.example\r\nMAIL FROM:<alice@mail.test.example>\r\n" +
             b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts) + b"DATA\r\n")
    with connect(port) as s:
        buf = bytearray()
        read_reply(s, buf)
        s.sendall(batch)
        replies = [read_reply(s, buf)[:3] for _ in range(1 + 1 + 997 + 1)]
        assert replies == [b"250"] * 999 + [b"354"]
        s.sendall(b"Subject: many\r\n\r\nto many\r\n.\r\nQUIT\r\n")
        queued = read_reply(s, buf)
        assert queued.startswith(b"250 2.0.0 Ok: queued as ")
        assert read_reply(s, buf) == b"221 2.0.0 Bye\r\n"
    qid = queued.split()[-1].decode()
    wait_for(lambda: f"{qid}: from=<alice@mail.test.example>, size=" in ms.log() and
             "nrcpt=997 (queue active)" in ms.log(), 30, "the 997-recipient message")
    # 1,000 pipelined NOOPs: after smtpd_junk_command_limit (100) each one is an error,
    # and smtpd_hard_error_limit (20) ends the session
    with connect(port) as s:
        buf = bytearray()
        read_reply(s, buf)
        s.sendall(b"NOOP\r\n" * 1000)
        replies = []
        while True:
            line = read_reply(s, buf)
            if not line:
                break
            replies.append(line)
        assert replies[:121] == [b"250 2.0.0 Ok\r\n"] * 121
        assert replies[121:] == [b"421 4.7.0 mail.test.example Error: too many errors\r\n"]
    mail_flows(ms, port, "after-pipelining")


def test_disconnects_mid_data_and_a_killed_smtpd(system: tuple[MailSystem, int]) -> None:
    ms, port = system
    for abortive in (False, True):
        with connect(port) as s:
            buf = bytearray()
            read_reply(s, buf)
            s.sendall(b"HELO x\r\nMAIL FROM:<alice@mail.test.example>\r\n"
                      b"RCPT TO:<bob@mail.test.example>\r\nDATA\r\n")
            assert [read_reply(s, buf)[:3] for _ in range(4)] == [b"250"] * 3 + [b"354"]
            s.sendall(b"Subject: half\r\n\r\n" + b"partial\r\n" * 1000 + b"no end")
            if abortive:  # RST instead of FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    wait_for(lambda: ms.log().count("lost connection after DATA (") == 2, 20,
             "two lost-connection log lines")
    # a killed smtpd is replaced; its client sees the connection end, nothing is queued
    mail_flows(ms, port, "before-kill")
    victim = smtp(port)
    victim.ehlo()
    victim.mail(SENDER)
    victim.rcpt("bob@mail.test.example")
    port_of_victim = victim.sock.getsockname()[1]
    serving = [p for p in (psutil.Process(pid) for pid in smtpd_pids(ms))
               if any(c.raddr and c.raddr.port == port_of_victim
                      for c in p.net_connections())]
    assert len(serving) == 1
    serving[0].kill()
    wait_for(lambda: serving[0].pid not in smtpd_pids(ms), 20, "the killed smtpd reaped")
    with pytest.raises(OSError):
        victim.data(b"Subject: orphan\r\n\r\nlost\r\n")
    victim.close()
    assert psutil.Process(ms.master_pid).is_running()
    deadline = time.monotonic() + 30
    mail_flows(ms, port, "after-kill")
    assert time.monotonic() < deadline
    assert not any(b"Subject: half" in p.read_bytes() or b"Subject: orphan" in p.read_bytes()
                   for p in ms.maildir("bob"))


def test_reload_with_a_session_in_hand_does_not_spin(mailsys: MakeSystem) -> None:
    """After a reload, an smtpd whose client is still connected finishes that session
    (Postfix's smtpd does too) while sleeping in its event loop: it used to wait again
    for the stop it had already seen, a busy loop of one CPU until the client left."""
    ms, port = start(mailsys, MAIN)
    s = connect(port)
    buf = bytearray()
    try:
        assert read_reply(s, buf).startswith(b"220 ")
        s.sendall(b"EHLO client.example\r\n")
        assert read_reply(s, buf).startswith(b"250")
        [pid] = smtpd_pids(ms)
        proc = psutil.Process(pid)
        assert ms.master("reload").returncode == 0
        time.sleep(1.0)  # the master's SIGHUP handling: the old generation's fd 5 closed
        before = sum(proc.cpu_times()[:2])
        time.sleep(1.0)
        burnt = sum(proc.cpu_times()[:2]) - before
        assert burnt < 0.3, f"the retiring smtpd used {burnt:.2f} s of CPU in 1 s"
        s.sendall(b"MAIL FROM:<a@client.example>\r\n")  # its session goes on
        assert read_reply(s, buf).startswith(b"250")
        s.sendall(b"QUIT\r\n")
        assert read_reply(s, buf).startswith(b"221")
        def exited() -> bool:  # (it may be reaped between any two looks at it)
            try:
                return proc.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(exited, 20, "the retired smtpd to exit")
    finally:
        s.close()


def test_master_killed_with_a_session_in_hand_frees_the_port(mailsys: MakeSystem) -> None:
    """kill -9 of the master: the smtpd that still has a client finishes that session
    but closes its listening socket at once, so a new master can bind the port (it got
    "Address already in use" until the client left)."""
    ms, port = start(mailsys, MAIN)
    s = connect(port)
    buf = bytearray()
    try:
        assert read_reply(s, buf).startswith(b"220 ")
        [pid] = smtpd_pids(ms)
        assert ms.proc is not None
        ms.proc.kill()
        ms.proc.wait()

        def port_free() -> bool:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    return False
                return True

        wait_for(port_free, 20, "the orphaned smtpd to release the port")
        assert psutil.pid_exists(pid)
        s.sendall(b"EHLO client.example\r\n")  # its session goes on
        assert read_reply(s, buf).startswith(b"250")
        s.sendall(b"QUIT\r\n")
        assert read_reply(s, buf).startswith(b"221")
    finally:
        s.close()
    wait_for(lambda: not ms.processes(), 30, "the orphans to exit")


def test_retiring_processes_hand_over(mailsys: MakeSystem) -> None:
    """max_use: a process retires after max_use x smtpd_process_session_limit sessions and
    a successor takes over; no client is turned away meanwhile. A master stop ends the
    smtpd processes even while clients are connected."""
    ms, port = start(mailsys, MAIN, options="-o max_use=3 -o smtpd_process_session_limit=1")
    cursor = LogCursor(ms)

    def send(i: int) -> None:
        with smtp(port) as s:
            assert s.sendmail(SENDER, ["bob@mail.test.example"],
                              b"Subject: %d\r\n\r\nx\r\n" % i) == {}

    def served() -> list[int]:
        """The smtpd pid of each session so far, in order ("connect from" comes first)."""
        return [pid for pid, text in cursor.by("smtpd") if text.startswith("connect from")]

    # Sessions one after another until the first process has taken its third: which
    # process takes a session is not fixed - its successor may be up and accepting while
    # the retiring one still accepts (HANDOVER), or the master may spawn a second one
    # before the first says idle again - so sessions are counted by pid, not by order.
    sent = 0
    while True:
        send(sent)
        sent += 1
        first = served()[0]
        if served().count(first) >= 3:
            break
        assert sent < 20, f"the first smtpd took {served().count(first)} of {sent} sessions"
    wait_for(lambda: not psutil.pid_exists(first), 20, "the retired process to exit")
    for i in range(sent, sent + 4):  # its successors serve the rest
        send(i)
    sent += 4
    assert first not in served()[-4:], served()
    wait_for(lambda: len(ms.maildir("bob")) == sent, 30, f"{sent} deliveries")
    idle = [connect(port) for _ in range(3)]
    try:
        for s in idle:
            assert read_reply(s, bytearray()).startswith(b"220 ")
        ms.stop()  # asserts that no process is left behind
        assert all(read_reply(s, bytearray(), 10) == b"" for s in idle)
    finally:
        for s in idle:
            s.close()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("busy_sessions, processes", [("1", 8), ("5", 2)])
def test_master_killed_with_eight_sessions_the_orphans_exit_after_them(
        mailsys: MakeSystem, busy_sessions: str, processes: int) -> None:
    """kill -9 of the master with 8 sessions open (the operator's test): each smtpd
    finishes its sessions - mail sent in them is still queued, as Postfix's single_server
    smtpd finishes the session in hand - and exits when they end, having seen EOF on the
    master's status descriptor (Postfix: single_server_abort, "master disconnect", logged
    only with -v). No orphan outlives its sessions. A process per client, and (the
    default) five clients to a process, each in a thread of its own."""
    ms, port = start(mailsys, dict(MAIN, smtpd_timeout="300s",
                                   smtpd_process_busy_sessions=busy_sessions))
    clients = [smtp(port) for _ in range(8)]
    try:
        for c in clients:
            assert c.ehlo()[0] == 250
        wait_for(lambda: len(smtpd_pids(ms)) == processes, 20, f"{processes} smtpd processes")
        orphans = [psutil.Process(pid) for pid in smtpd_pids(ms)]
        assert ms.proc is not None
        ms.proc.kill()
        ms.proc.wait()
        for i, c in enumerate(clients):  # the sessions go on
            assert c.sendmail(SENDER, ["bob@mail.test.example"],
                              f"Subject: orphan {i}\r\n\r\nx\r\n".encode()) == {}
        assert all(_alive(p) for p in orphans)
        for c in clients:
            c.quit()
    finally:
        for c in clients:
            c.close()
    wait_for(lambda: not any(_alive(p) for p in orphans), 30,
             "every orphaned smtpd to exit")
    wait_for(lambda: not ms.processes(), 30, "no process of the old master left")
