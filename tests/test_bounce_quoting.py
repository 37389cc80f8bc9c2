"""A bounce notice names a quoted local part once-quoted.

Agents log internal-form addresses (``.bob@localhost``); the status log writes them
quoted (``".bob"@localhost``, postfix.md §5.5) and the bounce service used to quote
them again (``"\\".bob\\""@localhost``) in the text and in Final-Recipient /
Original-Recipient. Checked over a real spool through BounceService.handle(), and on
statuslog.unquote_822_local as the inverse of quote_822_local.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qmgrd.delivery import BOUNCE_CMD_FLUSH, StatusRequest
from qmgrd.spool import statuslog
from qmgrd.spool.envelope import Recipient
from qmgrd.spool.message import QueueFile
from tests.test_agent_support import close_log, make_env  # noqa: F401  (fixture)
from transports.bounce import BounceService

DSN = statuslog.Dsn("5.1.1", "failed", "invalid mailbox name", "x-unix", "bad name")


def _notice(tmp_path: Path, rcpt: Recipient, logname: str) -> bytes:
    env = make_env(tmp_path, notify_classes="")
    qid = env.queue([rcpt], b"Subject: x\n\nx\n", sender="alice@example.com")
    with QueueFile.open(env.spool, "active", qid, lock=None, readonly=True) as qf:
        (queued,) = qf.recipients
    statuslog.append(env.spool, logname, qid, queued, DSN)
    svc = BounceService(env.ctx(logname))
    req = StatusRequest(nrequest=BOUNCE_CMD_FLUSH, queue_name="active", queue_id=qid,
                        sender="alice@example.com")
    assert svc.handle(req) == 0
    (nid,) = sorted(svc.spool.scan("incoming"))
    with QueueFile.open(svc.spool, "incoming", nid, lock=None, readonly=True) as qf:
        return b"\n".join(qf.iter_lines()) + b"\n"


@pytest.mark.parametrize("logname", ["bounce", "defer"])
@pytest.mark.parametrize("address, shown", [
    (".bob@localhost", '".bob"@localhost'),
    ("quoted x@later.example", '"quoted x"@later.example'),
    ('a"b@x.example', '"a\\"b"@x.example'),
])
def test_notice_quotes_local_part_once(tmp_path: Path, logname: str, address: str,
                                       shown: str) -> None:
    data = _notice(tmp_path, Recipient(address, orig_rcpt="o p@x.example"), logname)
    text = data.decode("utf-8")
    assert f'<{shown}> (expanded from <"o p"@x.example>): invalid mailbox name' in text
    assert f"Final-Recipient: rfc822; {shown}\n" in text
    assert 'Original-Recipient: rfc822; "o p"@x.example\n' in text
    assert '\\"' not in text.replace(shown, "")


@pytest.mark.parametrize("address", [
    "bob@x", ".bob@x", "a b@x", 'a"b@x', "a\\b@x", 'a"@b@x', "x", "a b", "", "@x",
    "j\u00f6rg@x", '"@x'])
def test_unquote_inverts_quote(address: str) -> None:
    assert statuslog.unquote_822_local(statuslog.quote_822_local(address)) == address
