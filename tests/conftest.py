"""Shared test helpers: where the demo model is cached and where shared data lives."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (licensed prompt sets, read by path, never copied)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The embedded demo model, built once (cached under REFUSAL_GATEWAY_CACHE_DIR).

    ``REFUSAL_GATEWAY_TEST_MODEL_DIR`` points the e2e tests at an already built
    model instead (a development shortcut while the corpus is being edited).
    """
    import os

    from refusal_training.demo_model import build_demo_model, demo_model_dir

    given = os.environ.get("REFUSAL_GATEWAY_TEST_MODEL_DIR")
    if given:
        return Path(given)

    return build_demo_model(demo_model_dir())
