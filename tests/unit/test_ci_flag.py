"""``CI`` is a boolean: "CI=false" must not turn a local run's skips into failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import is_ci

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "value", ["1", "true", "TRUE", "True", "yes", "Yes", " true ", "on", "woodpecker"]
)
def test_true_values_mean_ci(value):
    assert is_ci(value) is True


@pytest.mark.parametrize(
    "value", [None, "", "  ", "0", "false", "FALSE", "False", "no", "No", "off", " 0 "]
)
def test_false_values_and_unset_mean_not_ci(value):
    assert is_ci(value) is False


@pytest.mark.parametrize(
    ("value", "want"), [("false", False), ("0", False), ("true", True), (None, False)]
)
def test_in_ci_is_read_from_the_environment(value, want):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if value is not None:
        env["CI"] = value
    out = subprocess.run(
        [sys.executable, "-c", "from tests.tools import IN_CI; print(IN_CI)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(want)


def test_the_ci_script_exports_ci_true():
    script = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in script.splitlines()]
    assert "export CI=true" in lines
    assert lines.index("export CI=true") < lines.index("make test")
