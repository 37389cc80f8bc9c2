"""qmgrd.ctl.entry — the ``qmgr-ctl`` command: a plain ``flush`` at once, the rest by click.

Summary
    ``qmgr-ctl flush`` is Postfix's ``postqueue -f``: it asks the qmgr to retry all
    deferred mail now (``FADI`` to ``public/qmgr``, ``W`` to ``public/pickup``). It is
    run from cron, by ``qmgr-sendmail -q``, and after a destination comes back; its
    start is the delay before the first retry. Through click and master.config it
    costs about 50 ms; ``postqueue -f`` about 13 (issue 8, scenario C).

    So :func:`main` takes exactly two command lines itself:

    * ``flush``          (the directory: $QMGRD_CONFIG_DIR when set and not empty,
                          else /etc/qmgrd, as the click option's default)
    * ``-c DIR flush``

    with ``queue_directory`` read by qmgrd.quickcf, which gives it only as a literal
    absolute path. When main.cf is not plain enough for that reader (an expansion, a
    syntax error, an empty or relative queue_directory...), or the triggers cannot be
    handed over (no reader: the mail system is down, or no permission; no queue
    directory), or the command line is anything else at all (other options,
    ``--help``, ``flush --site``...), it runs qmgr-ctl's click interface
    (qmgrd.ctl.cli) on the same arguments, which parses and reports as always:
    ``<main.cf>, line <n>: bad queue_directory parameter value ...`` (exit 78),
    ``queue directory <path>: No such file or directory`` or ``Cannot flush mail
    queue - mail system is down`` (exit 69). Both paths send the same bytes
    (qmgrd.trigger.flush_all); a failed fast attempt may leave one extra ``FADI`` with
    a qmgr whose pickup is gone, which asks for nothing more than the retry being
    asked for.

Public API
    main() -> None          console-script entry point (bin/qmgr-ctl, python -m qmgrd.ctl);
                            exits, with the status qmgrd.ctl.cli documents (0: flushed)

Imports os, sys, qmgrd.quickcf and qmgrd.trigger for a plain flush; click and the rest of
qmgrd.ctl only otherwise (tests/test_ctl_startup.py).
"""

from __future__ import annotations

import os
import sys

from qmgrd.quickcf import QUEUE_DIRECTORY_DEFAULT, values

__all__ = ["DEFAULT_CONFIG_DIR", "main"]

DEFAULT_CONFIG_DIR = "/etc/qmgrd"  # the -c default (qmgrd.ctl.cli takes it from here)


def _plain_flush(argv: list[str]) -> str | None:
    """The configuration directory of a plain flush command line, else None."""
    if argv == ["flush"]:
        return os.environ.get("QMGRD_CONFIG_DIR") or DEFAULT_CONFIG_DIR
    if len(argv) == 3 and argv[0] == "-c" and argv[2] == "flush":
        return argv[1]
    return None


def _flush(config_dir: str) -> bool:
    """Send postqueue -f's triggers; False when the full path must run instead."""
    from qmgrd.trigger import flush_all

    got = values(config_dir, {"queue_directory": QUEUE_DIRECTORY_DEFAULT})
    return got is not None and flush_all(got["queue_directory"])


def main() -> None:
    """Run qmgr-ctl with sys.argv[1:] (see module docstring); exits."""
    argv = sys.argv[1:]
    config_dir = _plain_flush(argv)
    if config_dir is not None and _flush(config_dir):
        sys.exit(0)
    from qmgrd.ctl.cli import main as full

    full(argv)
