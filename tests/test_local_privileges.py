"""The local agent's privileges under a root master (Postfix local(8): set_eugid to
mail_owner after its init, root again only to deliver)."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import MailSystem, wait_for

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="privileges exist only as root")]


def _ids(pid: int) -> tuple[list[str], list[str]]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(ln for ln in status if ln.startswith("Uid:")).split()[1:]
    gids = next(ln for ln in status if ln.startswith("Gid:")).split()[1:]
    return uids, gids


def test_local_agent_is_mail_owner_between_deliveries(
        mailsys: Callable[..., MailSystem]) -> None:
    """Between deliveries the local agent has mail_owner's effective ids (real and saved
    uid 0, so that it can become root again); each delivery still writes the mailbox as
    its user (default_privs for a name without an account), delivery after delivery."""
    ms = mailsys()
    ms.start()
    owner = pwd.getpwnam("qmgrd")
    nobody = pwd.getpwnam("nobody")
    try:
        for i in range(3):
            r = ms.sendmail("-f", "alice@localhost", "user@localhost",
                            data=f"Subject: {i}\n\nbody {i}\n".encode())
            assert r.returncode == 0, r.stderr
            wait_for(lambda n=i + 1: len(ms.maildir("user")) == n, 30, f"delivery {i + 1}")
        wait_for(ms.queue_empty, 30, "the queue to empty")
        files = ms.maildir("user")
        assert {f.stat().st_uid for f in files} == {nobody.pw_uid}
        agents = ms.children("local")
        assert agents, "the local agent has exited (max_idle)"
        for agent in agents:
            uids, gids = _ids(agent.pid)
            assert uids == ["0", str(owner.pw_uid), "0", str(owner.pw_uid)], uids
            assert gids[1] == str(owner.pw_gid), gids
        assert "status=sent (delivered to maildir)" in ms.log()
    finally:
        ms.stop()


def test_a_local_service_must_keep_root(tmp_path: Path) -> None:
    """master.cf's ``local unix - - n - - local`` (unpriv ``-``, i.e. y) under a root
    master: the agent could only deliver as mail_owner.  Postfix's local(8) is a
    privileged service ("service local requires privileged operation", fatal); start,
    reload and check refuse it with pipe's words, naming the line (accepted before: the
    agent died at every start with a traceback, PermissionError in setgroups, and the
    service was throttled)."""
    from master.config import ConfigError, load_configuration

    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\nmail_owner = qmgrd\n")
    (tmp_path / "master.cf").write_text("qmgr fifo n - n 300 1 qmgr\n"
                                        "local unix - - n - - local\n")
    with pytest.raises(ConfigError) as ei:
        load_configuration(str(tmp_path))
    assert str(ei.value) == (f"{tmp_path}/master.cf, line 2: service local requires "
                             "privileged operation (set its unpriv column to n)")


def test_local_agent_refuses_unpriv_itself(tmp_path: Path) -> None:
    """Started unprivileged anyway (master.cf edited behind a running master's back):
    the pre-jail init refuses with Postfix's words, a clean fatal (no traceback)."""
    from master.config import Config, ConfigError
    from master.server.skeleton import ServerContext
    from transports.local import LocalAgent

    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}\n")
    cfg = Config.load(str(tmp_path), {})
    ctx = ServerContext(service="local", config=cfg, queue_directory=str(tmp_path),
                        listen_fds=[], generation=0, args=[], unpriv=True)
    with pytest.raises(ConfigError, match="^service local requires privileged operation$"):
        LocalAgent().pre_jail(ctx)
