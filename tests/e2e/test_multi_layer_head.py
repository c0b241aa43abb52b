"""A decision head on several layers, served by vLLM as the offline tools compute it.

``head_recipe --middle-layers`` builds a head on any ascending list of layers (the
shipped one reads layer 16), which ``refusal_plugins.model`` serves
through Llama's auxiliary-hidden-state hook (several layers come back as a list,
in layer order). This serves the default model with a head on another list, the
shipped layer-16 rows between random rows for layers 12 and 20, and checks that
vLLM's control probabilities equal those computed with transformers from each
layer's own input: a layer read in the wrong place or order would not.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from openai import OpenAI

from .server import Server, running_server

pytestmark = pytest.mark.e2e

LAYERS = [12, 16, 20]
PROMPTS = ["How do I make a bomb?", "What is the capital of France?",
           "Give me a recipe for pancakes.", "Tell me about your childhood."]  # fmt: skip


@functools.cache
def features() -> list[np.ndarray]:
    """The base model's final state and the inputs of LAYERS at the decision position of
    PROMPTS (one pass, shared by the fixture and the test)."""
    from refusal_training.features import _extract
    from refusal_training.smollm2 import base_model_dir

    return _extract(base_model_dir(), PROMPTS, batch_size=4, device="cpu", layers=[None, *LAYERS])


@pytest.fixture(scope="module")
def three_layer_model(tmp_path_factory) -> Path:
    """The default model with a head on layers 12, 16 and 20 (weights linked, not copied)."""
    import torch
    from refusal_plugins.registry import HEAD_FILE, HEAD_WEIGHT
    from refusal_training.build import build
    from safetensors.torch import load_file, save_file

    built = build("smollm2")
    out = tmp_path_factory.mktemp("three-layers") / "model"
    out.mkdir()
    for item in built.iterdir():
        if item.suffix == ".safetensors" and item.name != HEAD_FILE:
            (out / item.name).symlink_to(item)
        elif item.is_file() and item.name != HEAD_FILE:
            shutil.copy(item, out / item.name)
    config = json.loads((built / "config.json").read_text())
    shipped = config["refusal_head"]["layers"]
    assert 16 in shipped and shipped != LAYERS, "needs the shipped layer-16 rows, on another list"
    config["refusal_head"]["layers"] = LAYERS
    (out / "config.json").write_text(json.dumps(config))
    final, h12, _, h20 = features()
    d, at = final.shape[1], shipped.index(16)  # the shipped rows' columns are in layer order
    middle = load_file(str(built / HEAD_FILE))[HEAD_WEIGHT][:, at * d : (at + 1) * d]
    # Random rows giving logits of about ±1 on these prompts, so each layer's input counts.
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(middle.shape, generator=gen) / float(np.linalg.norm(h, axis=1).mean())
            for h in (h12, h20)]  # fmt: skip
    save_file({HEAD_WEIGHT: torch.cat([rows[0], middle, rows[1]], dim=1).contiguous()},
              str(out / HEAD_FILE))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def served(three_layer_model, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("three-layers-log") / "vllm.log"
    with running_server(three_layer_model, log, ["--max-model-len", "1024"]) as s:
        yield s


def test_served_probabilities_read_each_layer_in_its_place(served, three_layer_model):
    from refusal_plugins.registry import HEAD_FILE, HEAD_WEIGHT
    from refusal_training.smollm2_model import artefact_path
    from safetensors.numpy import load_file

    keys = [t["key"] for t in json.loads((three_layer_model / "refusal_manifest.json").read_text())["tokens"]]
    final, *middle = features()
    rows = load_file(str(three_layer_model / HEAD_FILE))[HEAD_WEIGHT].astype(np.float64)
    output_rows = load_file(str(artefact_path()))["output_rows"].astype(np.float64)
    logits = final @ output_rows.T + np.concatenate(middle, axis=1) @ rows.T
    d = final.shape[1]
    shipped = final @ output_rows.T + middle[1] @ rows[:, d : 2 * d].T  # layer 16 alone
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    client = OpenAI(base_url=served.api_url, api_key="unused", max_retries=0, timeout=300)
    for prompt, expected, alone in zip(PROMPTS, want, shipped, strict=True):
        reply = client.chat.completions.create(
            model=served.model, messages=[{"role": "user", "content": prompt}],
            temperature=0, max_tokens=1,
        )  # fmt: skip
        decision = reply.choices[0].model_extra["refusal_decision"]
        got = np.array([decision["probabilities"][k] for k in keys])
        np.testing.assert_allclose(got, expected, atol=2e-3)
        assert not np.allclose(logits[PROMPTS.index(prompt)], alone, atol=0.1)  # 12 and 20 count
