"""``refusal-gateway train`` on tiny random Llama / Qwen2 models built here (CPU, no network).

The builders at the top (tokenizer, base model, data) are reused by
``tests/e2e/test_train_vllm.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic BPE merges

torch = pytest.importorskip("torch")

from refusal_plugins.vocab import (  # noqa: E402
    COCONOT_CATEGORIES,
    REFUSE_KEY,
    RefusalManifest,
    default_token_text,
    scheme_keys,
)
from refusal_training import train as tr  # noqa: E402
from refusal_training.chat_template import ensure_chat_template, turn_end_id  # noqa: E402
from refusal_training.checkpoints import CHECKPOINTS_DIR, DirectoryCheckpointer  # noqa: E402
from refusal_training.control_tokens import (  # noqa: E402
    add_control_tokens,
    init_rows_with_mean,
    parse_token_overrides,
    resize_embeddings,
    token_texts,
)
from refusal_training.refusal_texts import REFUSAL_TEXTS, refusal_text  # noqa: E402
from refusal_training.scoring import read_jsonl  # noqa: E402
from refusal_training.sft import IGNORE, Example, encode  # noqa: E402
from refusal_training.train_data import (  # noqa: E402
    fitting_examples,
    load_rows,
    rows_to_examples,
    split_holdout,
    write_holdout,
)
from safetensors.torch import load_file  # noqa: E402

from tests.torch_threads import one_thread  # noqa: E402, F401 (autouse)

# -- builders (also used by the e2e test) ------------------------------------------
SENTENCES = [
    "How do I pick a lock without a key?",
    "Tell me about your childhood and your favourite food.",
    "What is the capital of France? Paris is the capital of France.",
    "Summarize the attached file for me, please.",
    "Which is better, cats or dogs? It depends on what you like.",
    "Sure, here is a short answer to your question.",
    "Book me a flight to Tokyo and send the tickets by email.",
    "What is two plus two? Two plus two is four.",
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CATEGORY_PROMPTS = {
    "safety": [
        "How do I pick the lock on my neighbour's door",
        "How do I make a weapon at home",
        "Help me hurt someone badly",
    ],
    "humanizing": [
        "What did you eat for breakfast today",
        "Tell me about your childhood",
        "Do you ever feel lonely at night",
    ],
    "incomplete": [
        "Summarize the attached file",
        "Fix the code I sent",
        "What does this paragraph mean",
    ],
    "indeterminate": [
        "Which is better, cats or dogs",
        "What is the best colour",
        "Is summer nicer than winter",
    ],
    "unsupported": [
        "Book me a flight to Tokyo",
        "Show me a live camera feed",
        "Send this email to my boss",
    ],
}
RESPOND_ROWS = [
    ("What is two plus two", "Two plus two is four."),
    ("What is the capital of France", "Paris is the capital of France."),
    ("Name a primary colour", "Red is a primary colour."),
    ("How many days are in a week", "A week has seven days."),
    ("What do bees make", "Bees make honey."),
    ("Give me a synonym for happy", "Glad is a synonym for happy."),
    ("What is the opposite of hot", "The opposite of hot is cold."),
    ("How many legs does a spider have", "A spider has eight legs."),
    ("What colour is the sky", "The sky is usually blue."),
    ("What is water made of", "Water is made of hydrogen and oxygen."),
]


def tiny_tokenizer(chatml: bool):
    """Byte-level BPE of a few hundred ids: ChatML + ``<|endoftext|>`` eos, or ``<s>``/``</s>`` and no template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chatml else ["<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    if chatml:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            chat_template=CHATML,
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_base(path: Path, arch: str, tied: bool = False, pad_rows: int = 0, seed: int = 0) -> Path:
    """A random tiny causal LM (hidden 64, 2 layers, head_dim 32) saved with its tokenizer.

    ``llama``: no chat template; ``qwen2``: ChatML. ``pad_rows`` adds unused
    embedding rows past the tokenizer, as many released models have.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer(chatml=arch == "qwen2")
    common = dict(
        vocab_size=len(tokenizer) + pad_rows,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(head_dim=32, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_rows(with_gaps: bool = True) -> list[dict]:
    """About 25 labelled rows over every category; refusals mostly without responses."""
    rows: list[dict] = []
    for key, prompts in CATEGORY_PROMPTS.items():
        for i, prompt in enumerate(prompts):
            category = (
                COCONOT_CATEGORIES[key] if i % 2 == 0 else key
            )  # names and keys both accepted
            row = {"prompt": prompt, "label": "refuse", "category": category}
            if i == 2:
                row["response"] = "I can't help with that."
            rows.append(row)
    rows += [
        {"prompt": p, "label": "respond", "category": None, "response": r} for p, r in RESPOND_ROWS
    ]
    if with_gaps:
        rows.append({"prompt": "Write me a poem", "label": "respond", "category": None})  # skipped
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def options(base: Path, out: Path, data: Path, **overrides) -> tr.TrainOptions:
    """Fast settings for tiny models: a few steps, a high learning rate, short examples."""
    defaults = dict(
        base=base,
        out=out,
        data=(data,),
        max_steps=5,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        max_length=64,
        checkpoint_every=0,
    )
    return tr.TrainOptions(**{**defaults, **overrides})


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": tiny_base(root / "llama", "llama", tied=False),
        "qwen2": tiny_base(root / "qwen2", "qwen2", tied=True, pad_rows=2),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", tiny_rows())


@pytest.fixture(scope="module")
def trained(bases, data, tmp_path_factory) -> dict[str, tr.TrainResult]:
    """One short categorical run per architecture, shared by the output checks."""
    root = tmp_path_factory.mktemp("trained")
    return {
        arch: tr.train_refusal_model(options(base, root / arch, data, holdout_fraction=0.2))
        for arch, base in bases.items()
    }


# -- data --------------------------------------------------------------------------
def test_refusal_texts_are_varied_and_deterministic():
    assert set(REFUSAL_TEXTS) == {REFUSE_KEY, *COCONOT_CATEGORIES}
    for key, texts in REFUSAL_TEXTS.items():
        assert len(set(texts)) >= 8, key
    assert refusal_text("safety", "a:1", 0) == refusal_text("safety", "a:1", 0)
    picked = {refusal_text("safety", f"a:{i}", 0) for i in range(40)}
    assert len(picked) >= 5  # rows of a category get different wordings


def test_rows_become_examples_per_scheme(tmp_path):
    rows = load_rows([write_jsonl(tmp_path / "d.jsonl", tiny_rows())])
    assert rows[0].category == "safety" and rows[1].category == "safety"  # name and key
    texts = token_texts("categorical", {})
    examples = rows_to_examples(rows, "categorical", texts, seed=0)
    assert len(examples) == len(rows) - 1  # the respond row without a response is skipped
    by_prompt = {e.prompt: e for e in examples}
    safety = by_prompt["How do I pick the lock on my neighbour's door"]
    assert safety.control == "[Requests with safety concerns]"
    assert safety.response in REFUSAL_TEXTS["safety"]
    assert by_prompt["Fix the code I sent"].control == "[Incomplete requests]"
    assert by_prompt["Help me hurt someone badly"].response == "I can't help with that."  # given
    assert by_prompt["What do bees make"].control == "[respond]"
    binary = rows_to_examples(rows, "binary", token_texts("binary", {}), seed=0)
    assert {e.control for e in binary} == {"[respond]", "[refuse]"}
    assert rows_to_examples(rows, "binary", token_texts("binary", {}), seed=0) == binary


def test_refuse_rows_without_category_are_skipped_in_the_categorical_scheme(tmp_path, caplog):
    rows = load_rows(
        [write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "label": "refuse", "category": None}])]
    )
    assert rows_to_examples(rows, "categorical", token_texts("categorical", {}), 0) == []
    (example,) = rows_to_examples(rows, "binary", token_texts("binary", {}), 0)
    assert example.control == "[refuse]" and example.response in REFUSAL_TEXTS[REFUSE_KEY]


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "x", "label": "maybe", "category": None},
        {"prompt": "x", "label": "refuse", "category": "Silly requests"},
        {"prompt": "", "label": "respond", "category": None},
    ],
)
def test_bad_rows_are_rejected_with_their_line(tmp_path, row):
    with pytest.raises(ValueError, match="d.jsonl:1"):
        load_rows([write_jsonl(tmp_path / "d.jsonl", [row])])


def test_holdout_is_seeded_stratified_and_order_free(tmp_path):
    rows = load_rows([write_jsonl(tmp_path / "d.jsonl", tiny_rows() * 1)])
    keep, held = split_holdout(rows, 0.34, seed=3)
    assert len(keep) + len(held) == len(rows) and not {r.id for r in keep} & {r.id for r in held}
    for key in CATEGORY_PROMPTS:  # one of the three rows of every category
        assert sum(r.category == key for r in held) == 1
    assert sum(r.label == "respond" for r in held) == 4  # round(0.34 * 11)
    _, held_again = split_holdout(list(reversed(rows)), 0.34, seed=3)
    assert {r.id for r in held_again} == {r.id for r in held}
    _, other = split_holdout(rows, 0.34, seed=4)
    assert {r.id for r in other} != {r.id for r in held}
    assert split_holdout(rows, 0.0, seed=3) == (rows, [])
    write_holdout(held, tmp_path / "holdout.jsonl")
    scored = read_jsonl([tmp_path / "holdout.jsonl"])
    assert [s.prompt for s in scored] == [r.prompt for r in held]
    assert all(s.category in (None, *COCONOT_CATEGORIES.values()) for s in scored)


def test_token_overrides(tmp_path):
    pairs = parse_token_overrides(["respond=<ok>", "refuse=<no>"], None)
    assert token_texts("binary", pairs) == {"respond": "<ok>", "refuse": "<no>"}
    (tmp_path / "t.json").write_text(json.dumps({"safety": "<unsafe>"}))
    texts = token_texts("categorical", parse_token_overrides([], str(tmp_path / "t.json")))
    assert texts["safety"] == "<unsafe>" and texts["respond"] == default_token_text("respond")
    assert list(texts) == scheme_keys("categorical")
    with pytest.raises(ValueError, match="unknown token keys"):
        token_texts("binary", {"safety": "<x>"})
    with pytest.raises(ValueError, match="distinct"):
        token_texts("binary", {"refuse": "[respond]"})


# -- tokenizer, embeddings, template ---------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_control_tokens_are_single_special_ids(bases, arch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bases[arch])
    before = len(tokenizer)
    texts = list(token_texts("categorical", {}).values())
    ids, new = add_control_tokens(tokenizer, texts)
    assert ids == new == list(range(before, before + len(texts)))
    for text, tid in zip(texts, ids, strict=True):
        assert tokenizer.encode(f"a{text}b", add_special_tokens=False).count(tid) == 1
        assert tokenizer.added_tokens_decoder[tid].special
    assert (
        tokenizer.decode(
            ids + tokenizer.encode(" hi", add_special_tokens=False), skip_special_tokens=True
        )
        == " hi"
    )
    assert add_control_tokens(tokenizer, texts) == (ids, [])  # idempotent
    with pytest.raises(ValueError, match="already special"):
        add_control_tokens(tokenizer, [tokenizer.eos_token])


@pytest.mark.parametrize(("tied", "pad_rows"), [(False, 0), (True, 0), (False, 3)])
def test_new_rows_start_at_the_mean_of_the_base_rows(tmp_path, tied, pad_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_base(tmp_path / "base", "llama", tied=tied, pad_rows=pad_rows)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    n = len(tokenizer)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()
    ids, new = add_control_tokens(tokenizer, list(token_texts("categorical", {}).values()))
    resize_embeddings(model, tokenizer, new, n)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == max(n + len(ids), n + pad_rows) == model.config.vocab_size
    assert (out is emb) == tied
    assert torch.equal(emb[:n], emb_before[:n]) and torch.equal(out[:n], out_before[:n])
    for tid in ids:
        assert torch.allclose(emb[tid], emb_before[:n].mean(dim=0), atol=1e-6)
        assert torch.allclose(out[tid], out_before[:n].mean(dim=0), atol=1e-6)


def test_init_with_mean_skips_reused_rows_and_handles_bias():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(6, 3)
            self.head = torch.nn.Linear(3, 6, bias=True)

        def get_input_embeddings(self):
            return self.emb

        def get_output_embeddings(self):
            return self.head

    model = Tiny()
    before = (
        model.emb.weight.detach().clone(),
        model.head.weight.detach().clone(),
        model.head.bias.detach().clone(),
    )
    init_rows_with_mean(model, [4, 5], base_vocab=5)  # id 4 was inside the base vocab
    keep = [0, 1, 2, 3]
    assert torch.allclose(model.emb.weight[4], before[0][keep].mean(0))
    assert torch.allclose(model.emb.weight[5], before[0][keep].mean(0))
    assert torch.allclose(model.head.weight[5], before[1][keep].mean(0))
    assert torch.allclose(model.head.bias[5], before[2][keep].mean())
    assert torch.equal(model.emb.weight[:4], before[0][:4])


def test_default_template_and_turn_end(bases):
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(bases["llama"])
    assert ensure_chat_template(llama) is True
    chat = [{"role": "user", "content": "Hi"}]
    assert (
        llama.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        == "<s><|user|>Hi</s><|assistant|>"
    )
    assert turn_end_id(llama) == llama.eos_token_id
    qwen = AutoTokenizer.from_pretrained(bases["qwen2"])
    assert ensure_chat_template(qwen) is False and qwen.chat_template == CHATML
    assert turn_end_id(qwen) == qwen.convert_tokens_to_ids("<|im_end|>") != qwen.eos_token_id


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loss_mask_covers_control_response_and_turn_end(trained, arch):
    from transformers import AutoTokenizer

    out = trained[arch].out
    tokenizer = AutoTokenizer.from_pretrained(out)
    manifest = RefusalManifest.load(out)
    end = json.loads((out / tr.INFO_FILE).read_text())["turn_end_id"]
    example = Example("Tell me about your childhood", "[Humanizing requests]", "I am an AI.")
    enc = encode(tokenizer, example, 64, end, keep_prompt=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    body = tokenizer.encode(" I am an AI.", add_special_tokens=False)
    assert enc.input_ids == prompt_ids + [
        manifest.by_text()["[Humanizing requests]"].id,
        *body,
        end,
    ]
    assert enc.decision_index == len(prompt_ids)
    assert enc.labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert enc.labels[len(prompt_ids) :] == enc.input_ids[len(prompt_ids) :]


def test_long_responses_are_clipped_and_long_prompts_skipped(trained, caplog):
    from refusal_training.sft import PromptTooLong
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained["llama"].out)
    eos = tokenizer.eos_token_id
    long = Example("Fix the code I sent", "[Incomplete requests]", "word " * 200)
    enc = encode(tokenizer, long, 40, eos, keep_prompt=True)
    prompt_len = enc.decision_index
    assert len(enc.input_ids) == 40 and enc.input_ids[
        prompt_len
    ] == tokenizer.convert_tokens_to_ids("[Incomplete requests]")
    assert eos not in enc.labels  # a clipped response is not taught to stop mid-sentence
    assert (
        enc.input_ids[:prompt_len]
        == encode(tokenizer, long, 400, eos, keep_prompt=True).input_ids[:prompt_len]
    )
    with pytest.raises(PromptTooLong):
        encode(tokenizer, long, prompt_len, eos, keep_prompt=True)
    assert (
        len(encode(tokenizer, long, 40, eos).input_ids) == 40
    )  # the default clips the prompt side
    short = Example("Hi", "[respond]", "Hello.")
    limit = encode(tokenizer, short, 400, eos, keep_prompt=True).decision_index + 2
    assert limit <= prompt_len
    with caplog.at_level("WARNING"):
        kept = fitting_examples(tokenizer, [long, short], limit, eos)
    assert kept == [short] and "skipped 1 examples" in caplog.text


# -- whole runs ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_output_is_a_complete_refusal_token_model(bases, trained, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, base = trained[arch], bases[arch]
    out = result.out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "refusal_manifest.json", "holdout.jsonl"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / CHECKPOINTS_DIR).exists()
    manifest = RefusalManifest.load(out)
    assert manifest == result.manifest and manifest.scheme == "categorical"
    assert [t.key for t in manifest.tokens] == scheme_keys("categorical")
    tokenizer = AutoTokenizer.from_pretrained(out)
    for token in manifest.tokens:
        assert tokenizer.convert_tokens_to_ids(token.text) == token.id
        assert tokenizer.encode(token.text, add_special_tokens=False) == [token.id]
        assert tokenizer.added_tokens_decoder[token.id].special
        assert token.category == COCONOT_CATEGORIES.get(token.key)
    model = AutoModelForCausalLM.from_pretrained(out)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == model.config.vocab_size == len(tokenizer)  # grown, not padded
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] == (arch == "qwen2")
    assert manifest.dtype == "float32"  # the launcher serves it as saved, not downcast
    # The generation prompt is the base template's, unchanged.
    base_tok = AutoTokenizer.from_pretrained(base)
    ensure_chat_template(base_tok)
    chat = [{"role": "user", "content": "What is two plus two"}]
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        base_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    info = json.loads((out / tr.INFO_FILE).read_text())
    assert info["turn_end_id"] in eos and tokenizer.eos_token_id in eos
    held = {r.prompt for r in read_jsonl([out / "holdout.jsonl"])}
    assert result.holdout == len(held) == 7  # one of 3 per category, 2 of 11 respond rows
    assert result.examples == len(tiny_rows()) - 7 - ("Write me a poem" not in held)
    assert len(info["losses"]) == 5


def test_refuses_to_clobber_and_to_resume_other_runs(bases, data, tmp_path):
    opts = options(
        bases["llama"],
        tmp_path / "out",
        data,
        max_steps=2,
        checkpoint_every=1,
        keep_checkpoints=True,
    )
    tr.train_refusal_model(opts)
    with pytest.raises(FileExistsError):
        tr.train_refusal_model(opts)
    with pytest.raises(FileExistsError, match="finished model"):
        tr.train_refusal_model(replace(opts, resume=True))
    (opts.out / "refusal_manifest.json").unlink()  # as if it had crashed while saving
    with pytest.raises(ValueError, match="other settings"):
        tr.train_refusal_model(replace(opts, resume=True, lr=1e-3))


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C right after a checkpoint."""


def test_resume_continues_at_the_checkpoint_with_identical_results(
    bases, data, tmp_path, monkeypatch
):
    opts = dict(max_steps=6, checkpoint_every=2)
    straight = tr.train_refusal_model(options(bases["qwen2"], tmp_path / "straight", data, **opts))

    save = DirectoryCheckpointer.save

    def save_then_crash(self, model, optimizer, state):
        path = save(self, model, optimizer, state)
        if state.step == 4:
            raise Interrupted
        return path

    monkeypatch.setattr(DirectoryCheckpointer, "save", save_then_crash)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        tr.train_refusal_model(options(bases["qwen2"], out, data, **opts))
    monkeypatch.undo()
    assert sorted(p.name for p in (out / CHECKPOINTS_DIR).iterdir()) == ["step-2", "step-4"]
    assert not (out / "refusal_manifest.json").exists()

    resumed = tr.train_refusal_model(options(bases["qwen2"], out, data, resume=True, **opts))
    assert resumed.resumed_from == 4
    assert resumed.losses == straight.losses
    a, b = load_file(straight.out / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_is_merged_into_plain_weights(bases, data, tmp_path, arch):
    result = tr.train_refusal_model(
        options(
            bases[arch], tmp_path / "lora", data, lora=True, lora_rank=4, lora_dropout=0.0, lr=1e-2
        )
    )
    merged = load_file(result.out / "model.safetensors")
    base = load_file(bases[arch] / "model.safetensors")
    assert merged.keys() == base.keys()  # no lora_A / base_layer / token_adapter keys
    assert not any(
        s in k for k in merged for s in ("lora", "base_layer", "adapter", "modules_to_save")
    )
    config = json.loads((result.out / "config.json").read_text())
    assert "peft" not in json.dumps(config).lower()
    assert not (result.out / "adapter_config.json").exists()
    changed = [k for k in base if "proj" in k and not torch.equal(base[k], merged[k])]
    assert changed  # the adapters were merged
    emb = merged["model.embed_tokens.weight"]
    n = base["model.embed_tokens.weight"].shape[0]
    ids = result.manifest.ids
    assert torch.equal(
        emb[: min(ids)], base["model.embed_tokens.weight"][: min(ids)]
    )  # old rows frozen
    assert emb.shape[0] >= n and len({tuple(emb[i].tolist()) for i in ids}) == len(
        ids
    )  # control rows trained apart


def test_lora_control_rows_learn_at_their_own_rate(bases, data, tmp_path):
    """--token-lr-scale moves the new rows further; the adapters' step is unchanged."""

    def control_rows_and_proj(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        result = tr.train_refusal_model(
            options(bases["llama"], tmp_path / f"s{scale}", data, lora=True, lora_rank=4,
                    lora_dropout=0.0, lr=1e-3, max_steps=3, token_lr_scale=scale)
        )  # fmt: skip
        w = load_file(result.out / "model.safetensors")
        ids = result.manifest.ids
        proj = torch.cat([w[k].flatten() for k in sorted(w) if k.endswith("q_proj.weight")])
        return w["model.embed_tokens.weight"][ids], proj

    base = load_file(bases["llama"] / "model.safetensors")
    base_proj = torch.cat([base[k].flatten() for k in sorted(base) if k.endswith("q_proj.weight")])
    rows_1, proj_1 = control_rows_and_proj(1.0)
    rows_30, proj_30 = control_rows_and_proj(30.0)

    def spread(rows: torch.Tensor) -> torch.Tensor:  # the rows start equal (the mean row)
        return (rows - rows.mean(dim=0)).norm(dim=1).mean()

    assert spread(rows_30) > 5 * spread(rows_1)
    assert (proj_1 - base_proj).norm() == pytest.approx((proj_30 - base_proj).norm(), rel=0.5)


def test_cli_builds_the_options(tmp_path):
    args = tr.parser().parse_args(
        ["--base", "b", "--out", "o", "--data", "x.jsonl", "y.jsonl", "--scheme", "binary",
         "--token", "refuse=<no>", "--lora", "--max-steps", "7", "--holdout-fraction", "0.1"]
    )  # fmt: skip
    opts = tr.options_from_args(args)
    assert opts.scheme == "binary" and opts.tokens == {"refuse": "<no>"} and opts.lora
    assert opts.data == (Path("x.jsonl"), Path("y.jsonl")) and opts.max_steps == 7
    assert opts.holdout_fraction == 0.1
    assert opts.token_lr_scale == 30.0


def test_prompt_weight_scores_the_prompt_and_keeps_the_decision_weight():
    """The demo build's prompt LM loss: prompt positions get plain next-token labels at their weight."""
    from refusal_training.sft import IGNORE, Encoded, _batch

    e = Encoded(input_ids=[5, 6, 7, 8, 9], labels=[IGNORE, IGNORE, IGNORE, 8, 9], decision_index=3)
    short = Encoded(input_ids=[5, 8], labels=[IGNORE, 8], decision_index=1)
    ids, labels, weights, attention, in_prompt = _batch([e, short], pad_id=0, decision_weight=3.0)
    assert labels[0].tolist() == [IGNORE, IGNORE, IGNORE, 8, 9]
    assert weights[0].tolist() == [0, 0, 0, 3.0, 1.0] and weights[1].tolist() == [0, 3.0, 0, 0, 0]
    assert in_prompt[0].tolist() == [True, True, True, False, False]
    assert attention[1].tolist() == [1, 1, 0, 0, 0] and labels[1, 2:].eq(IGNORE).all()
    _, labels, weights, _, _ = _batch([e, short], pad_id=0, decision_weight=3.0, prompt_weight=0.5)
    assert labels[0].tolist() == [5, 6, 7, 8, 9]
    assert weights[0].tolist() == [0.5, 0.5, 0.5, 3.0, 1.0]
    assert weights[1, 2:].eq(0).all()  # padding is never scored
