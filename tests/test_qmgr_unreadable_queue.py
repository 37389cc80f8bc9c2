"""A qmgr that cannot read a queue directory: one fatal line, and the master throttles it.

Postfix's qmgr opens ``active/`` (to move leftovers back to incoming) and its scans in
qmgr_post_init, before it reads a trigger; an unreadable directory is
``fatal: scan_dir_push: open directory active: Permission denied`` and the child dies
before its first request, so the master logs ``bad command startup -- throttling`` and
starts no new qmgr for service_throttle_time.  Ours logged a 15-line traceback naming
the chroot-relative ``/active`` and, having counted the wakeup trigger it read first as
a use, was restarted about once a second.

Mode 000 on ``active/`` denies the qmgr whether it runs as mail_owner (as root) or as
the invoking user.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.harness import LogCursor, MakeSystem, wait_for

pytestmark = pytest.mark.timeout(90)

FATAL = "fatal: scan_dir_push: open directory active: Permission denied"


def test_unreadable_active_is_one_fatal_line_and_throttles_the_qmgr(
        mailsys: MakeSystem) -> None:
    ms = mailsys(main={"service_throttle_time": "3600s"})
    ms.start()
    [first] = ms.children("qmgr")
    cursor = LogCursor(ms)
    active = ms.spool / "active"
    mode = active.stat().st_mode & 0o7777
    os.chmod(active, 0)
    try:
        first.terminate()  # exits 0; the master starts the next one at once
        wait_for(lambda: any("qmgr: bad command startup -- throttling" in line
                             for line in cursor.lines()), 30, "the qmgr throttled")
        qmgr = [text for _, text in cursor.by("qmgr")]
        assert qmgr.count(FATAL) == 1, qmgr
        assert not any("Traceback" in text for text in qmgr), qmgr
        assert not ms.children("qmgr")
        status = json.loads(ms.master("status", "--json").stdout)
        [svc] = [s for s in status["services"] if s["name"] == "qmgr"]
        assert svc["throttled_until"] is not None
    finally:
        os.chmod(active, mode)
