"""Issue 6 (fresh-eyes finding): a failed STARTTLS handshake is logged in Postfix's words -
``warning: TLS library problem: <the SSL error>`` and ``SSL_accept error from <client>:
-1``, or ``SSL_accept error from <client>: lost connection`` for a client that hangs up
in the handshake - then ``lost connection after STARTTLS``, as Postfix's smtpd logs it.
It was a bare ``warning: localhost[127.0.0.1]: TLSSetupException: `` (aiosmtpd's exception
has no text), which told the operator nothing."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from tests.harness import MakeSystem, wait_for
from tests.tools.smtpd_system import smtpd_cert, start

pytestmark = pytest.mark.timeout(120)


def _starttls(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    f = s.makefile("rb")
    assert f.readline().startswith(b"220 ")
    s.sendall(b"EHLO client.example\r\n")
    while f.readline()[3:4] == b"-":
        pass
    s.sendall(b"STARTTLS\r\n")
    assert f.readline().startswith(b"220 2.0.0")
    return s


def test_failed_handshakes_are_logged_as_postfix_does(mailsys: MakeSystem,
                                                      tmp_path: Path) -> None:
    cert = smtpd_cert(tmp_path)
    ms, port = start(mailsys, {"smtpd_tls_cert_file": str(cert)})
    with _starttls(port) as s:  # not TLS at all
        s.sendall(b"\x16\x03\x01garbage, not a TLS record\r\n" * 3)
        s.settimeout(10)
        try:
            while s.recv(1000):
                pass
        except ConnectionResetError:
            pass
    with _starttls(port):  # the client hangs up in the handshake
        pass
    wait_for(lambda: ms.log().count("lost connection after STARTTLS from "
                                    "localhost[127.0.0.1]") == 2, 20, "two failed handshakes")
    log = ms.log()
    assert re.search(r"smtpd\[\d+\]: warning: TLS library problem: \S", log), log
    assert "SSL_accept error from localhost[127.0.0.1]: -1\n" in log
    assert "SSL_accept error from localhost[127.0.0.1]: lost connection\n" in log
    assert "TLSSetupException" not in log
