"""The bundled etc/main.cf and etc/master.cf load cleanly and say what `make run` needs."""

from __future__ import annotations

import os
from pathlib import Path

from master.config import Config, load_master_cf
from qmgrd.maps import open_alias_table

REPO = Path(__file__).resolve().parent.parent
ETC = REPO / "etc"


def test_bundled_main_cf() -> None:
    cfg = Config.load(str(ETC))
    cfg.check()
    assert cfg.config_directory == str(ETC)
    assert os.path.normpath(cfg.get("queue_directory")) == str(REPO / "var" / "spool")
    assert os.path.normpath(cfg.get("data_directory")) == str(REPO / "var" / "lib")
    assert os.path.normpath(cfg.get("maillog_file")) == str(REPO / "var/log/maillog")
    assert cfg.get("mail_spool_directory").endswith("/var/mail/")
    assert cfg.get("local_recipient_maps") == "" and cfg.is_set("local_recipient_maps")
    assert cfg.get("relayhost") == ""
    (aliases,) = cfg.get_list("alias_maps")
    assert aliases == f"hash:{ETC}/aliases"
    assert open_alias_table(aliases).lookup("postmaster") == "root"
    host = cfg.get("myhostname")
    assert cfg.get_list("mydestination")[0] == host


def test_bundled_master_cf() -> None:
    cfg = Config.load(str(ETC))
    services = load_master_cf(str(ETC / "master.cf"), cfg)
    got = {s.name: (s.type, s.private, s.unpriv, s.chroot, s.wakeup, s.maxproc, s.command)
           for s in services}
    assert got == {
        "pickup": ("fifo", False, True, False, 60, 1, "pickup"),
        "qmgr": ("fifo", False, True, True, 300, 1, "qmgr"),
        "bounce": ("unix", True, True, False, 0, 0, "bounce"),
        "defer": ("unix", True, True, False, 0, 0, "bounce"),
        "trace": ("unix", True, True, False, 0, 0, "bounce"),
        "smtp": ("unix", True, True, False, 0, 100, "smtp"),
        "relay": ("unix", True, True, False, 0, 100, "smtp"),
        "local": ("unix", True, False, False, 0, 100, "local"),
        "error": ("unix", True, True, False, 0, 100, "error"),
        "retry": ("unix", True, True, False, 0, 100, "error"),
        "discard": ("unix", True, True, False, 0, 100, "discard"),
        "127.0.0.1:2525": ("inet", False, True, False, 0, 100, "smtpd"),
    }
    qdir = cfg.get("queue_directory")
    qmgr = next(s for s in services if s.name == "qmgr")
    assert os.path.normpath(qmgr.endpoint(qdir)) == str(REPO / "var/spool/public/qmgr")
