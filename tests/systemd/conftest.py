"""Fixtures of the systemd tests: a private journald, a restored root logger."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator

import pytest

# The harness package sits in tests/; make it importable however pytest
# was started.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from harness.journald import Journald  # noqa: E402
from harness.journald import skip_reason as journald_skip_reason  # noqa: E402


@pytest.fixture(scope="module")
def journald() -> Iterator[Journald]:
    """A private systemd-journald for the module's tests."""
    reason = journald_skip_reason()
    if reason:
        pytest.skip(reason)
    with Journald() as jd:
        yield jd


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what setup_logging does to the root logger."""
    from fastorch import systemd

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    if systemd._installed is not None:
        root.removeHandler(systemd._installed)
        systemd._installed.close()
        systemd._installed = None
    root.handlers[:] = handlers
    root.setLevel(level)
