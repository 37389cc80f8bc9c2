"""Tests for qmgrd.spool.cleanup: queue files written from envelope + content."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from master import log
from master.config import Config
from qmgrd.spool import records as R
from qmgrd.spool import statuslog
from qmgrd.spool.cleanup import Cleanup, CleanupError, mail_date
from qmgrd.spool.envelope import DSN_RET_HDRS, Envelope, Recipient
from qmgrd.spool.message import QueueFile
from qmgrd.spool.queue import Spool
from qmgrd.spool.records import RecordReader

CORPUS = Path(__file__).parent / "data" / "corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.eml"))


def make(tmp_path: Path, extra: str = "") -> tuple[Cleanup, Spool]:
    text = (f"queue_directory = {tmp_path}/q\nmyhostname = mx.example.org\n"
            f"mydomain = example.org\n{extra}")
    cfg = Config.from_text(text, str(tmp_path))
    spool = Spool.from_config(cfg)
    spool.make_dirs()
    return Cleanup(cfg, spool), spool


def lines_of(spool: Spool, qid: str) -> list[bytes]:
    with QueueFile.open(spool, "incoming", qid, lock=None) as qf:
        return list(qf.iter_lines())


def expected_lines(data: bytes) -> list[bytes]:
    norm = data.replace(b"\r\n", b"\n")
    out = norm.split(b"\n")
    if out and out[-1] == b"":
        out.pop()
    return out


def env(*rcpts: str, sender: str = "alice@example.org") -> Envelope:
    return Envelope(sender, [Recipient(r) for r in rcpts])


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_corpus_round_trip_smtp(tmp_path: Path, path: Path) -> None:
    c, spool = make(tmp_path)
    data = path.read_bytes()
    if path.name == "10-many-received.eml":  # over hopcount_limit: refused (below)
        with pytest.raises(CleanupError):
            c.submit(env("ops@example.net"), data, origin="smtp")
        return
    qid = c.submit(env("ops@example.net"), data, origin="smtp")
    assert lines_of(spool, qid) == expected_lines(data)
    st = os.stat(spool.path("incoming", qid))
    assert stat.S_IMODE(st.st_mode) == 0o700


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_corpus_round_trip_local_adds_received(tmp_path: Path, path: Path) -> None:
    c, spool = make(tmp_path)
    data = path.read_bytes()
    qid = c.submit(env("ops@example.net"), data, origin="local", uid=1234)
    got = lines_of(spool, qid)
    assert got[0] == b"Received: by mx.example.org (qmgrd, from userid 1234)"
    assert got[1].startswith(f"\tid {qid}; ".encode())
    assert got[2:] == expected_lines(data)


def test_mixed_line_endings_keep_lone_cr_and_nul(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    data = b"Subject: x\r\n\r\na\r\nb\rc\n\x00d\r\r\nlast\r"
    qid = c.submit(env("b@example.net"), data, origin="smtp")
    got = lines_of(spool, qid)
    # every CR right before an LF goes (Postfix's smtp_get), a CR before no LF stays
    assert got[-5:] == [b"", b"a", b"b\rc", b"\x00d", b"last\r"]


def test_record_headers_are_shared_for_the_default_limit(tmp_path: Path) -> None:
    """The N record headers for each line length are made once per process and
    line_length_limit (for the default at import: shared by the forked children), not
    by each Cleanup; a different limit gets its own, as long."""
    a, _ = make(tmp_path / "a")
    b, _ = make(tmp_path / "b")
    assert a._nhdr is b._nhdr and len(a._nhdr) == 2049
    assert a._nhdr[5] == R.REC_NORM + b"\x05" and a._nhdr[2048] == R.REC_NORM + b"\x80\x10"
    c, _ = make(tmp_path / "c", "line_length_limit = 512\n")
    assert len(c._nhdr) == 513 and c._nhdr[:513] == a._nhdr[:513]


def test_long_lines_become_L_records(tmp_path: Path) -> None:
    c, spool = make(tmp_path, "line_length_limit = 512\n")  # Postfix's minimum
    body = b"x" * 1100 + b"\n" + b"y" * 1000 + b"\n" + b"z" * 512 + b"\n"
    data = b"Subject: long\n\n" + body
    qid = c.submit(env("b@example.net"), data, origin="smtp")
    with open(spool.path("incoming", qid), "rb") as f:
        types = [r.rtype for r in RecordReader(f)]
    assert types.count(b"L") == 3  # 1100 -> L L N, 1000 -> L N, 512 -> N
    assert lines_of(spool, qid)[-3:] == [b"x" * 1100, b"y" * 1000, b"z" * 512]


def test_missing_headers_added_return_path_removed(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    e = Envelope("joe", [Recipient("bob@example.net")], fullname="Joe Q. Public")
    qid = c.submit(e, b"Return-Path: <evil@example.com>\nSubject: hi\n\nbody\n")
    got = lines_of(spool, qid)
    text = b"\n".join(got)
    assert b"Return-Path" not in text
    assert f"Message-ID: <{qid}@mx.example.org>".encode() in got
    assert any(x.startswith(b"Date: ") for x in got)
    assert b'From: "Joe Q. Public" <joe@mx.example.org>' in got
    assert got[-2:] == [b"", b"body"]
    assert got.index(b"Subject: hi") < got.index(b"")
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert qf.sender == "joe@mx.example.org" and qf.fullname == "Joe Q. Public"


def test_smtp_origin_adds_no_from_and_no_received(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    qid = c.submit(env("b@example.net"), b"Subject: s\n\nb\n", origin="smtp")
    got = lines_of(spool, qid)
    assert not any(x.startswith((b"From:", b"Received:")) for x in got)
    assert any(x.startswith(b"Message-ID:") for x in got)


def test_non_header_line_gets_separator(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    qid = c.submit(env("b@example.net"), b"Subject: s\nnot a header\nmore\n", origin="smtp")
    got = lines_of(spool, qid)
    assert got[-3:] == [b"", b"not a header", b"more"]
    qid = c.submit(env("b@example.net"), b" starts with space\n", origin="smtp")
    assert lines_of(spool, qid)[-2:] == [b"", b" starts with space"]


def test_extract_recipients(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    data = (b"To: Bob <bob@example.net>, carol\nCc: undisclosed:;\nBcc: secret@example.com,\n"
            b" bob@example.net\nSubject: t\n\nhi\n")
    qid = c.submit(env("extra@example.org"), data, extract_recipients=True)
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert [r.address for r in qf.recipients] == [
            "extra@example.org", "bob@example.net", "carol@mx.example.org",
            "secret@example.com"]
    got = lines_of(spool, qid)
    assert not any(x.lower().startswith(b"bcc") or x == b" bob@example.net" for x in got)
    with pytest.raises(CleanupError) as ei:
        c.submit(env(), b"Subject: none\n\nx\n", extract_recipients=True)
    assert ei.value.status == "5.1.0"
    assert os.listdir(spool.queue_path("incoming")) == [qid]


def test_extracted_bare_words_are_one_address(tmp_path: Path) -> None:
    """``To: john smith`` (a name with no address) is the recipient ``john smith``, as
    Postfix's cleanup reads it - never the local user ``john``."""
    c, spool = make(tmp_path)
    data = (b"To: john smith, Ann <ann@example.net>\nCc: <b15@example.net> Trailing junk\n"
            b"Subject: t\n\nhi\n")
    qid = c.submit(env(), data, extract_recipients=True)
    with QueueFile.open(spool, "incoming", qid) as qf:  # never "Trailing": words after
        assert [r.address for r in qf.recipients] == [  # an address are not one
            "john smith@mx.example.org", "ann@example.net", "b15@example.net"]


def test_resent_headers_take_precedence(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    data = b"To: a@example.net\nResent-To: r@example.net\n\nx\n"
    qid = c.submit(env(), data, extract_recipients=True)
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert [r.address for r in qf.recipients] == ["r@example.net"]


def test_size_limit(tmp_path: Path) -> None:
    c, spool = make(tmp_path, "message_size_limit = 100\n")
    with pytest.raises(CleanupError) as ei:
        c.submit(env("b@example.net"), b"x" * 101)
    assert (ei.value.status, ei.value.text) == ("5.3.4", "message file too big")
    assert os.listdir(spool.queue_path("incoming")) == []


def test_write_error_removes_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c, spool = make(tmp_path)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(CleanupError) as ei:
        c.submit(env("b@example.net"), b"Subject: s\n\nb\n")
    assert ei.value.status == "4.3.0"
    assert os.listdir(spool.queue_path("incoming")) == []


def test_bad_envelope_data(tmp_path: Path) -> None:
    c, _spool = make(tmp_path)
    with pytest.raises(CleanupError) as ei:
        c.submit(env("b@example.net\nX-Evil: 1"), b"x\n")
    assert ei.value.status == "5.6.0"


def test_records_dsn_and_attributes(tmp_path: Path) -> None:
    c, spool = make(tmp_path, "delay_warning_time = 4h\n")
    e = Envelope("a@example.org", [Recipient("b@example.net", "B@example.net",
                                             "rfc822;B@example.net", 8)],
                 arrival=(1795952677, 919070), ret=DSN_RET_HDRS, envid="ENV1",
                 attrs={"log_client_name": "client.example"})
    qid = c.submit(e, "Subject: é\n\nGrüße\n".encode(), origin="smtp")
    with open(spool.path("incoming", qid), "rb") as f:
        recs = list(RecordReader(f))
    types = b"".join(r.rtype for r in recs)
    assert types.startswith(b"CTA") and types.endswith(b"XE")
    attrs = [r.data for r in recs if r.rtype == b"A"]
    for want in (b"create_time=1795952677", b"rewrite_context=remote", b"encoding=8bit",
                 b"envelope_id=ENV1", b"ret_flags=2", b"notify_flags=8",
                 b"dsn_orig_rcpt=rfc822;B@example.net", b"log_client_name=client.example"):
        assert want in attrs
    assert types.index(b"O") + 1 == types.index(b"R")
    size = recs[0].data.split()
    m = next(r for r in recs if r.rtype == b"M")
    x = next(r for r in recs if r.rtype == b"X")
    assert int(size[1]) == m.offset + 2 and int(size[0]) == x.offset - int(size[1])
    assert int(size[3]) == 16  # DELAY << 1
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert qf.arrival == (1795952677, 919070) and qf.create_time == 1795952677
        assert qf.warn_time == 1795952677 + 4 * 3600
        assert (qf.envid, qf.ret, qf.encoding, qf.rewrite_context) == (
            "ENV1", 2, "8bit", "remote")
        assert qf.attrs == {"log_client_name": "client.example"}
        assert qf.recipients == [Recipient("b@example.net", "B@example.net",
                                           "rfc822;B@example.net", 8, qf.recipients[0].offset)]
        qf.set_warn_done()
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert qf.warn_time == -1


def test_smtputf8_autodetect_for_local(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    data = (CORPUS / "09-smtputf8.eml").read_bytes()
    qid = c.submit(env("ops@example.net"), data)
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert qf.smtputf8 == 1 | 2


def test_hopcount_bounce(tmp_path: Path) -> None:
    """Local input (sendmail/pickup) over hopcount_limit was already accepted: it is
    queued with every recipient bounced (Postfix cleanup with CLEANUP_FLAG_BOUNCE)."""
    c, spool = make(tmp_path)
    data = (CORPUS / "10-many-received.eml").read_bytes()
    qid = c.submit(env("ops@example.net", "b@example.net"), data, origin="local")
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert qf.recipients == [] and qf.done_count == 2
    entries = statuslog.read(spool, "bounce", qid)
    assert [(r.address, d.status, d.action, d.reason) for r, d in entries] == [
        ("ops@example.net", "5.4.0", "failed", "too many hops"),
        ("b@example.net", "5.4.0", "failed", "too many hops")]
    assert all(r.offset > 0 for r, _ in entries)


def test_hopcount_counts_received_only(tmp_path: Path) -> None:
    """Postfix's cleanup_header raises hop_count for Received: alone: Delivered-To:
    headers (local(8)'s loop check) do not count."""
    c, spool = make(tmp_path, "hopcount_limit = 3\n")
    many_dt = b"Received: x\n" + b"Delivered-To: b@example.net\n" * 5 + b"\nx\n"
    qid = c.submit(env("b@example.net"), many_dt)
    with QueueFile.open(spool, "incoming", qid) as qf:  # 1 + our own Received = 2 < 3
        assert len(qf.recipients) == 1 and qf.done_count == 0
    qid = c.submit(env("b@example.net"), b"Received: x\nReceived: y\n\nx\n")
    with QueueFile.open(spool, "incoming", qid) as qf:  # 2 + our own Received = 3
        assert qf.recipients == [] and qf.done_count == 1


def test_trigger_sent_to_qmgr_fifo(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    fifo = os.path.join(spool.queue_directory, "public", "qmgr")
    os.mkfifo(fifo, 0o622)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        c.submit(env("b@example.net"), b"x\n")
        assert os.read(fd, 100) == b"W"
    finally:
        os.close(fd)


def test_duplicate_recipients_dropped(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    qid = c.submit(env("b@example.net", "b@example.net", "c@example.net"), b"x\n")
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert [r.address for r in qf.recipients] == ["b@example.net", "c@example.net"]


def test_mail_date_format() -> None:
    d = mail_date(1700000000)
    day, rest = d.split(", ", 1)
    assert day in ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    assert len(rest.split()) >= 5 and rest.split()[4][0] in "+-"


def test_records_module_constants_match_written_file(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    qid = c.submit(env("b@example.net"), b"x\n")
    with open(spool.path("incoming", qid), "rb") as f:
        first = f.read(R.SIZE_RECORD_LEN + 1)
    assert first[:2] == b"C\x5f" and first[R.SIZE_RECORD_LEN:] == b"T"


def test_extracted_recipients_in_internal_form(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    data = (b'To: "c d"@example.com, <e@example.com>, undisclosed-recipients:;\n'
            b'Cc: "f\\"g"@example.com, <>, "user"@localhost\n\nx\n')
    qid = c.submit(env(), data, extract_recipients=True)
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert [r.address for r in qf.recipients] == [
            "c d@example.com", "e@example.com", 'f"g@example.com', "user@localhost"]


def test_added_from_quotes_the_local_part(tmp_path: Path) -> None:
    c, spool = make(tmp_path)
    qid = c.submit(env("b@example.net", sender="a b@y.example"), b"Subject: s\n\nx\n")
    assert b'From: "a b"@y.example' in lines_of(spool, qid)
    e = Envelope('q"t@y.example', [Recipient("b@example.net")], fullname="Q T")
    qid = c.submit(e, b"Subject: s\n\nx\n")
    assert b'From: Q T <"q\\"t"@y.example>' in lines_of(spool, qid)


@pytest.fixture
def maillog(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "maillog"
    log.setup("cleanup", str(path))
    try:
        yield path
    finally:
        log.close()


def test_bounce_without_recipients_bounces_unknown(tmp_path: Path, maillog: Path) -> None:
    c, spool = make(tmp_path)
    data = b"To: <>\nSubject: lost\n\nbody\n"
    qid = c.bounce(env(), data, "5.1.0", "no recipients specified", extract_recipients=True)
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert qf.recipients == [] and qf.done_count == 1
        assert qf.sender == "alice@example.org"
        lines = list(qf.iter_lines())
    assert b"Subject: lost" in lines and lines[-2:] == [b"", b"body"]
    [(rcpt, dsn)] = statuslog.read(spool, "bounce", qid)
    assert (rcpt.address, rcpt.offset > 0) == ("unknown", True)
    assert (dsn.status, dsn.action, dsn.reason) == ("5.1.0", "failed", "no recipients specified")
    text = maillog.read_text()
    assert f"{qid}: message-id=<{qid}@mx.example.org>" in text
    assert f"{qid}: to=<unknown>, relay=none, delay=" in text
    assert "dsn=5.1.0, status=bounced (no recipients specified)" in text


def test_bounce_too_big_keeps_headers_only(tmp_path: Path, maillog: Path) -> None:
    c, spool = make(tmp_path, "message_size_limit = 100\n")
    data = b"Subject: big\nTo: r@example.net\n\n" + b"y" * 500 + b"\n"
    qid = c.bounce(env("r@example.net"), data, "5.3.4", "message file too big")
    got = lines_of(spool, qid)
    assert b"Subject: big" in got and not any(b"yyy" in x for x in got)
    with QueueFile.open(spool, "incoming", qid) as qf:
        assert qf.ret == DSN_RET_HDRS and qf.recipients == [] and qf.done_count == 1
    [(rcpt, dsn)] = statuslog.read(spool, "bounce", qid)
    assert (rcpt.address, dsn.status, dsn.reason) == (
        "r@example.net", "5.3.4", "message file too big")
    assert "to=<r@example.net>, relay=none" in maillog.read_text()


def test_hopcount_refused_for_smtp(tmp_path: Path, maillog: Path) -> None:
    """smtpd input (origin "smtp") at hopcount_limit: Postfix's cleanup without
    CLEANUP_FLAG_BOUNCE returns CLEANUP_STAT_HOPS (5.4.0 "too many hops", which smtpd
    turns into 554 5.4.0), logs 'message rejected: hopcount exceeded' and keeps no file."""
    c, spool = make(tmp_path, "hopcount_limit = 3\n")
    with pytest.raises(CleanupError) as err:  # smtpd's Received: is in the content
        c.submit(env("b@example.net"), b"Received: a\nReceived: b\nReceived: c\n\nx\n",
                 origin="smtp")
    assert (err.value.status, err.value.text) == ("5.4.0", "too many hops")
    assert not list(spool.scan("incoming")) and not list(spool.scan("bounce"))
    assert not [f for _, _, files in os.walk(tmp_path / "q" / "incoming") for f in files]
    text = maillog.read_text()
    assert text.count("message rejected: hopcount exceeded") == 1
    assert "warning: " in text and "status=bounced" not in text


def test_hopcount_bounce_logged_per_recipient(tmp_path: Path, maillog: Path) -> None:
    c, _ = make(tmp_path, "hopcount_limit = 2\n")
    qid = c.submit(env("b@example.net"), b"Received: x\n\nx\n")
    text = maillog.read_text()
    assert f"warning: {qid}: hop count 2 exceeds limit 2: bouncing 1 recipient(s)" in text
    assert (f"{qid}: to=<b@example.net>, relay=none" in text
            and "dsn=5.4.0, status=bounced (too many hops)" in text)
