"""The refusal logits processor on real vLLM (V1 runner, CPU) with the demo model."""

from __future__ import annotations

import pytest

from . import checks

pytestmark = pytest.mark.e2e

BIASES = [-12.0, -6.0, -3.0, 0.0, 3.0, 6.0, 12.0]


async def test_bias_sweep_moves_each_category_monotonically(server):
    prompts = checks.sample_prompts(100)
    rates = await checks.bias_sweep(server, prompts, BIASES)
    for category, r in rates.items():
        assert all(a <= b for a, b in zip(r, r[1:], strict=False)), (category, r)
        assert r[-1] - r[0] >= 0.5, (category, r)  # the sweep really moves the rate


async def test_settings_never_leak_under_continuous_batching(server):
    await checks.isolation_under_batching(server)


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.7])
async def test_threshold_follows_the_papers_rule(server, threshold):
    checked = await checks.threshold_rule(server, checks.sample_prompts(40, seed=2), threshold)
    assert checked >= 30
