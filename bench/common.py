"""bench/common.py - what the queue benchmarks share: a fast queue-file writer, a qmgrd
instance and a private Postfix instance, each in a temporary directory.

Public API
    SCALE                         float from $BENCH_SCALE (default 1.0); scaled(n) -> int
    wait_for(cond, timeout, what, interval=0.02) -> object    poll with a deadline
    QueueWriter(queue_directory, owner)
        .write(queue, count, rcpt, mtime=None) -> list[str]   ready queue files, fast
        .fix_owner(queue)                                      hash dirs to the owner
    count_files(dirpath) -> int    regular files under a queue directory (recursive)
    BlackHole()                    a loopback TCP port that accepts and never answers
    Instance                       the interface both systems offer:
        .name, .owner, .queue_directory, .writer (QueueWriter), .prepare() (make the
        queue directories), .start(), .stop() (idempotent), .qmgr_pid() -> int,
        .trigger(data: bytes) (to public/qmgr), .write_main(**params), .log() -> str
    QmgrdInstance(root, smtpd_port=None, **main)   tests.harness.MailSystem (qmgr-master,
                                   mail_owner qmgrd); with ``smtpd_port`` the smtpd
                                   service on 127.0.0.1:<port> (tests/tools/smtpd_system.py)
    PostfixInstance(root, smtpd_port=None, **main)  /usr/sbin/postfix -c <root>/etc
                                   (mail_owner postfix); with ``smtpd_port`` its smtpd on
                                   127.0.0.1:<port> (and anvil)
        .master_pid() -> int | None (both), .sendmail_argv() -> list[str] (both),
        .sendmail_env() -> dict[str, str] (both),
        .flush() -> None (both: qmgr-ctl flush / postfix flush)
    transport_table(path, domains, port) -> str   a texthash table routing every domain to
                                   smtp:[127.0.0.1]:<port>; returns "texthash:<path>"
    tree(pid) -> list[psutil.Process]   pid and its live descendants
    tree_cpu(pid) -> float         CPU s of pid's tree, reaped children included
    tree_pss(pid, by_name=None) -> int   summed PSS (bytes) of pid's live tree (by_name:
                                   {title: [count, bytes]} filled in)
    title(process) -> str          "qmgrd: <service>" or Postfix's program name
    CpuByProcess(pid, from_zero=False)   per-title CPU of pid's tree from samples:
        .sample(), .by_title(total_cpu_s, messages) -> {title: CPU ms per message}
    postfix_available() -> bool    Postfix installed and we are root

Raises RuntimeError when a system does not start or a wait times out.

Queue files are written with the project's spool API (qmgrd.spool.queue.Spool paths
with hashed directories, qmgrd.spool.queueid long queue ids, records encoded by
qmgrd.spool.records) in Postfix's format, which both systems read. Setup writes do no
fsync (both systems are stopped while the queue is filled). Files belong to the
instance's mail_owner, mode 0700 (ready).
"""

from __future__ import annotations

import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # type: ignore[import-untyped]

from qmgrd.spool import records as R
from qmgrd.spool.queue import Spool
from qmgrd.spool.queueid import new_long_id
from qmgrd.trigger import send_trigger
from tests.harness import PY, MailSystem
from tests.harness import wait_for as harness_wait_for
from tests.tools.smtpd_system import master_cf_with_smtpd


def _scale() -> float:
    """$BENCH_SCALE as a float (default 1); NaN when it is no number, which bench/run.py
    refuses with a clear message (and scaled() with ValueError)."""
    try:
        return float(os.environ.get("BENCH_SCALE", "1") or "1")
    except ValueError:
        return math.nan


SCALE = _scale()
SENDER = b"bench@sender.example"
BODY = [b"This is line %d of a benchmark message, about sixty bytes long.." % i
        for i in range(16)]


def scaled(n: int) -> int:
    """``n`` times $BENCH_SCALE, at least 1 (ValueError when $BENCH_SCALE is not a
    number above 0)."""
    if not (math.isfinite(SCALE) and SCALE > 0):
        raise ValueError(f"BENCH_SCALE must be a number above 0, not {SCALE}")
    return max(1, round(n * SCALE))


def wait_for(cond: Callable[[], object], timeout: float, what: str,
             interval: float = 0.02) -> object:
    """tests.harness.wait_for with RuntimeError after ``timeout`` seconds (an invalid
    benchmark round, not a failed test)."""
    return harness_wait_for(cond, timeout, what, interval, error=RuntimeError)


def count_files(path: Path) -> int:
    """Regular files under ``path``, recursing into (hash) subdirectories."""
    n = 0
    try:
        it = os.scandir(path)
    except FileNotFoundError:
        return 0
    with it:
        for e in it:
            try:
                if e.is_dir(follow_symlinks=False):
                    n += count_files(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    n += 1
            except FileNotFoundError:
                continue
    return n


class QueueWriter:
    """Writes ready one-recipient queue files straight into a queue directory."""

    def __init__(self, queue_directory: Path, owner: str) -> None:
        self.spool = Spool(str(queue_directory))
        pw = pwd.getpwnam(owner) if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self._serial = 0

    @staticmethod
    def message(qid: str, rcpt: bytes, sec: int, usec: int) -> bytes:
        """The queue file of one message (cleanup's record layout, remote context)."""
        enc = R.encode
        out = bytearray(R.SIZE_RECORD_LEN)
        out += enc(R.REC_TIME, b"%d %d" % (sec, usec))
        out += enc(R.REC_ATTR, b"create_time=%d" % sec)
        out += enc(R.REC_ATTR, b"rewrite_context=remote")
        out += enc(R.REC_FROM, SENDER)
        out += enc(R.REC_ORCP, rcpt)
        out += enc(R.REC_RCPT, rcpt)
        out += enc(R.REC_MESG, b"")
        data_offset = len(out)
        head = [b"From: " + SENDER, b"To: " + rcpt, b"Subject: benchmark " + qid.encode(),
                b"Message-ID: <" + qid.encode() + b"@bench.example>",
                b"Date: Mon, 1 Jan 2024 00:00:00 +0000", b""]
        for line in head + BODY:
            out += enc(R.REC_NORM, line)
        data_size = len(out) - data_offset
        out += enc(R.REC_XTRA, b"")
        out += enc(R.REC_END, b"")
        out[0:R.SIZE_RECORD_LEN] = enc(R.REC_SIZE, R.size_payload(
            data_size, data_offset, 1, 0, data_size, 0))
        return bytes(out)

    def write(self, queue: str, count: int, rcpt: Callable[[int], bytes],
              mtime: float | None = None) -> list[str]:
        """Write ``count`` ready files into ``queue``; ``rcpt(i)`` names the recipient of
        the i-th; ``mtime`` sets their time stamps (deferred/: when they are due).
        Returns their queue ids.

        Ids are long Postfix ids (qmgrd.spool.queueid.new_long_id) from the current
        time, one microsecond apart, with a counter in the inode field (neither qmgr
        checks it), so each file costs one exclusive create instead of
        Spool.create()'s create, link and unlink. A name that exists is skipped."""
        ids: list[str] = []
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        made_dirs: set[str] = set()
        i = 0
        while len(ids) < count:
            now = time.time_ns() // 1000
            sec, usec = divmod(now, 1_000_000)
            self._serial += 1
            qid = new_long_id(sec, usec, self._serial)
            path = self.spool.path(queue, qid)
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                continue
            except FileNotFoundError:
                d = os.path.dirname(path)
                os.makedirs(d, mode=0o700, exist_ok=True)
                made_dirs.add(d)
                continue
            try:
                os.write(fd, self.message(qid, rcpt(i), sec, usec))
                os.fchown(fd, self.uid, self.gid)
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
            if mtime is not None:
                os.utime(path, (mtime, mtime))
            ids.append(qid)
            i += 1
        if made_dirs:
            self.fix_owner(queue)
        return ids

    def fix_owner(self, queue: str) -> None:
        """Give the hash directories made on demand to the owner (we write as root)."""
        base = Path(self.spool.queue_path(queue))
        for dirpath, dirnames, _ in os.walk(base):
            for d in dirnames:
                os.chown(os.path.join(dirpath, d), self.uid, self.gid)


class BlackHole:
    """A TCP port on 127.0.0.1 whose kernel accepts connections that nobody ever
    answers (listen() with a large backlog, no accept()): an SMTP client waits for a
    greeting until its own timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- qmgrd
class QmgrdInstance:
    """A whole qmgrd mail system (tests.harness.MailSystem) under ``root``."""

    name = "qmgrd"
    owner = "qmgrd"

    def __init__(self, root: Path, smtpd_port: int | None = None, **main: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        main.setdefault("daemon_timeout", "18000s")
        main.setdefault("qmgr_ipc_timeout", "60s")
        cf = master_cf_with_smtpd(smtpd_port) if smtpd_port else None
        self.ms = MailSystem(root, main=main, master_cf=cf)
        self.etc = self.ms.etc
        self.queue_directory = self.ms.spool
        self.writer = QueueWriter(self.queue_directory, self.owner)
        self._made = False

    def write_main(self, **params: str) -> None:
        self.ms.write_main(**params)

    def prepare(self) -> None:
        """Make the queue directories (a first start and stop)."""
        if not self._made:
            self.start()
            self.stop()
            self._made = True

    def start(self) -> None:
        """As MailSystem.start() (the master in the foreground, in a session of its own),
        but waiting for the qmgr by looking at the master's children only, instead of
        running ``master.cli status`` (a Python process per poll) while the system starts
        - which would take CPU from the system being timed."""
        ms = self.ms
        with open(ms.root / "master.stderr", "wb") as err:
            ms.proc = subprocess.Popen(
                [PY, "-m", "master.cli", "-c", str(ms.etc), "start", "--foreground"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True, env=ms.env)
        wait_for(lambda: ms.proc_dead() or self._qmgr() is not None, 30, "the qmgrd qmgr",
                 interval=0.05)
        if ms.proc_dead():
            raise RuntimeError("qmgrd master: "
                               + (ms.root / "master.stderr").read_text()[-2000:])

    def _qmgr(self) -> psutil.Process | None:
        for p in tree(self.ms.master_pid)[1:]:
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if " ".join(cmd).split()[:2] == ["qmgrd:", "qmgr"] or (
                    "-n" in cmd and cmd[cmd.index("-n") + 1:cmd.index("-n") + 2] == ["qmgr"]):
                return p
        return None

    def stop(self) -> None:
        self.ms.stop(check=False)

    def master_pid(self) -> int | None:
        return None if self.ms.proc_dead() else self.ms.master_pid

    def qmgr_pid(self) -> int:
        p = None if self.ms.proc_dead() else self._qmgr()
        if p is None:
            raise RuntimeError("qmgrd: no qmgr process")
        return int(p.pid)

    def sendmail_argv(self) -> list[str]:
        """The installed console script (as a user runs it), with this config."""
        return [str(Path(PY).parent / "qmgr-sendmail"), "-c", str(self.ms.etc)]

    def sendmail_env(self) -> dict[str, str]:
        """The harness's environment: PYTHONPATH = this checkout, first."""
        return self.ms.env

    def flush(self) -> None:
        """``qmgr-ctl -c <etc> flush``: the installed command, as an operator runs it
        (and as ``postfix flush`` is run for Postfix)."""
        r = subprocess.run([str(Path(PY).parent / "qmgr-ctl"), "-c", str(self.ms.etc),
                            "flush"], check=False, capture_output=True, text=True,
                           timeout=30, env=self.ms.env, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"qmgr-ctl flush: {r.returncode} {r.stderr[-500:]}")

    def trigger(self, data: bytes) -> None:
        send_trigger(str(self.queue_directory / "public" / "qmgr"), data)

    def log(self) -> str:
        return self.ms.log()


# --------------------------------------------------------------------------- Postfix
POSTFIX = "/usr/sbin/postfix"
SENDMAIL = "/usr/sbin/sendmail"

POSTFIX_MAIN = {
    "compatibility_level": "3.6",
    "mail_owner": "postfix",
    "setgid_group": "postdrop",
    "myhostname": "pf.bench.example",
    "mydestination": "localhost",
    "relay_domains": "",
    "inet_interfaces": "loopback-only",
    "inet_protocols": "ipv4",
    "enable_long_queue_ids": "yes",
    "alias_maps": "",
    "alias_database": "",
    "local_recipient_maps": "",
    "biff": "no",
    "smtputf8_enable": "no",
    "smtp_dns_support_level": "disabled",
}

# chroot off (as qmgrd's agents); the qmgr on a FIFO (as in qmgrd's bundled master.cf)
# so that a one-byte write triggers. With a smtpd_port, an smtpd line is added.
POSTFIX_MASTER = """\
pickup    fifo  n       -       n       60      1       pickup
qmgr      fifo  n       -       n       300     1       qmgr
cleanup   unix  n       -       n       -       0       cleanup
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
flush     unix  n       -       n       1000?   0       flush
smtp      unix  -       -       n       -       -       smtp
discard   unix  -       -       n       -       -       discard
scache    unix  -       -       n       -       1       scache
showq     unix  n       -       n       -       -       showq
postlog   unix-dgram n  -       n       -       1       postlogd
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
anvil     unix  -       -       n       -       1       anvil
"""


def postfix_available() -> bool:
    return os.access(POSTFIX, os.X_OK) and os.geteuid() == 0


class PostfixInstance:
    """A private Postfix instance: config, queue and data directories under ``root``.

    Needs root (postfix start). Logs to ``<root>/maillog`` through postlogd, as qmgrd
    logs to a file.
    """

    name = "postfix"
    owner = "postfix"

    def __init__(self, root: Path, smtpd_port: int | None = None, **main: str) -> None:
        self.root = root
        self.etc = root / "etc"
        self.queue_directory = root / "spool"
        self.data_directory = root / "lib"
        self.maillog = root / "maillog"
        for d in (root, self.etc, self.queue_directory):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        self.data_directory.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(self.data_directory, "postfix")
        self.params = dict(POSTFIX_MAIN)
        self.params.update(queue_directory=str(self.queue_directory),
                           data_directory=str(self.data_directory),
                           maillog_file=str(self.maillog),
                           maillog_file_prefixes=str(root))
        self.params.update(main)
        self.write_main()
        cf = POSTFIX_MASTER
        if smtpd_port:
            cf += f"127.0.0.1:{smtpd_port} inet n - n - - smtpd\n"
        (self.etc / "master.cf").write_text(cf)
        self.writer = QueueWriter(self.queue_directory, self.owner)
        self._made = False

    def write_main(self, **params: str) -> None:
        self.params.update(params)
        (self.etc / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.params.items()))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], capture_output=True,
                              text=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL)

    def prepare(self) -> None:
        """``postfix check`` makes the queue directories with their owners and modes."""
        if not self._made:
            r = self._postfix("check")
            if r.returncode != 0:
                raise RuntimeError(f"postfix check: {r.stderr or self.log()[-2000:]}")
            self._made = True

    def master_pid(self) -> int | None:
        try:
            text = (self.queue_directory / "pid" / "master.pid").read_text().strip()
            pid = int(text)
        except (OSError, ValueError):
            return None
        return pid if psutil.pid_exists(pid) else None

    def start(self) -> None:
        self.prepare()
        r = self._postfix("start")
        if r.returncode != 0:
            raise RuntimeError(f"postfix start: {r.stderr or self.log()[-2000:]}")
        wait_for(lambda: self._child("qmgr"), 20, "the Postfix qmgr")

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        self._postfix("stop")
        try:
            wait_for(lambda: not psutil.pid_exists(pid), 30, "the Postfix master to exit")
        except RuntimeError:
            os.kill(pid, signal.SIGKILL)

    def _child(self, name: str) -> psutil.Process | None:
        pid = self.master_pid()
        if pid is None:
            return None
        try:
            for p in psutil.Process(pid).children():
                try:
                    if p.name() == name:
                        return p
                except psutil.Error:
                    continue
        except psutil.Error:
            return None
        return None

    def qmgr_pid(self) -> int:
        p = self._child("qmgr")
        if p is None:
            raise RuntimeError("postfix: no qmgr process")
        return int(p.pid)

    def trigger(self, data: bytes) -> None:
        send_trigger(str(self.queue_directory / "public" / "qmgr"), data)

    def sendmail_argv(self) -> list[str]:
        return [SENDMAIL, "-C", str(self.etc)]

    def sendmail_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MAIL_CONFIG", None)
        return env

    def flush(self) -> None:
        r = self._postfix("flush")
        if r.returncode != 0:
            raise RuntimeError(f"postfix flush: {r.returncode} {r.stderr[-500:]}")

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""


Instance = QmgrdInstance | PostfixInstance


def transport_table(path: Path, domains: list[str], port: int) -> str:
    """Write a texthash table routing each of ``domains`` to smtp:[127.0.0.1]:<port>;
    returns the transport_maps value (both systems read texthash)."""
    path.write_text("".join(f"{d} smtp:[127.0.0.1]:{port}\n" for d in domains))
    os.chmod(path, 0o644)
    return f"texthash:{path}"


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its live descendants (empty when ``pid`` is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid``'s process tree: for each live
    process its own time plus the time of the children it has reaped (children_user +
    children_system; a reaped child's figure includes its own reaped children). A process
    that exits between two readings moves from "live" to its parent's children_* figure,
    so a difference of two readings counts every process of the tree exactly once."""
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def title(p: psutil.Process) -> str:
    """A process's title for the per-process figures: ``qmgrd: <service>`` for qmgrd's
    processes, the program name for Postfix's ("?" when it is gone)."""
    try:
        cmd = p.cmdline()
        return cmd[0].strip() if cmd and cmd[0].startswith("qmgrd:") else str(p.name())
    except psutil.Error:
        return "?"


class CpuByProcess:
    """CPU seconds (user + system) of ``pid``'s process tree per process title, from
    readings of each live process's own times (sample()): a process's share is its last
    reading minus its first (0 for one that appeared after the first sample, or for
    every process with ``from_zero``: a system started at the scenario's start). What a
    process used after its last reading before it exited is not attributed; by_title()
    puts the difference to the scenario's total CPU under "(not sampled)"."""

    def __init__(self, pid: int, from_zero: bool = False) -> None:
        self.pid = pid
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.titles: dict[int, str] = {}
        if not from_zero:
            self.sample()
            self.first = dict(self.last)

    def sample(self) -> None:
        """Read every live process of the tree."""
        for p in tree(self.pid):
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            self.last[p.pid] = t.user + t.system
            # read again until it differs from the root's: a child forked by qmgrd's
            # master carries the master's title until it sets its own
            if (p.pid not in self.titles or self.titles[p.pid].startswith(("python", "?"))
                    or (p.pid != self.pid and self.titles[p.pid] == self.titles.get(self.pid))):
                self.titles[p.pid] = title(p)

    def by_title(self, total: float, messages: int) -> dict[str, float]:
        """CPU ms per message by title, largest first, plus "(not sampled)" (the rest of
        ``total`` CPU seconds)."""
        per: dict[str, float] = {}
        for pid, cpu in self.last.items():
            name = self.titles.get(pid, "?")
            per[name] = per.get(name, 0.0) + cpu - self.first.get(pid, 0.0)
        rest = max(0.0, total - sum(per.values()))
        out = {k: round(v / messages * 1000, 3) for k, v in
               sorted(per.items(), key=lambda kv: -kv[1]) if v > 0}
        out["(not sampled)"] = round(rest / messages * 1000, 3)
        return out


def tree_pss(pid: int, by_name: dict[str, list[int]] | None = None) -> int:
    """Summed proportional set size (bytes) of ``pid``'s live process tree: the ``Pss:``
    line of each process's /proc/<pid>/smaps_rollup (what psutil's
    memory_full_info().pss reads, without its other work). With ``by_name``, also
    fills it with [process count, PSS bytes] per process title (qmgrd: ``qmgrd: smtp``;
    Postfix: the program name)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p.pid}/smaps_rollup", "rb") as f:
                data = f.read()
        except OSError:
            continue
        at = data.find(b"\nPss:")
        if at < 0:
            continue
        pss = int(data[at + 5:data.index(b"kB", at)]) * 1024
        total += pss
        if by_name is not None:
            entry = by_name.setdefault(title(p), [0, 0])
            entry[0] += 1
            entry[1] += pss
    return total
