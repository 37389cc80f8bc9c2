"""Suite-wide fixtures: every test starts with the process-wide log closed (stderr)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from master import log


@pytest.fixture(autouse=True)
def _reset_log() -> Iterator[None]:
    log.close()
    yield
    log.close()
