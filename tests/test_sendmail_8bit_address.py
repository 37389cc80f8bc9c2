"""qmgr-sendmail refuses an envelope address that is not valid UTF-8 (EX_DATAERR, 65).

Such an address used to be queued as it was: local then bounced it and the bounce
service crashed on it. Both entry points are checked: run() in-process, and the
installed ``qmgr-sendmail`` script (it delegates to qmgrd.sendmail.main) with the raw
bytes on its command line. Nothing may be left in maildrop/.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmgrd.sendmail import run

EX_DATAERR = 65
SCRIPT = Path(sys.executable).parent / "qmgr-sendmail"


def maildrop(confdir: Path) -> list[str]:
    return os.listdir(confdir / "q" / "maildrop")


@pytest.mark.parametrize("args, what, shown", [
    (["a/\udcff@localhost"], "recipient", "<a/\\xff@localhost>"),
    (["ok@example.net", "\udcff\udcfe@localhost"], "recipient", "<\\xff\\xfe@localhost>"),
    (["x@a, \"b\udcff c\"@d"], "recipient", "\\xff"),  # needs the RFC 5322 parser
    (["-f", "s\udcc3@example.org", "ok@example.net"], "sender", "<s\\xc3@example.org>"),
    (["-fs\udcff@example.org", "ok@example.net"], "sender", "\\xff"),
])
def test_run_refuses_malformed_utf8(confdir: Path, args: list[str], what: str,
                                    shown: str) -> None:
    err = io.StringIO()
    code = run(["-c", str(confdir), *args], io.BytesIO(b"Subject: x\n\nx\n"), err)
    assert code == EX_DATAERR
    text = err.getvalue()
    assert text.startswith(f"qmgr-sendmail: fatal: malformed UTF-8 in {what} address: ")
    assert shown in text
    assert text.count("\n") == 1
    assert maildrop(confdir) == []
    # valid UTF-8 (SMTPUTF8 addresses) is still queued
    code = run(["-c", str(confdir), "-f", "j\u00f6rg@example.org", "m\u00fcller@example.net"],
               io.BytesIO(b"Subject: x\n\nx\n"), io.StringIO())
    assert code == 0
    assert len(maildrop(confdir)) == 1


@pytest.mark.skipif(not SCRIPT.exists(), reason="qmgr-sendmail script not installed")
@pytest.mark.parametrize("args", [
    [b"a/\xff@localhost"],
    [b"-f", b"s\xfe@example.org", b"ok@example.net"],
])
def test_installed_script_refuses_raw_bytes(confdir: Path, args: list[bytes]) -> None:
    p = subprocess.run([os.fsencode(SCRIPT), b"-c", os.fsencode(confdir), *args],
                       input=b"Subject: x\n\nx\n", capture_output=True, timeout=30,
                       check=False)
    assert p.returncode == EX_DATAERR, p.stderr
    assert p.stderr.startswith(b"qmgr-sendmail: fatal: malformed UTF-8 in ")
    assert b"\\x" in p.stderr and b"\xff" not in p.stderr and b"\xfe" not in p.stderr
    assert maildrop(confdir) == []


@pytest.mark.parametrize("args", [["-t"], ["-t", "ok@example.net"]])
def test_t_refuses_header_recipients_that_are_not_utf8(confdir: Path,
                                                       args: list[str]) -> None:
    """-t takes recipients from To/Cc/Bcc: a header address that is not valid UTF-8 is
    refused as an argument would be (exit 65, nothing queued)."""
    err = io.StringIO()
    code = run(["-c", str(confdir), *args],
               io.BytesIO(b"To: j\xf6rg@localhost\nCc: ok2@example.net\nSubject: t\n\nb\n"),
               err)
    assert code == 65, err.getvalue()
    assert "malformed UTF-8 in recipient address: <j\\xf6rg@localhost>" in err.getvalue()
    assert not list((confdir / "q" / "maildrop").iterdir())
