"""The same processor checks with vLLM's Model Runner V2 (forced on CPU).

On GPU, V2 is vLLM's default runner; ``VLLM_USE_V2_MODEL_RUNNER=1`` runs the
real V2 sampler path here on CPU, so the V2 adapter is tested in CI without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import checks
from .server import Server, running_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server_v2(demo_model_dir, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server_v2") / "vllm.log"
    with running_server(demo_model_dir, log, ["--model-runner", "v2"]) as s:
        text = log.read_text()
        assert "Using V2 Model Runner" in text and "refusal logits processor (V2)" in text
        yield s


async def test_v2_bias_sweep(server_v2):
    rates = await checks.bias_sweep(server_v2, checks.sample_prompts(30), [-12.0, 0.0, 12.0])
    for category, r in rates.items():
        assert r[0] <= r[1] <= r[2] and r[2] - r[0] >= 0.5, (category, r)


async def test_v2_isolation_under_continuous_batching(server_v2):
    await checks.isolation_under_batching(server_v2)


async def test_v2_threshold_rule(server_v2):
    assert await checks.threshold_rule(server_v2, checks.sample_prompts(30, seed=3), 0.3) >= 20
