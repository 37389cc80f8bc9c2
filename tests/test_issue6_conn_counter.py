"""Issue 6 (fresh-eyes finding): smtpd_client_connection_count_limit counts each client
address on its own. The shared counter (transports.smtpd_policy.ConnectionCounter) used
65,536 buckets of an unkeyed crc32 of the address, so two addresses of one bucket shared
a count: with 127.0.0.1 at the limit, 127.1.140.163 - which had no session at all - got
``421 4.7.0 ... too many connections`` and the log said ``Connection concurrency limit
exceeded: 4 from unknown[127.1.140.163]``; anyone could compute an address of a
victim's bucket and shut that client out by holding the limit's connections."""

from __future__ import annotations

import socket
import zlib
from pathlib import Path

import pytest

from tests.harness import MakeSystem
from tests.tools.smtpd_system import start
from transports.smtpd_policy import ConnectionCounter

pytestmark = pytest.mark.timeout(60)

A, B = "127.0.0.1", "127.1.140.163"  # one crc32 bucket of 65,536


def test_the_two_addresses_collide_in_the_old_scheme() -> None:
    assert zlib.crc32(A.encode()) % 65536 == zlib.crc32(B.encode()) % 65536


def test_addresses_do_not_share_a_count(tmp_path: Path) -> None:
    path = str(tmp_path / "smtpd.conn")
    one, two = ConnectionCounter(path), ConnectionCounter(path)
    assert [one.acquire(A, 3)[0] for _ in range(3)] == [1, 2, 3]
    assert one.acquire(A, 3) == (4, None)
    assert two.acquire(B, 3)[0] == 1  # not 4: B has no session
    assert two.acquire(A, 3) == (4, None)  # the other "process" still sees A's three
    three = ConnectionCounter(path)  # every opener reads the same key
    assert three._key == one._key == two._key and len(one._key) == 16
    assert three.acquire(A, 3) == (4, None)


def test_a_client_is_not_refused_for_another_address(mailsys: MakeSystem) -> None:
    ms, port = start(mailsys, {"smtpd_client_connection_count_limit": "3",
                               "smtpd_client_event_limit_exceptions": ""})

    def connect(source: str) -> tuple[socket.socket, bytes]:
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(20)
        s.connect(("127.0.0.1", port))
        return s, s.recv(200)

    held = [connect(A) for _ in range(3)]
    try:
        assert all(g.startswith(b"220 ") for _, g in held)
        over, greeting = connect(A)
        over.close()
        assert greeting.startswith(b"421 4.7.0 ")
        other, greeting = connect(B)
        other.close()
        assert greeting.startswith(b"220 "), greeting
        assert f"limit exceeded: 4 from unknown[{B}]" not in ms.log()
    finally:
        for s, _ in held:
            s.close()
