"""The middle-layer head outside vLLM: the same logits the served class computes."""

from __future__ import annotations

import json

import numpy as np
import torch
from refusal_plugins.registry import ARCHITECTURE, HEAD_FILE, HEAD_WEIGHT
from refusal_training.features import _extract
from refusal_training.middle_head import attach, spec
from safetensors.torch import save_file


def tiny_llama(tmp_path, layer: int | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(60)} | {"[UNK]": 60}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="w0")
    fast.chat_template = "{% for m in messages %}w1 {{ m['content'] }} w2{% endfor %} w3"
    fast.save_pretrained(tmp_path)
    weight = torch.randn(3, 32)
    if layer is not None:
        data = json.loads((tmp_path / "config.json").read_text())
        data["architectures"] = [ARCHITECTURE]
        data["refusal_head"] = {"layer": layer, "token_ids": [61, 62, 63]}
        (tmp_path / "config.json").write_text(json.dumps(data))
        save_file({HEAD_WEIGHT: weight}, str(tmp_path / HEAD_FILE))
    return model, weight


def test_attach_adds_the_layer_input_times_the_rows_to_the_control_logits(tmp_path):
    model, weight = tiny_llama(tmp_path, layer=2)
    head = attach(model, tmp_path)
    assert head is not None and spec(tmp_path)["layer"] == 2
    ids = torch.tensor([[1, 5, 9, 2, 3]])
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
        plain = out.logits[:, -1].clone()
        adjusted = head.add_to(out.logits[:, -1].clone())
    want = plain.clone()
    want[:, [61, 62, 63]] += out.hidden_states[2][:, -1] @ weight.T
    torch.testing.assert_close(adjusted, want)
    assert torch.equal(adjusted[:, :61], plain[:, :61])  # the vocabulary is untouched


def test_a_model_without_a_middle_head_is_left_alone(tmp_path):
    model, _ = tiny_llama(tmp_path, layer=None)
    assert spec(tmp_path) is None and attach(model, tmp_path) is None


def test_features_of_a_middle_layer_are_its_input_at_the_decision_position(tmp_path):
    model, _ = tiny_llama(tmp_path, layer=None)
    prompts = ["w5 w6", "w7 w8 w9 w10"]  # different lengths: left padding must not matter
    got = _extract(tmp_path, prompts, batch_size=2, device="cpu", layer=3)
    for prompt, row in zip(prompts, got, strict=True):
        ids = torch.tensor([[1, *[int(w[1:]) for w in prompt.split()], 2, 3]])
        with torch.inference_mode():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[3][0, -1]
        np.testing.assert_allclose(row, hidden.numpy(), atol=1e-4)


def test_only_a_middle_layer_can_be_read(tmp_path):
    import pytest

    tiny_llama(tmp_path, layer=None)
    for layer in (0, 4, -1):  # the embeddings, past the last layer, Python's negative index
        with pytest.raises(ValueError, match="not a middle layer"):
            _extract(tmp_path, ["w5"], batch_size=1, device="cpu", layer=layer)
