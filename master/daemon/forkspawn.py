"""master.daemon.forkspawn - start a child of one of our own services by forking the master.

Summary
    A service child is normally a new interpreter (``python -P -m <module> ...``, started
    with ``os.posix_spawn`` by master.daemon.spawn). That costs every child the start of
    Python and the import of its service module again: 80-180 ms of CPU per child
    (bench/README.md), paid again every ``max_use`` deliveries - for a busy relay the
    largest cost of the whole mail system. Postfix's children are small C programs and
    start in about a millisecond.

    So for the services of qmgrd's own packages (``transports.*``, ``qmgrd.*``) the
    master imports the service module once, in the master, the first time a child of it
    is needed (:func:`preload`), freezes the garbage collector's view of everything
    imported so far (``gc.freeze``: the pages stay shared with the children instead of
    being copied by the collector's writes), and from then on forks instead of spawning.
    The child does what ``posix_spawn`` + ``exec`` would have done, in the same order:

    1. its own process group (``setpgroup=0``);
    2. signals as a fresh interpreter has them: no wakeup fd, every handler the master
       installed back to its default (SIGPIPE and SIGXFSZ ignored, SIGINT raising
       KeyboardInterrupt, as Python starts), no signal blocked;
    3. the master's log closed; the descriptors of postfix.md §3.3 put in place (``dup2``
       to 3, 4, 5, 6.. - the master keeps its own at 10 and above, so no source is
       overwritten), then every close-on-exec descriptor closed, as ``exec`` would: the
       child keeps exactly 0-2 and the ones it was given;
    4. ``GENERATION`` in the environment, ``sys.argv`` as ``-m`` would set it;
    5. the service module's ``main()`` - the module object the master imported, so
       its body is not executed again (that cost each child about 4 ms of CPU and
       0.7 MiB of pages of its own), made ``sys.modules["__main__"]`` (the skeleton
       names the process - log tag, ``<process_name>_*`` parameters - after
       ``__main__``'s spec); a module without ``main()`` is run by
       ``runpy.run_module(module, run_name="__main__", alter_sys=True)`` exactly as
       under ``python -m`` - and ``os._exit`` with its exit status. The child never
       returns into the master's code, and no exit handler or finaliser of the master
       runs in it.

    What the children would each load lazily is loaded once in the master by
    :func:`preload`: the codecs and time zone a chrooted child primes
    (master.server.jail.prime_for_jail).

    The master alone still creates and reaps every child (design.md §4 rule 3): the fork
    is the master's, and master.daemon.spawn's ``waitpid`` buries it. Other modules (a
    user's own transport) are spawned as before, and so is a module whose import fails
    in the master (the spawned child then reports the error in its own log).

    Difference from exec: the children run the code the master loaded. A changed module
    on disk takes effect at the next master start, not at ``reload`` (Postfix's
    ``postfix reload`` does not restart its master either, but its children are new
    executables).

Public API
    forkable(argv) -> str | None      the module of a standard child command line
                                      (master.daemon.spawn.child_argv) when it is one of
                                      ours and loaded (or loadable) in the master
    preload(module) -> bool           import ``module`` in the master (once); False if it
                                      cannot be imported (then the caller spawns)
    fork_child(module, argv, generation, fds, env) -> int   fork; the child runs the module
                                      and never returns; the parent gets the pid

Raises
    OSError from ``fork`` (the supervisor logs and throttles, as for a failed spawn).
    Nothing here logs in the master; a child that fails before the module runs writes a
    traceback to standard error and exits 1 (the master logs the exit status).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import runpy
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import ClassVar, NoReturn

from master import log
from master.server.jail import prime_for_jail
from master.server.skeleton import preload_event_loop, preparse

__all__ = ["fork_child", "forkable", "preload"]

OUR_PACKAGES = ("transports.", "qmgrd.")


class _Loaded:
    ok: ClassVar[set[str]] = set()  # modules imported in the master
    failed: ClassVar[set[str]] = set()  # modules that could not be: spawned instead


def preload(module: str) -> bool:
    """Import ``module`` (a package: its ``__main__``) in the master, once, then freeze
    the collector's generations. Returns False when it cannot be imported."""
    if module in _Loaded.ok:
        return True
    if module in _Loaded.failed:
        return False
    try:
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise ImportError(module)
        importlib.import_module(module + ".__main__" if spec.submodule_search_locations
                                else module)
    except Exception:  # noqa: BLE001 - any import failure: the spawned child reports it
        _Loaded.failed.add(module)
        return False
    if not _Loaded.ok:
        prime_for_jail()  # once: the codecs and time zone every jailed child would load
    if "asyncio" in sys.modules:
        preload_event_loop()  # uvloop: async_server's loop (skeleton.event_loop_factory)
    _Loaded.ok.add(module)
    gc.collect()
    gc.freeze()
    return True


def forkable(argv: Sequence[str]) -> str | None:
    """The service module of ``argv`` if the master may fork it (see module docstring)."""
    if len(argv) < 4 or argv[0] != sys.executable or list(argv[1:3]) != ["-P", "-m"]:
        return None
    module = argv[3]
    if not module.startswith(OUR_PACKAGES):
        return None
    return module if preload(module) else None


def fork_child(module: str, argv: Sequence[str], generation: int, fds: Sequence[int],
               env: Mapping[str, str]) -> int:
    """Fork a child that runs ``module`` with the arguments of ``argv`` after the module
    name, descriptors ``fds`` at 3, 4, ..., environment ``env`` plus ``GENERATION``.
    Returns the child's pid (in the master).

    What the child needs to know is worked out here, before the fork (:class:`_Plan`):
    every object a child's code touches is a page it copies, 4 KiB at a time, so the
    child only carries the plan out."""
    plan = _Plan(module, list(argv[4:]), generation, list(fds), env)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        _child(plan)
    return pid


class _Plan:
    """A child's start, decided in the master (fork_child's docstring): its module and
    ``main``, ``sys.argv``, the signals to put back (step 2), the descriptors to close
    (step 3), the environment variables to unset and set (step 4), and its command line
    parsed in advance (master.server.skeleton.preparse) - parsing it in each child made
    every child copy about 0.7 MiB of the master's pages."""

    def __init__(self, module: str, args: list[str], generation: int, fds: list[int],
                 env: Mapping[str, str]) -> None:
        self.module = module
        self.fds = fds
        self.keep = set(range(3 + len(fds)))
        self.loaded = sys.modules.get(module + ".__main__") or sys.modules.get(module)
        spec = getattr(self.loaded, "__spec__", None) or importlib.util.find_spec(module)
        origin = spec.origin if spec is not None and spec.origin else module
        self.argv = [origin, *args]
        self.signals = _signals_to_reset()
        self.open_fds = _open_fds()
        want = dict(env)
        want["GENERATION"] = str(generation)
        self.unset = [name for name in os.environ if name not in want]
        self.set = {name: value for name, value in want.items()
                    if os.environ.get(name) != value}
        preparse(args)


def _child(plan: _Plan) -> NoReturn:
    code = 1
    try:
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig, want in plan.signals:
            try:
                signal.signal(sig, want)  # type: ignore[arg-type]
            except (OSError, ValueError):
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        log.close()
        for i, src in enumerate(plan.fds):
            os.dup2(src, 3 + i)
        _close_on_exec(plan.open_fds, plan.keep)
        for name in plan.unset:
            del os.environ[name]
        os.environ.update(plan.set)
        sys.argv = plan.argv
        main = getattr(plan.loaded, "main", None)
        if plan.loaded is not None and callable(main):
            sys.modules["__main__"] = plan.loaded  # as runpy would: the skeleton names
            main()                                 # the process after __main__'s spec
        else:
            runpy.run_module(plan.module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # noqa: BLE001 - the child's last word; never back into the master
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write(f"{code}\n")
    return 1


def _signals_to_reset() -> list[tuple[int, object]]:
    """The signals whose handler differs from a new interpreter's, with the handler it
    has there (module docstring, step 2): SIGPIPE and SIGXFSZ ignored, SIGINT raising
    KeyboardInterrupt, every other one the default."""
    out: list[tuple[int, object]] = []
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if sig in (signal.SIGPIPE, signal.SIGXFSZ):
            want: object = signal.SIG_IGN
        elif sig == signal.SIGINT:
            want = signal.default_int_handler
        else:
            want = signal.SIG_DFL
        if handler is not want and handler is not None:
            out.append((sig, want))
    return out


def _open_fds() -> list[int]:
    """The master's open descriptors (the child starts with the same ones)."""
    names = os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd")
    return sorted(int(name) for name in names)


def _close_on_exec(open_fds: list[int], keep: set[int]) -> None:
    """Close every descriptor of ``open_fds`` that ``exec`` would close (FD_CLOEXEC
    set), except ``keep``."""
    for fd in open_fds:
        if fd in keep:
            continue
        try:
            if not os.get_inheritable(fd):
                os.close(fd)
        except OSError:
            pass  # the listing's own descriptor, gone by now
