"""Tests for qmgr-sendmail (qmgrd.sendmail): options, maildrop file format, exit codes."""

from __future__ import annotations

import io
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qmgrd.sendmail import run
from qmgrd.spool.maildrop import MaildropMessage, read_maildrop
from qmgrd.spool.queueid import valid_id
from qmgrd.spool.records import RecordReader

REPO = Path(__file__).resolve().parent.parent


def sendmail(confdir: Path, args: list[str], data: bytes) -> tuple[int, str]:
    err = io.StringIO()
    code = run(["-c", str(confdir), *args], io.BytesIO(data), err)
    return code, err.getvalue()


def maildrop_files(confdir: Path) -> list[Path]:
    return sorted((confdir / "q" / "maildrop").iterdir())


def only_message(confdir: Path) -> tuple[Path, MaildropMessage]:
    files = maildrop_files(confdir)
    assert len(files) == 1
    with open(files[0], "rb") as f:
        return files[0], read_maildrop(f)


def test_basic_submission(confdir: Path) -> None:
    code, err = sendmail(confdir, ["-f", "alice@example.org", "-F", "Alice A",
                                   "bob@example.net", "carol@example.net"],
                         b"Subject: hi\r\n\r\nline 1\r\n.\r\nnot read\n")
    assert (code, err) == (0, "qmgr-sendmail: warning: unable to wake up the pickup service ("
                           + maildrop_files(confdir)[0].name + " queued)\n")
    path, msg = only_message(confdir)
    assert valid_id(path.name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o744
    assert (msg.sender, msg.fullname) == ("alice@example.org", "Alice A")
    assert [r.address for r in msg.recipients] == ["bob@example.net", "carol@example.net"]
    assert msg.content == b"Subject: hi\n\nline 1\n"
    assert not msg.extract_recipients


def test_a_leading_mbox_from_line_is_skipped(confdir: Path) -> None:
    """As Postfix's sendmail: a first line "From sender date" (an mbox separator) would
    otherwise push the real headers into the body; only the first line is skipped."""
    code, _ = sendmail(confdir, ["-i", "bob@example.net"],
                       b"From alice@example.org Sun Nov 29 10:00:00 2026\nSubject: s\n\n"
                       b"From the body: kept\n")
    assert code == 0
    assert only_message(confdir)[1].content == b"Subject: s\n\nFrom the body: kept\n"


def test_record_types_are_postdrop_subset(confdir: Path) -> None:
    assert sendmail(confdir, ["-t", "-N", "success,delay", "-R", "hdrs", "-V", "env-1", "-i",
                              "b@example.net"], b"To: c@example.net\n\n.\nx" * 1)[0] == 0
    path = maildrop_files(confdir)[0]
    with open(path, "rb") as f:
        recs = list(RecordReader(f))
    types = b"".join(r.rtype for r in recs)
    env, _, rest = types.partition(b"M")
    content, _, extracted = rest.partition(b"X")
    assert set(env) <= set(b"MFSRVAin") and set(content) <= set(b"XLN")
    assert extracted == b"E"
    attrs = [r.data for r in recs if r.rtype == b"A"]
    assert attrs == [b"envelope_id=env-1", b"ret_flags=2", b"rewrite_context=local",
                     b"extract_recipients=1", b"notify_flags=10"]
    _, msg = only_message(confdir)
    assert msg.content == b"To: c@example.net\n\n.\nx\n"  # -i: the dot line is data
    assert (msg.envid, msg.ret, msg.extract_recipients) == ("env-1", 2, True)
    assert msg.recipients[0].notify == 10


def test_defaults_oi_and_attached_args(confdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMGRD_CONFIG_DIR", str(confdir))
    err = io.StringIO()
    assert run(["-oi", "-oem", "-fbob", "-Fx", "-bm", "r@example.net"],
               io.BytesIO(b".\n"), err) == 0
    _, msg = only_message(confdir)
    assert msg.sender == "bob" and msg.fullname == "x" and msg.content == b".\n"


def test_traffic_log_option_is_ignored(confdir: Path) -> None:
    """-X log_file (sendmail's traffic log) is accepted and ignored, as Postfix does."""
    log = confdir / "traffic.log"
    assert sendmail(confdir, ["-X", str(log), "-X/dev/null", "r@example.net"], b"x")[0] == 0
    _, msg = only_message(confdir)
    assert [r.address for r in msg.recipients] == ["r@example.net"] and not log.exists()


def test_ignored_options_of_postfix(confdir: Path) -> None:
    """-O option=value is accepted and ignored, as Postfix's sendmail does."""
    assert sendmail(confdir, ["-O", "DeliveryMode=b", "-ODeliveryMode=b", "r@example.net"],
                    b"x")[0] == 0
    assert [r.address for r in only_message(confdir)[1].recipients] == ["r@example.net"]


def _sm(confdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmgrd.sendmail", "-c", str(confdir), *args],
                          input="", capture_output=True, text=True, cwd=REPO, timeout=60,
                          check=False)


def test_mailq_flush_and_newaliases_modes(confdir: Path) -> None:
    """-bp lists the queue (qmgr-ctl list, as Postfix runs postqueue -p); -q and -qRsite
    flush (qmgr-ctl flush - with the mail system down, its exit 69 and postqueue's
    "mail system is down" - and flush --site); -I (newaliases) warns that there is nothing to rebuild and exits 0."""
    assert sendmail(confdir, ["r@example.net"], b"Subject: s\n\nx\n")[0] == 0
    (qfile,) = maildrop_files(confdir)
    p = _sm(confdir, "-bp")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("----Queue ID-----") and f"{qfile.name}" in p.stdout
    assert "r@example.net" in p.stdout and p.stdout.endswith("in 1 Request.\n")
    for args in (["-q"],):
        p = _sm(confdir, *args)
        assert p.returncode == 69, (args, p.stderr)
        assert p.stderr.startswith("qmgr-ctl: fatal: ") and "is down" in p.stderr, p.stderr
    for args in (["-qRexample.net"], ["-qR", "example.net"]):  # moves deferred files itself
        p = _sm(confdir, *args)
        assert (p.returncode, p.stderr) == (
            0, "qmgr-ctl: flushed 0 deferred messages for example.net\n"), args
    p = _sm(confdir, "-qR..")
    assert p.returncode == 64 and "bad domain" in p.stderr
    # as Postfix's sendmail: -q<interval> exits 0 at once (test_postfix_flags...),
    # -qS (and any other letter) is not implemented, and a mode takes no recipient
    for args, text in ((["-qSsite"], "-qS is not implemented"),
                       (["-bp", "r@example.net"], "display queue mode requires no recipient"),
                       (["-q", "r@example.net"], "flush queue mode requires no recipient"),
                       (["-qRexample.net", "r@x"], "flush site requires no recipient")):
        p = _sm(confdir, *args)
        assert (p.returncode, p.stderr) == (64, f"qmgr-sendmail: fatal: {text}\n"), args
    p = _sm(confdir, "-I")
    warning = ("qmgr-sendmail: warning: qmgrd reads alias_maps from their text files: "
               "nothing to rebuild\n")
    assert (p.returncode, p.stderr) == (0, warning)
    assert maildrop_files(confdir) == [qfile]  # none of the modes queued anything


def test_default_sender_is_login_name(confdir: Path) -> None:
    assert sendmail(confdir, ["r@example.net"], b"x")[0] == 0
    _, msg = only_message(confdir)
    assert msg.sender == pwd.getpwuid(os.getuid()).pw_name
    assert msg.content == b"x\n"


def test_null_sender_and_long_lines(confdir: Path) -> None:
    # 512: Postfix's minimum; the 1100-byte line becomes 512 + 512 (L records) + 76
    (confdir / "main.cf").write_text(
        f"queue_directory = {confdir}/q\nline_length_limit = 512\n")
    assert sendmail(confdir, ["-f", "<>", "r@example.net"], b"a" * 1100 + b"\n")[0] == 0
    path, msg = only_message(confdir)
    assert msg.sender == "" and msg.content == b"a" * 1100 + b"\n"
    with open(path, "rb") as f:
        assert [r.rtype for r in RecordReader(f)].count(b"L") == 2


@pytest.mark.parametrize("args,code,text", [
    ([], 64, "no recipients specified"),
    (["-x", "r@x"], 64, "unsupported option: -x"),
    (["-f"], 64, "option requires an argument -- 'f'"),
    (["-N", "sometimes", "r@x"], 64, "bad DSN notify keyword"),
    (["-N", "never,success", "r@x"], 64, "cannot be combined"),
    (["-R", "body", "r@x"], 64, "bad DSN ret keyword"),
    (["r@x\nBcc: evil@x"], 64, "line break"),
    (["-bs"], 64, "-bs (SMTP on standard input) is not implemented: use smtpd"),
    (["-bv", "r@x"], 64, "-bv (address verification) is not implemented"),
    (["-bd"], 64, "-bd (daemon mode) is not implemented: run qmgr-master start"),
])
def test_usage_errors(confdir: Path, args: list[str], code: int, text: str) -> None:
    got, err = sendmail(confdir, args, b"x\n")
    assert got == code
    assert err.startswith("qmgr-sendmail: fatal: ") and text in err and err.count("\n") == 1
    assert maildrop_files(confdir) == []


def test_config_and_queue_errors(tmp_path: Path, confdir: Path) -> None:
    err = io.StringIO()
    assert run(["-c", str(tmp_path / "nowhere"), "r@x"], io.BytesIO(b"x"), err) == 78
    assert err.getvalue().startswith("qmgr-sendmail: fatal: open ")
    (confdir / "main.cf").write_text(f"queue_directory = {confdir}/q\nline_length_limit = x\n")
    assert sendmail(confdir, ["r@x"], b"x")[0] == 78
    (confdir / "main.cf").write_text(f"queue_directory = {confdir}/nonexistent\n")
    code, err2 = sendmail(confdir, ["r@x"], b"x")  # Postfix: EX_UNAVAILABLE, chdir
    assert code == 69 and f"queue directory {confdir}/nonexistent: No such file" in err2
    (confdir / "main.cf").write_text(f"queue_directory = {confdir}/q\n")
    (confdir / "q" / "maildrop").rmdir()
    code, err2 = sendmail(confdir, ["r@x"], b"x")
    assert code == 73 and "maildrop" in err2


def test_size_limit_removes_file(confdir: Path) -> None:
    (confdir / "main.cf").write_text(
        f"queue_directory = {confdir}/q\nmessage_size_limit = 50\n")
    code, err = sendmail(confdir, ["r@x"], b"x" * 60 + b"\n")
    assert code == 65 and "message file too big" in err
    assert maildrop_files(confdir) == []


def test_triggers_pickup_fifo(confdir: Path) -> None:
    fifo = confdir / "q" / "public" / "pickup"
    os.mkfifo(fifo, 0o622)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert sendmail(confdir, ["r@x"], b"x\n") == (0, "")
        assert os.read(fd, 10) == b"W"
    finally:
        os.close(fd)


def test_console_script_process_imports_little(confdir: Path) -> None:
    code = ("import sys, io; from qmgrd.sendmail import run; "
            "rc = run(sys.argv[1:], sys.stdin.buffer, sys.stderr); "
            "heavy = [m for m in ('email', 'click', 'dns', 'asyncio') if m in sys.modules]; "
            "print(rc, heavy)")
    p = subprocess.run([sys.executable, "-c", code, "-c", str(confdir), "r@example.net"],
                       input=b"Subject: s\n\nbody\n", capture_output=True, cwd=REPO,
                       timeout=30, check=False)
    assert p.stdout.decode().strip() == "0 []", p.stderr
    p = subprocess.run([sys.executable, "-m", "qmgrd.sendmail", "-c", str(confdir)],
                       input=b"", capture_output=True, cwd=REPO, timeout=30, check=False)
    assert p.returncode == 64
    assert p.stderr == b"qmgr-sendmail: fatal: no recipients specified\n"


# ------------------------------------------------------------------ -t without recipients

@pytest.mark.parametrize("headers", [
    b"Subject: x\n",
    b"To:\nSubject: x\n",
    b"To: <>\nSubject: x\n",
    b"To: undisclosed-recipients:;\nSubject: x\n",
    b"To: a@example.net\nResent-To: <>\nSubject: x\n",  # Resent-* wins, as in cleanup
    b"Subject: x\nX-Note: names To: a@example.net\n",
    b"Subject: x\n not a continuation of a recipient header: To: a@example.net\n",
])
def test_extract_without_any_recipient_fails(confdir: Path, headers: bytes) -> None:
    code, err = sendmail(confdir, ["-t"], headers + b"\nTo: body@example.net\n")
    assert code == 64
    assert err == "qmgr-sendmail: fatal: No recipient addresses found in message header\n"
    assert maildrop_files(confdir) == []


@pytest.mark.parametrize("headers", [
    b"To: a@example.net\n",
    b"Subject: x\nCC: Name <c@example.net>\n",
    b"To: undisclosed-recipients:;\nBcc: b@example.net\n",
    b"To: Someone\n <folded@example.net>\n",
    b"To: <>\nResent-Cc: r@example.net\n",
])
def test_extract_with_a_header_recipient_is_queued(confdir: Path, headers: bytes) -> None:
    code, _ = sendmail(confdir, ["-t"], headers + b"\nbody\n")
    assert code == 0
    _, msg = only_message(confdir)
    assert msg.extract_recipients and msg.recipients == []


def test_extract_with_command_line_recipient_skips_the_check(confdir: Path) -> None:
    assert sendmail(confdir, ["-t", "r@example.net"], b"Subject: x\n\nb\n")[0] == 0
    _, msg = only_message(confdir)
    assert [r.address for r in msg.recipients] == ["r@example.net"]


# ------------------------------------------------------------------ addresses

@pytest.mark.parametrize("arg,stored", [
    ('"a b"@example.com', ["a b@example.com"]),
    ('"user"@localhost', ["user@localhost"]),
    ("<x@example.com>", ["x@example.com"]),
    ("x@localhost,y@localhost", ["x@localhost", "y@localhost"]),
    ("Name <n@example.com>, o@example.com", ["n@example.com", "o@example.com"]),
    ('"a\\"b"@example.com', ['a"b@example.com']),
    ("p@example.com (comment)", ["p@example.com"]),
    ("plain@example.com", ["plain@example.com"]),
    ("localuser", ["localuser"]),
])
def test_recipient_arguments_stored_in_internal_form(confdir: Path, arg: str,
                                                     stored: list[str]) -> None:
    assert sendmail(confdir, ["-f", "s@example.org", arg], b"x\n")[0] == 0
    _, msg = only_message(confdir)
    assert [r.address for r in msg.recipients] == stored


@pytest.mark.parametrize("arg,stored", [
    ("<x@y.example>", "x@y.example"),
    ("<>", ""),
    (" < > ", ""),
    ("", ""),
    ("a b@y.example", "a b@y.example"),
    ('"a b"@y.example', "a b@y.example"),
    ("Sender Name <s@y.example>", "s@y.example"),
])
def test_sender_argument_stored_in_internal_form(confdir: Path, arg: str, stored: str) -> None:
    assert sendmail(confdir, ["-f", arg, "r@example.net"], b"x\n")[0] == 0
    _, msg = only_message(confdir)
    assert msg.sender == stored


@pytest.mark.parametrize("args,text", [
    (["<>"], "malformed recipient address: <>"),
    (["x@"], "malformed recipient address: x@"),
    (["@example.com"], "malformed recipient address: @example.com"),
    (["a@b c@d"], "malformed recipient address: a@b c@d"),
    (["a b c"], "malformed recipient address: a b c"),  # not just "a": nothing dropped
    (["<<x>>"], "malformed recipient address: <<x>>"),
    (["ok@example.net", "a@example.net, <>"], "malformed recipient address: a@example.net, <>"),
    (["undisclosed-recipients:;"], "malformed recipient address"),
    (["-f", "<<x>>", "r@x"], "-f option specified malformed sender: <<x>>"),
    (["-f", "a@x, b@x", "r@x"], "-f option specified malformed sender: a@x, b@x"),
    (["-f", "x@", "r@x"], "-f option specified malformed sender: x@"),
])
def test_malformed_addresses_rejected(confdir: Path, args: list[str], text: str) -> None:
    code, err = sendmail(confdir, args, b"x\n")
    assert code == 64
    assert err.startswith(f"qmgr-sendmail: fatal: {text}") and err.count("\n") == 1
    assert maildrop_files(confdir) == []


# ------------------------------------------------------------------ -V envid

@pytest.mark.parametrize("envid", ["env id with space", "x" * 101, "", "caf\u00e9", "a\tb"])
def test_bad_envelope_id_rejected(confdir: Path, envid: str) -> None:
    code, err = sendmail(confdir, ["-V", envid, "r@example.net"], b"x\n")
    assert code == 64
    assert err == ("qmgr-sendmail: fatal: -V option requires an envelope ID of 1 to 100 "
                   "printable ASCII characters without spaces\n")
    assert maildrop_files(confdir) == []


def test_envelope_id_limits_accepted(confdir: Path) -> None:
    envid = "!" + "x" * 98 + "~"
    assert sendmail(confdir, ["-V", envid, "r@example.net"], b"x\n")[0] == 0
    assert only_message(confdir)[1].envid == envid


def test_dsn_keyword_errors_have_no_python_reprs(confdir: Path) -> None:
    _, err = sendmail(confdir, ["-N", "sometimes", "r@x"], b"x\n")
    assert err == "qmgr-sendmail: fatal: bad DSN notify keyword: sometimes\n"
    _, err = sendmail(confdir, ["-R", "body", "r@x"], b"x\n")
    assert err == "qmgr-sendmail: fatal: bad DSN ret keyword: body\n"


@pytest.mark.parametrize("closed", [0, 2])
def test_closed_stdin_or_stderr_is_dev_null(confdir: Path, closed: int) -> None:
    """Postfix's sendmail opens /dev/null on a closed fd 0, 1 or 2 before anything else
    (no file it opens later gets one of them): a closed stdin submits an empty message,
    a closed stderr loses the warnings; no traceback."""
    def close_fd() -> None:
        os.close(closed)

    p = subprocess.run([sys.executable, "-m", "qmgrd.sendmail", "-c", str(confdir),
                        "r@example.net"], stdin=subprocess.DEVNULL if closed else None,
                       capture_output=closed == 0, preexec_fn=close_fd, cwd=REPO,
                       timeout=30, check=False)
    assert p.returncode == 0, p.stderr
    _, msg = only_message(confdir)
    assert msg.content == b""
    assert [r.address for r in msg.recipients] == ["r@example.net"]


def test_postfix_flags_q_interval_qi_r_b_c(confdir: Path) -> None:
    """Postfix's sendmail: -q<interval> exits 0 doing nothing (nothing is queued, even
    with recipients); -qI<id> is postqueue -i; -r is the obsolete -f; -B takes 8BITMIME
    or 7BIT; -C names main.cf or its directory."""
    assert sendmail(confdir, ["-q30m", "r@example.net"], b"Subject: s\n\nx\n") == (0, "")
    assert sendmail(confdir, ["-q1h"], b"") == (0, "")
    assert not maildrop_files(confdir)
    assert sendmail(confdir, ["-qIABC", "r@example.net"], b"") == (
        64, "qmgr-sendmail: fatal: flush queue_id requires no recipient\n")
    assert sendmail(confdir, ["-qRsite", "r@example.net"], b"") == (
        64, "qmgr-sendmail: fatal: flush site requires no recipient\n")
    assert sendmail(confdir, ["-B", "BINARYMIME", "r@example.net"], b"") == (
        64, "qmgr-sendmail: fatal: -B option needs 8BITMIME or 7BIT\n")
    err = io.StringIO()
    code = run(["-C", str(confdir / "main.cf"), "-r", "old@example.org", "-B8BITMIME",
                "r@example.net"], io.BytesIO(b"Subject: s\n\nx\n"), err)
    assert code == 0, err.getvalue()
    msg = only_message(confdir)[1]
    assert (msg.sender, [r.address for r in msg.recipients]) == (
        "old@example.org", ["r@example.net"])
