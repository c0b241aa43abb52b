"""Missing external tools: a skip on a developer's machine, a failure in CI.

CI (``CI=true``) installs everything the suite needs, so a missing tool there
is a broken set-up that must not hide behind a skip.
"""

from __future__ import annotations

import os

import pytest

IN_CI = bool(os.environ.get("CI"))


def unless_available(available: bool, reason: str) -> pytest.MarkDecorator:
    """Mark: skip when ``available`` is false, except in CI (where the test runs and fails)."""
    return pytest.mark.skipif(not available and not IN_CI, reason=reason)


def skip_or_fail(reason: str) -> None:
    """Inside a test or fixture: skip, or fail in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must install it)")
    pytest.skip(reason)
