"""master.server.jail: the mail_owner rules, the order of chroot and privilege drop and
the refusal to run when root can be regained (against a fake OS), the unprivileged
warning, and - as root - a real jail in a child process."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from master.config import Config
from master.server import jail
from master.server.jail import JailError, Owner, OwnerError, enter_jail, lookup_mail_owner
from tests.services.procs import MAIL_OWNER, child_env

ROOT = os.geteuid() == 0


def cfg_with(owner: str) -> Config:
    return Config.from_text(f"mail_owner = {owner}\n", "/etc/qmgrd-test")


def entry(name: str, uid: int, gid: int) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, gid, "", "/nonexistent", "/bin/false"))


@pytest.fixture
def users(monkeypatch: pytest.MonkeyPatch) -> dict[str, pwd.struct_passwd]:
    table = {"mailer": entry("mailer", 4321, 4322), "root": entry("root", 0, 0),
             "wheelie": entry("wheelie", 4400, 0)}

    def getpwnam(name: str) -> pwd.struct_passwd:
        return table[name]

    monkeypatch.setattr(jail.pwd, "getpwnam", getpwnam)
    return table


def test_mail_owner_as_root(users: dict[str, pwd.struct_passwd]) -> None:
    assert lookup_mail_owner(cfg_with("mailer"), euid=0) == Owner("mailer", 4321, 4322, True)
    where = "main.cf, line 1: parameter mail_owner"  # Config.from_text's file name
    with pytest.raises(OwnerError) as unknown:
        lookup_mail_owner(cfg_with("nosuchuser"), euid=0)
    assert str(unknown.value) == f"{where}: unknown user name value: nosuchuser"
    with pytest.raises(OwnerError) as root:
        lookup_mail_owner(cfg_with("root"), euid=0)
    assert str(root.value) == f"{where}: user root has privileged user ID"
    with pytest.raises(OwnerError) as group:
        lookup_mail_owner(cfg_with("wheelie"), euid=0)
    assert str(group.value) == f"{where}: user wheelie has privileged group ID"


def test_not_root_means_the_invoking_user(users: dict[str, pwd.struct_passwd]) -> None:
    # mail_owner is not even looked at: it need not exist
    owner = lookup_mail_owner(cfg_with("nosuchuser"), euid=4500)
    assert (owner.uid, owner.gid, owner.privileged) == (4500, os.getegid(), False)
    text = jail.unprivileged_warning(Owner("alice", 4500, 4500, False))
    assert text == ("not started as root: every process runs as user alice (uid 4500), "
                    "without privilege separation or chroot")
    assert "\n" not in text


class FakeIds:
    """The id system calls of the jail, recorded; ``regain`` lets setuid(0) succeed."""

    def __init__(self, regain: bool = False) -> None:
        self.calls: list[tuple[str, object]] = []
        self.regain = regain
        self.uid = self.gid = 0
        self.groups = [0, 1]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("chroot", "chdir", "setgroups", "setgid", "setuid", "getresuid",
                     "getresgid", "getgroups"):
            monkeypatch.setattr(jail.os, name, getattr(self, name))

    def chroot(self, path: str) -> None:
        self.calls.append(("chroot", path))

    def chdir(self, path: str) -> None:
        self.calls.append(("chdir", path))

    def setgroups(self, groups: list[int]) -> None:
        self.calls.append(("setgroups", list(groups)))
        self.groups = list(groups)

    def setgid(self, gid: int) -> None:
        self.calls.append(("setgid", gid))
        self.gid = gid

    def setuid(self, uid: int) -> None:
        self.calls.append(("setuid", uid))
        if self.uid != 0 and not self.regain:
            raise PermissionError(1, "Operation not permitted")
        self.uid = uid

    def getresuid(self) -> tuple[int, int, int]:
        return (self.uid,) * 3

    def getresgid(self) -> tuple[int, int, int]:
        return (self.gid,) * 3

    def getgroups(self) -> list[int]:
        return self.groups


def test_chroot_then_drop_then_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = FakeIds()
    ids.install(monkeypatch)
    enter_jail("/var/spool/q", Owner("mailer", 4321, 4322, True))
    assert ids.calls == [("chroot", "/var/spool/q"), ("chdir", "/"), ("setgroups", []),
                         ("setgid", 4322), ("setuid", 4321), ("setuid", 0)]


def test_chroot_only_and_drop_only(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = FakeIds()
    ids.install(monkeypatch)
    enter_jail("/q", None)  # chroot y, unpriv n: stays root
    assert ids.calls == [("chroot", "/q"), ("chdir", "/")]
    ids.calls.clear()
    enter_jail(None, Owner("mailer", 4321, 4322, True))
    assert [c[0] for c in ids.calls] == ["setgroups", "setgid", "setuid", "setuid"]


def test_regainable_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeIds(regain=True).install(monkeypatch)
    with pytest.raises(JailError, match="root privileges can be regained"):
        enter_jail(None, Owner("mailer", 4321, 4322, True))


def test_failed_setuid_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = FakeIds()
    ids.install(monkeypatch)

    def setgid(gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(jail.os, "setgid", setgid)
    with pytest.raises(JailError, match=r"drop privileges to mailer \(uid 4321\): "
                                        "Operation not permitted"):
        enter_jail(None, Owner("mailer", 4321, 4322, True))


def test_late_imports_are_reported() -> None:
    seen: list[str] = []
    finders = list(sys.meta_path)
    try:
        jail.watch_late_imports(seen.append)
        import json.tool  # noqa: F401 - a module this process has not imported yet
        import json.tool as again  # noqa: F401 - already imported: not reported
    finally:
        sys.meta_path[:] = finders
    assert seen == ["json.tool"]


def test_an_optional_module_that_is_not_installed_is_not_reported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """dnspython tries ``import sniffio`` at every lookup and does without it: a jailed
    smtpd logged 'module sniffio imported after the jail' at its first DNS lookup."""
    monkeypatch.setattr(jail, "OPTIONAL_MODULES", ("qmgrd_test_no_such_module",),
                        raising=False)
    monkeypatch.setattr(jail, "_PRIMED", [], raising=False)
    seen: list[str] = []
    finders = list(sys.meta_path)
    try:
        jail.prime_for_jail()
        sys.modules.pop("json.tool", None)
        jail.watch_late_imports(seen.append)
        with pytest.raises(ImportError):
            import qmgrd_test_no_such_module  # type: ignore[import-not-found]  # noqa: F401
        import json.tool  # noqa: F401 - any other module is still reported
    finally:
        sys.meta_path[:] = finders
        sys.modules.pop("json.tool", None)
    assert seen == ["json.tool"]


CHILD = """
import json, os, sys
from master.server.jail import Owner, enter_jail, prime_for_jail
import pwd
pw = pwd.getpwnam(sys.argv[2])
prime_for_jail()
enter_jail(sys.argv[1], Owner(pw.pw_name, pw.pw_uid, pw.pw_gid, True))
try:
    os.setuid(0)
    regained = True
except PermissionError:
    regained = False
idn = "ex\u00e4mple.org".encode("idna").decode()  # needs punycode, stringprep: primed
print(json.dumps({"ids": [os.getresuid(), os.getresgid(), os.getgroups()],
                  "root": sorted(os.listdir("/")), "cwd": os.getcwd(), "regained": regained,
                  "idn": idn}))
"""



@pytest.mark.skipif(not ROOT, reason="chroot and setuid need root")
def test_real_jail_in_a_child(base: Path) -> None:
    (base / "inside").write_text("x")
    out = subprocess.run([sys.executable, "-P", "-c", CHILD, str(base), MAIL_OWNER],
                         env=child_env(), capture_output=True, text=True, timeout=30,
                         check=False)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    pw = pwd.getpwnam(MAIL_OWNER)
    assert got["ids"] == [[pw.pw_uid] * 3, [pw.pw_gid] * 3, []]
    assert got["root"] == ["inside"] and got["cwd"] == "/" and got["regained"] is False
    assert got["idn"] == "xn--exmple-cua.org"  # mail to an IDN domain works in the jail
