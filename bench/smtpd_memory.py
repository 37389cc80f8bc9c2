"""bench/smtpd_memory.py - where an smtpd process's own memory goes (issue 8, scenario M).

    .venv/bin/python bench/smtpd_memory.py [--messages 50]        (root; gdb for types)

Starts a qmgrd system with an smtpd on a loopback port (bench/common.QmgrdInstance, as
scenario A), sends ``--messages`` 1 KB messages over one SMTP session and, with the
session still open, compares the smtpd's pages with the master's, from which it was
forked:

* **private pages**: present in the smtpd, not the master's page at that address, and
  mapped once (``/proc/kpagecount``): the smtpd's own memory (USS), by mapping;
* for each private page, its content against the master's page at the same address:
  *identical* (written and restored: reference counts raised and lowered again; the
  copy is made at the first write all the same), or which 8-byte words differ;
* with gdb (``PyRun_SimpleString`` in each process after the page reading; it writes
  ``<dir>/objs.<pid>.txt``: address, type, size of every object reachable from the
  collector's lists, frozen ones included): each changed word is put down to the
  object it lies in - its reference count (offset 0), its collector header (the 16
  bytes before it), or its body (e.g. a code object's bytecode, rewritten by Python
  3.11's adaptive specialisation) - or to no live object (blocks allocated and freed
  in the parent's pools, dict and list storage).

Prints the figures; the last run's are in bench/README.md ("Latest results"). Loopback
only; the system is stopped at the end. Not a test and not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import os
import shutil
import smtplib
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # type: ignore[import-untyped]

from bench.common import QmgrdInstance, wait_for
from tests.harness import free_port

PAGE = 4096
DUMP = """
import gc, sys, os
gc.unfreeze()
_o = gc.get_objects(); _s = {id(x) for x in _o}; _x = []
for _a in _o:
    for _r in gc.get_referents(_a):
        if id(_r) not in _s:
            _s.add(id(_r)); _x.append(_r)
with open(%r + "/objs.%%d.txt" %% os.getpid(), "w") as _f:
    for _a in _o + _x:
        try:
            _z = sys.getsizeof(_a)
        except Exception:
            _z = 16
        _f.write("%%d %%s %%d\\n" %% (id(_a), type(_a).__name__, _z))
del _o, _x, _s
"""


def pfns(pid: int, start: int, end: int) -> list[int | None]:
    """Page frame numbers of [start, end) in pid (None: not present)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        data = f.read((end - start) // PAGE * 8)
    out: list[int | None] = []
    for (v,) in struct.iter_unpack("<Q", data):
        out.append(v & ((1 << 55) - 1) if v >> 63 & 1 else None)
    return out


def private_pages(pid: int, parent: int) -> tuple[dict[str, int], list[int]]:
    """({mapping: private pages}, [addresses]) of pid against its parent."""
    by_map: collections.Counter[str] = collections.Counter()
    pages: list[int] = []
    with open("/proc/kpagecount", "rb") as kc:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            name = os.path.basename(parts[5]) if len(parts) > 5 else "[anon]"
            if name.startswith("[v"):
                continue
            mine = pfns(pid, start, end)
            try:
                theirs = pfns(parent, start, end)
            except OSError:
                theirs = []
            for i, pfn in enumerate(mine):
                if pfn is None or (i < len(theirs) and theirs[i] == pfn):
                    continue
                kc.seek(pfn * 8)
                if struct.unpack("<Q", kc.read(8))[0] == 1:
                    by_map[name] += 1
                    pages.append(start + i * PAGE)
    return dict(by_map), pages


def changed_words(pid: int, parent: int, pages: list[int]) -> dict[int, list[int]]:
    """{page: [offsets of the 8-byte words that differ from the parent's page]}."""
    out = {}
    with open(f"/proc/{pid}/mem", "rb") as a, open(f"/proc/{parent}/mem", "rb") as b:
        for pg in pages:
            try:
                a.seek(pg)
                mine = a.read(PAGE)
                b.seek(pg)
                theirs = b.read(PAGE)
            except OSError:
                continue
            out[pg] = [i for i in range(0, PAGE, 8) if mine[i:i + 8] != theirs[i:i + 8]]
    return out


def dump_objects(pid: int, outdir: str) -> dict[int, tuple[str, int]] | None:
    """{address: (type, size)} of pid's objects through gdb, or None without gdb."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return None
    code = DUMP % outdir
    script = Path(outdir) / "dump.py"
    script.write_text(code)
    os.chmod(script, 0o644)
    subprocess.run([gdb, "-p", str(pid), "-batch", "-ex", "call (int)PyGILState_Ensure()",
                    "-ex", f"call (int)PyRun_SimpleString(\"exec(open('{script}').read())\")",
                    "-ex", "call (void)PyGILState_Release($1)"],
                   capture_output=True, check=False, timeout=120)
    path = Path(outdir) / f"objs.{pid}.txt"
    if not path.exists():
        return None
    objs = {}
    for line in path.read_text().splitlines():
        addr, kind, size = line.split()
        objs[int(addr)] = (kind, int(size))
    return objs


def classify(diffs: dict[int, list[int]], objs: dict[int, tuple[str, int]]
             ) -> collections.Counter[str]:
    """Pages by what changed in them: a word in no object, a reference count, a
    collector header, or the body of an object of some type (a page counts once per
    kind of change it holds)."""
    items = sorted(objs.items())
    addrs = [a for a, _ in items]
    pages: collections.Counter[str] = collections.Counter()
    for pg, offs in diffs.items():
        kinds = set()
        for off in offs:
            addr = pg + off
            j = bisect.bisect_right(addrs, addr + 16) - 1
            found = None
            while j >= 0 and addrs[j] > addr - 65536:
                a, (kind, size) = items[j]
                if a - 16 <= addr < a + size:
                    found = (a, kind)
                    break
                j -= 1
            if found is None:
                kinds.add("no live object (freed blocks, dict/list storage)")
            elif addr < found[0]:
                kinds.add("collector header")
            elif addr == found[0]:
                kinds.add("reference count")
            else:
                kinds.add(f"body of a {found[1]} object")
        for k in kinds:
            pages[k] += 1
    return pages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=50)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (pagemap frame numbers, kpagecount)", file=sys.stderr)
        return 1
    base = Path(tempfile.mkdtemp(prefix="smtpd-memory-"))
    os.chmod(base, 0o755)  # the mail_owner must reach the queue directory
    outdir = base / "objs"
    outdir.mkdir()
    os.chmod(outdir, 0o1777)
    port = free_port()
    inst = QmgrdInstance(base / "q", smtpd_port=port, mynetworks="127.0.0.0/8",
                         default_transport="discard")
    try:
        inst.start()
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo("client.example")
        for i in range(args.messages):
            client.sendmail("a@sender.example", [f"r{i}@d{i % 50}.bench.example"],
                            "Subject: t\r\n\r\n" + "x" * 1024 + "\r\n")
        master = psutil.Process(inst.master_pid())
        smtpd = wait_for(lambda: next((p for p in master.children(recursive=True)
                                       if f":{port}" in " ".join(p.cmdline())), None),
                         10, "the smtpd")
        time.sleep(0.5)
        by_map, pages = private_pages(smtpd.pid, master.pid)
        diffs = changed_words(smtpd.pid, master.pid, pages)
        print(f"smtpd {smtpd.pid} after {args.messages} messages in one session "
              f"(session open): {len(pages)} private pages = {len(pages) * 4} KiB")
        for name, n in sorted(by_map.items(), key=lambda kv: -kv[1])[:6]:
            print(f"  {name:<40} {n * 4:>6} KiB")
        same = sum(1 for v in diffs.values() if not v)
        print(f"  content identical to the master's page: {same} pages "
              f"(written and restored)")
        objs = dump_objects(master.pid, str(outdir))
        if objs is None:
            print("  (no gdb: changed words not put down to objects)")
        else:
            print("  pages by what changed in them (a page may count under several):")
            for kind, n in classify(diffs, objs).most_common(12):
                print(f"    {n:>5}  {kind}")
        client.quit()
    finally:
        inst.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
