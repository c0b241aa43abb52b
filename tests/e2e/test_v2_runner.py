"""The same processor checks with vLLM's Model Runner V2 (forced on CPU).

On GPU, V2 is vLLM's default runner. vLLM also has a V2 runner for CPU, but it
needs Triton with a backend for the device; where that is missing (the CPU
build of vLLM on this project's CI machines) the module is skipped, and the
adapter is covered by tests/unit/test_adapters.py against vLLM's own
``LogitsContext`` on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import checks
from .server import Server, running_server


def _v2_runner_available() -> bool:
    from vllm.triton_utils import HAS_TRITON

    return bool(HAS_TRITON)


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not _v2_runner_available(),
        reason="vLLM Model Runner V2 needs Triton with a backend for this device (none here)",
    ),
]


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
