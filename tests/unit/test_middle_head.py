"""The middle-layer head outside vLLM: the same logits the served class computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from refusal_plugins.registry import ARCHITECTURE, HEAD_FILE, HEAD_WEIGHT, head_spec
from refusal_training.features import _extract
from refusal_training.middle_head import attach, spec
from safetensors.torch import save_file


def tiny_llama(tmp_path, layer: int | list[int] | None):
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
    width = len(layer) if isinstance(layer, list) else 1
    weight = torch.randn(3, 32 * width)
    if layer is not None:
        data = json.loads((tmp_path / "config.json").read_text())
        data["architectures"] = [ARCHITECTURE]
        key = "layers" if isinstance(layer, list) else "layer"  # "layer": models built before
        data["refusal_head"] = {key: layer, "token_ids": [61, 62, 63]}
        (tmp_path / "config.json").write_text(json.dumps(data))
        save_file({HEAD_WEIGHT: weight}, str(tmp_path / HEAD_FILE))
    return model, weight


def test_attach_adds_the_layer_input_times_the_rows_to_the_control_logits(tmp_path):
    model, weight = tiny_llama(tmp_path, layer=2)
    head = attach(model, tmp_path)
    assert head is not None and spec(tmp_path) == {"layers": [2], "token_ids": [61, 62, 63]}
    ids = torch.tensor([[1, 5, 9, 2, 3]])
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
        plain = out.logits[:, -1].clone()
        adjusted = head.add_to(out.logits[:, -1].clone())
    want = plain.clone()
    want[:, [61, 62, 63]] += out.hidden_states[2][:, -1] @ weight.T
    torch.testing.assert_close(adjusted, want)
    assert torch.equal(adjusted[:, :61], plain[:, :61])  # the vocabulary is untouched


def test_a_head_on_several_layers_reads_their_inputs_side_by_side(tmp_path):
    model, weight = tiny_llama(tmp_path, layer=[1, 3])
    head = attach(model, tmp_path)
    assert head is not None and spec(tmp_path)["layers"] == [1, 3]
    ids = torch.tensor([[1, 5, 9, 2, 3], [1, 7, 7, 2, 3]])
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
        plain = out.logits[:, -1].clone()
        adjusted = head.add_to(out.logits[:, -1].clone())
    both = torch.cat([out.hidden_states[1][:, -1], out.hidden_states[3][:, -1]], dim=-1)
    want = plain.clone()
    want[:, [61, 62, 63]] += both @ weight.T  # columns in the order of the layers
    torch.testing.assert_close(adjusted, want)


@pytest.mark.parametrize(
    "head, error",
    [
        ({"layers": [3, 1], "token_ids": [61]}, "must ascend"),
        ({"layers": [2, 2], "token_ids": [61]}, "must ascend"),
        ({"layers": [0], "token_ids": [61]}, "within 1..3"),
        ({"layers": [4], "token_ids": [61]}, "within 1..3"),
        ({"layers": [], "token_ids": [61]}, "non-empty list"),
        ({"layers": [1.0], "token_ids": [61]}, "non-empty list"),
        ({"layers": [True], "token_ids": [61]}, "non-empty list"),
        ({"layers": "2", "token_ids": [61]}, "non-empty list"),
        ({"layer": 2, "layers": [2], "token_ids": [61]}, "needs config.refusal_head"),
        ({"token_ids": [61]}, "needs config.refusal_head"),
        ({"layers": [2]}, "needs config.refusal_head"),
        ({"layers": [2], "token_ids": [61, 61]}, "distinct ids"),
        ({"layers": [2], "token_ids": [64]}, "distinct ids"),
        ({"layers": [2], "token_ids": [-1]}, "distinct ids"),
        ({"layers": [2], "token_ids": []}, "distinct ids"),
        ([2], "needs config.refusal_head"),
    ],
)
def test_a_malformed_head_is_refused_as_vllm_refuses_it(head, error):
    """One check (refusal_plugins.registry.head_spec) for vLLM's class and the offline tools."""
    with pytest.raises(ValueError, match=error):
        head_spec(head, num_layers=4, vocab_size=64)


def test_a_model_without_a_middle_head_is_left_alone(tmp_path):
    model, _ = tiny_llama(tmp_path, layer=None)
    assert spec(tmp_path) is None and attach(model, tmp_path) is None


def test_features_of_a_middle_layer_are_its_input_at_the_decision_position(tmp_path):
    model, _ = tiny_llama(tmp_path, layer=None)
    prompts = ["w5 w6", "w7 w8 w9 w10"]  # different lengths: left padding must not matter
    (got,) = _extract(tmp_path, prompts, batch_size=2, device="cpu", layers=[3])
    for prompt, row in zip(prompts, got, strict=True):
        ids = torch.tensor([[1, *[int(w[1:]) for w in prompt.split()], 2, 3]])
        with torch.inference_mode():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[3][0, -1]
        np.testing.assert_allclose(row, hidden.numpy(), atol=1e-4)


def test_several_layers_and_the_final_state_come_from_one_pass(tmp_path):
    model, _ = tiny_llama(tmp_path, layer=None)
    prompts = ["w5 w6", "w7 w8 w9 w10"]
    final, second, third = _extract(tmp_path, prompts, batch_size=2, device="cpu", layers=[None, 2, 3])
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([[1, *[int(w[1:]) for w in prompt.split()], 2, 3]])
        with torch.inference_mode():
            out = model(input_ids=ids, output_hidden_states=True)
        np.testing.assert_allclose(final[i], out.hidden_states[-1][0, -1].numpy(), atol=1e-4)
        np.testing.assert_allclose(second[i], out.hidden_states[2][0, -1].numpy(), atol=1e-4)
        np.testing.assert_allclose(third[i], out.hidden_states[3][0, -1].numpy(), atol=1e-4)


def recorded_extractions(monkeypatch, what: str) -> list:
    """Each extraction pass from now on, as its keyword ``what`` (layers, systems)."""
    from refusal_training import features

    calls = []
    real = features._extract

    def counting(*args, **kwargs):
        calls.append(kwargs.get(what))
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "_extract", counting)
    return calls


def test_cached_layers_are_not_extracted_again(tmp_path, monkeypatch):
    from refusal_training import features

    tiny_llama(tmp_path / "model", layer=None)
    calls = recorded_extractions(monkeypatch, "layers")
    cache = tmp_path / "cache"
    first = features.decision_features_at(tmp_path / "model", ["w5", "w6 w7"], cache, [None, 2], 2)
    assert calls == [[None, 2]]  # both layers in one pass
    again = features.decision_features_at(tmp_path / "model", ["w6 w7", "w8"], cache, [2, None, 3], 2)
    assert calls[1] == [2, None, 3] and len(calls) == 2  # "w8" lacks every layer; 3 is new
    np.testing.assert_array_equal(again[1][0], first[0][1])  # cached rows come back unchanged
    features.decision_features_at(tmp_path / "model", ["w8", "w5"], cache, [3], 2)
    assert calls[2] == [3]  # "w5" lacked layer 3 only
    assert not list(cache.rglob("*.tmp.*"))  # each file written aside, then replaced whole


def test_only_a_middle_layer_can_be_read(tmp_path):
    tiny_llama(tmp_path, layer=None)
    for layer in (0, 4, -1):  # the embeddings, past the last layer, Python's negative index
        with pytest.raises(ValueError, match="not a middle layer"):
            _extract(tmp_path, ["w5"], batch_size=1, device="cpu", layers=[layer])


def test_the_recipe_takes_ascending_middle_layers_or_none():
    import argparse

    from refusal_training.head_recipe import _layers

    assert _layers("12,16,20") == [12, 16, 20] and _layers("16") == [16] and _layers("0") == []
    for bad in ("16,12", "16,16", "0,16", "-1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _layers(bad)


def test_the_build_reads_the_layers_of_old_and_new_artefacts():
    from refusal_training.smollm2_model import middle_layers

    assert middle_layers({"middle_layers": "12,16,20"}) == [12, 16, 20]
    assert middle_layers({"middle_layer": "16"}) == [16]  # artefacts of one layer
    with pytest.raises(ValueError, match="names no middle layer"):
        middle_layers({})


def test_a_client_system_message_is_rendered_and_cached_under_its_own_key(tmp_path, monkeypatch):
    from refusal_training import features

    model, _ = tiny_llama(tmp_path / "model", layer=None)
    calls = recorded_extractions(monkeypatch, "systems")
    cache = tmp_path / "cache"
    (plain,) = features.decision_features_at(tmp_path / "model", ["w5", "w6"], cache, [None], 2)
    (under,) = features.decision_features_at(tmp_path / "model", ["w5", "w6"], cache, [None], 2,
                                             systems=["w9", None])  # fmt: skip
    assert calls == [[None, None], ["w9"]]  # "w6" without a system message was cached already
    np.testing.assert_array_equal(under[1], plain[1])
    from transformers import AutoTokenizer

    # The template renders "w1 w9 w2w1 w5 w2 w3" ("w2w1" is one unknown word: 60).
    assert features.prompt_ids(AutoTokenizer.from_pretrained(tmp_path / "model"), "w5", "w9") == [1, 9, 60, 5, 2, 3]
    ids = torch.tensor([[1, 9, 60, 5, 2, 3]])
    with torch.inference_mode():
        expected = model.model(input_ids=ids).last_hidden_state[0, -1].numpy()
    np.testing.assert_allclose(under[0], expected, atol=1e-4)
    assert not np.allclose(under[0], plain[0], atol=1e-3)
    features.decision_features_at(tmp_path / "model", ["w5"], cache, [None], 2, systems=["w9"])
    assert len(calls) == 2  # cached


def test_earlier_turns_are_rendered_and_cached_under_their_own_key(tmp_path, monkeypatch):
    from refusal_training import features
    from refusal_training.system_prompts import Context

    tiny_llama(tmp_path / "model", layer=None)
    calls = recorded_extractions(monkeypatch, "systems")
    cache = tmp_path / "cache"
    turns = Context(earlier=(("w7", "w8"),))
    both = Context(system="w9", earlier=(("w7", "w8"),))
    features.decision_features_at(tmp_path / "model", ["w5"], cache, [None], 2, systems=["w9"])
    features.decision_features_at(tmp_path / "model", ["w5"] * 3, cache, [None], 2,
                                  systems=[Context(system="w9"), turns, both])  # fmt: skip
    # A context of a system message alone is that system message (cached); the others are new.
    assert calls == [["w9"], [turns, both]]
    keys = {features._prompt_key("w5", c) for c in (None, "w9", turns, both)}
    assert len(keys) == 4 and features._prompt_key("w5", Context(system="w9")) in keys


def _alone(model, ids: list[int], layer: int | None) -> np.ndarray:
    """A rendering's vector run on its own, whole: what the shared-context path must equal."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1 if layer is None else layer][0, -1].numpy()


@pytest.mark.parametrize("layers", [[None, 2], [3]])  # [3]: the pass stops at layer 3
def test_prompts_after_one_context_continue_its_cached_keys_and_equal_a_whole_pass(tmp_path, layers):
    """Contexts run once (features.shared_prefixes) and each batch continues them: the
    vectors are those of every rendering run whole, whatever the padding, the batch
    split or the stop."""
    from refusal_training.features import prompt_ids
    from transformers import AutoTokenizer

    model, _ = tiny_llama(tmp_path, layer=None)
    prompts = ["w5", "w6 w7 w8", "w9 w10", "w11 w12 w13 w14 w15", "w16 w17", "w18"]
    systems = ["w30 w31 w32 w33", "w30 w31 w32 w33", "w30 w31 w32 w33", "w40 w41", "w40 w41", None]
    got = _extract(tmp_path, prompts, batch_size=2, device="cpu", layers=layers, systems=systems)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for i, (prompt, system) in enumerate(zip(prompts, systems, strict=True)):
        ids = prompt_ids(tokenizer, prompt, system)
        for layer, block in zip(layers, got, strict=True):
            np.testing.assert_allclose(block[i], _alone(model, ids, layer), atol=1e-4)


def test_shared_prefixes_keep_every_prompts_last_token_and_skip_lone_contexts():
    from refusal_training.features import shared_prefixes

    ids = [[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 3], [7, 8], [1, 2]]
    groups = ["a", "a", "a", "b", "c"]
    out = {tuple(rows): shared for shared, rows in shared_prefixes(ids, groups)}
    assert out == {(0, 1, 2): 2, (3,): 0, (4,): 0}  # [1, 2, 3] keeps its last token
    assert shared_prefixes([[5, 6], [5, 6]], ["x", "x"]) == [(1, [0, 1])]  # identical renderings


def test_the_committed_head_was_fitted_on_every_trainable_source():
    """A ``head_recipe --hold-out`` head measures a source through a server; it must never
    be the one the default model ships (its provenance says which families it lacks)."""
    from refusal_training.smollm2_model import artefact_info, artefact_path

    info = artefact_info(artefact_path())
    assert info["created_by"] == "python -m refusal_training.head_recipe"
    assert not info["head"].get("held_out") and info["leave_one_source_out"]
