"""qmgrd.flow: token operations on a real pipe, and which processes use fds 3/4."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

import qmgrd.flow
from qmgrd.flow import FlowPipe
from tests.harness import REPO


@pytest.fixture
def pipe() -> Iterator[FlowPipe]:
    r, w = os.pipe()
    try:
        yield FlowPipe(r, w)
    finally:
        os.close(r)
        os.close(w)


def test_put_count_get(pipe: FlowPipe) -> None:
    assert pipe.count() == 0
    assert pipe.put(5) == 5
    assert pipe.count() == 5
    assert pipe.get(0) is True
    assert pipe.count() == 4
    assert os.get_blocking(pipe.read_fd) is False
    assert os.get_blocking(pipe.write_fd) is False


def test_get_empty_waits_timeout_then_gives_up(pipe: FlowPipe,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[int] = []  # the poll timeouts asked for, in ms (not wall-clock bounds:
    real_poll = select.poll  # a loaded machine may run this test at any pace)

    class Poll:
        def __init__(self) -> None:
            self.poller = real_poll()

        def register(self, fd: int, mask: int) -> None:
            self.poller.register(fd, mask)

        def poll(self, ms: int) -> list[tuple[int, int]]:
            waits.append(ms)
            return self.poller.poll(ms)

    monkeypatch.setattr(qmgrd.flow.select, "poll", Poll)
    assert pipe.get(0) is False
    assert waits == []  # no token, no timeout: no wait at all
    start = time.monotonic()
    assert pipe.get(0.3) is False
    assert time.monotonic() - start >= 0.29  # waited out its timeout, then gave up
    assert waits and all(0 < ms <= 300 for ms in waits)


def test_get_takes_token_that_arrives_while_waiting(pipe: FlowPipe) -> None:
    # A child process writes a token after 0.2 s; get(60) returns as soon as it arrives
    # (long before its timeout, however slowly a loaded machine starts the child).
    code = f"import os, time; time.sleep(0.2); os.write({pipe.write_fd}, b'x')"
    child = subprocess.Popen([sys.executable, "-c", code], pass_fds=(pipe.write_fd,))
    try:
        start = time.monotonic()
        assert pipe.get(60.0) is True
        assert time.monotonic() - start < 30
    finally:
        assert child.wait(10) == 0
    assert pipe.count() == 0


def test_put_on_full_pipe_does_not_block(pipe: FlowPipe) -> None:
    written = pipe.put(1 << 20)  # more than any pipe holds
    assert 0 < written < 1 << 20
    assert pipe.put(10) == 0  # EAGAIN tolerated
    assert pipe.count() == written
    assert pipe.drain(written + 10) == written
    assert pipe.count() == 0


def test_topup_fills_and_drains(pipe: FlowPipe) -> None:
    assert pipe.topup(100) == 100
    assert pipe.count() == 100
    assert pipe.topup(100) == 0
    pipe.put(30)
    assert pipe.topup(100) == -30
    assert pipe.count() == 100
    for _ in range(40):
        assert pipe.get(0)
    assert pipe.topup(100) == 40
    assert pipe.count() == 100


def _run(body: str, env_generation: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GENERATION"}
    if env_generation:
        env["GENERATION"] = "7"
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


_MASTER_LIKE = """
    import os, time
    r, w = os.pipe()
    os.dup2(r, 3)
    os.dup2(w, 4)
    from qmgrd import flow
    print(flow.process_pipe() is not None)
    print(flow.flow_put(3), flow.flow_count())
    print(flow.flow_get(0), flow.flow_count())
    print(flow.flow_topup(10), flow.flow_count())
    print(flow.flow_topup(4), flow.flow_count())
    print(flow.flow_get(0), flow.flow_get(0), flow.flow_get(0), flow.flow_get(0))
    start = time.monotonic()
    print(flow.flow_get(0.2), round(time.monotonic() - start, 1))
"""


def test_master_child_uses_fds_3_4() -> None:
    assert _run(_MASTER_LIKE, env_generation=True).splitlines() == [
        "True", "3 3", "True 2", "8 10", "-6 4", "True True True True", "False 0.2"]


def test_process_not_started_by_master_never_touches_fds_3_4() -> None:
    # Same pipe on fds 3/4, but no GENERATION: nothing is read, written or waited for.
    out = _run(_MASTER_LIKE, env_generation=False).splitlines()
    assert out[0] == "False"
    assert out[1:4] == ["0 0", "True 0", "0 0"]
    assert out[-1] == "True 0.0"


@pytest.mark.parametrize("setup", [
    "import os; f = os.open('/dev/null', os.O_RDWR); os.dup2(f, 3); os.dup2(f, 4)",
    "import os; a = os.pipe(); b = os.pipe(); os.dup2(a[0], 3); os.dup2(b[1], 4)",
    "import os, contextlib\nfor fd in (3, 4):\n    with contextlib.suppress(OSError): os.close(fd)",
])
def test_fds_3_4_not_one_pipe_means_no_flow_control(setup: str) -> None:
    body = setup + textwrap.dedent("""
        import time
        from qmgrd import flow
        start = time.monotonic()
        print(flow.process_pipe() is None, flow.flow_get(1.0), flow.flow_put(5),
              time.monotonic() - start < 0.5)
    """)
    assert _run(body, env_generation=True) == "True True 0 True"
