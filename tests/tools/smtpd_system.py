"""Helpers for the issue-6 acceptance tests: a qmgrd instance (tests.harness.MailSystem)
with an smtpd service on a free loopback port, and small SMTP client helpers.

    master_cf_with_smtpd(port, options="", chroot=False) -> str
                                                    the bundled master.cf (its smtpd line
                                                    dropped) plus one smtpd line
    start(mailsys, main=None, port=None, extra_cf="", options="", chroot=False)
                                                    -> (MailSystem, port)
                                                    started, smtpd answering
    greeting(port, timeout=10) -> bytes             connect, read the 220 line, close
    wait_smtpd(port, timeout=20)                    until greeting() works
    wait_settled(ms)                                until each logged session has ended
    smtp(port) -> smtplib.SMTP                      connected (caller closes)
    smtpd_pids(ms) -> set[int]                      pids of the instance's smtpd processes
    smtpd_cert(dir) -> Path                         a self-signed certificate and key for
                                                    mail.test.example (openssl), mode 0644
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import REPO, MailSystem, free_port, require_tool, service_of, wait_for


def master_cf_with_smtpd(port: int, options: str = "", chroot: bool = False) -> str:
    lines = [line for line in (REPO / "etc" / "master.cf").read_text().splitlines()
             if not line.rstrip().endswith(" smtpd") or line.startswith("#")]
    lines.append(f"127.0.0.1:{port} inet n - {'y' if chroot else 'n'} - - smtpd"
                 f"{' ' + options if options else ''}")
    return "\n".join(lines) + "\n"


def greeting(port: int, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1000)
            if not chunk:
                break
            data += chunk
        try:
            s.sendall(b"QUIT\r\n")
            s.recv(1000)
        except OSError:
            pass
        return data


def wait_smtpd(port: int, timeout: float = 20) -> None:
    def ok() -> bool:
        try:
            return greeting(port, 5).startswith(b"220 ")
        except OSError:
            return False

    wait_for(ok, timeout, f"smtpd on port {port}")


def start(mailsys: Callable[..., MailSystem], main: dict[str, str] | None = None,
          port: int | None = None, extra_cf: str = "", options: str = "",
          chroot: bool = False) -> tuple[MailSystem, int]:
    port = port or free_port()
    ms = mailsys(main=main or {},
                 master_cf=master_cf_with_smtpd(port, options, chroot) + extra_cf)
    ms.start()
    wait_smtpd(port)
    wait_settled(ms)
    return ms, port


def wait_settled(ms: MailSystem, timeout: float = 20) -> None:
    """Until every smtpd session in the log has its ``disconnect from`` line."""
    def settled() -> bool:
        log = ms.log()
        return log.count("]: connect from ") == log.count("]: disconnect from ")

    wait_for(settled, timeout, "smtpd sessions to end")


def smtp(port: int, timeout: float = 30, **kw: Any) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example",
                        timeout=timeout, **kw)


def smtpd_pids(ms: MailSystem) -> set[int]:
    """The instance's smtpd children (their title is ``qmgrd: 127.0.0.1:<port>``)."""
    out = set()
    for p in ms.processes():
        name = service_of(p)
        if name and name.startswith("127.0.0.1:"):
            out.add(p.pid)
    return out


def smtpd_cert(directory: Path) -> Path:
    """``directory/smtpd.pem``: a self-signed certificate and its key in one file, for
    mail.test.example, made with openssl (which must exist when CI=true), mode 0644:
    smtpd reads it before it drops privileges; any reader will do."""
    openssl = require_tool("openssl")
    cert = directory / "smtpd.pem"
    r = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=mail.test.example", "-keyout", str(cert),
                        "-out", str(cert)], capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    cert.chmod(0o644)
    return cert
