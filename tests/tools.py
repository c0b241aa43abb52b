"""Missing external tools: a skip on a developer's machine, a failure in CI.

CI (``CI=true``, exported by ``.ci/run``) installs everything the suite needs,
so a missing tool there is a broken set-up that must not hide behind a skip.
"""

from __future__ import annotations

import os

import pytest

#: Values of ``CI`` that mean "not CI" (case and surrounding blanks ignored).
#: Any other non-empty value means CI: "1", "true", "yes", and the names some
#: CI systems put there (Woodpecker sets ``CI=woodpecker``); a CI run that
#: skips a test it should fail is worse than a local run that fails one.
NOT_CI = frozenset({"", "0", "false", "no", "off"})


def is_ci(value: str | None) -> bool:
    """``CI`` parsed as a boolean: unset, "", "0", "false", "no", "off" -> False."""
    return (value or "").strip().lower() not in NOT_CI


IN_CI = is_ci(os.environ.get("CI"))


def unless_available(available: bool, reason: str) -> pytest.MarkDecorator:
    """Mark: skip when ``available`` is false, except in CI (where the test runs and fails)."""
    return pytest.mark.skipif(not available and not IN_CI, reason=reason)


def skip_or_fail(reason: str) -> None:
    """Inside a test or fixture: skip, or fail in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must install it)")
    pytest.skip(reason)
