"""Build the embedded demo model: a small refusal-token Llama trained from scratch.

Everything comes from the project itself: the corpus in ``training/refusal_training/demo/``
(written by us: handwritten rows plus rows composed from our own templates by
``demo/compose.py``), a byte-level BPE tokenizer trained on it with the six control
tokens of the paper's categorical scheme as special tokens, and a chat template
that puts the control token first in the assistant turn. The build is
deterministic (fixed seeds, one thread) and cached under a key that hashes the
corpus, the recipe and this module's version, so a rebuild happens only when
one of those changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from refusal_plugins.vocab import (
    COCONOT_CATEGORIES,
    RESPOND_KEY,
    RefusalManifest,
    default_token_text,
    scheme_keys,
)

from .paths import cache_root
from .sft import Example, TrainConfig, train

logger = logging.getLogger(__name__)

BUILD_VERSION = 4  # bump when the build code changes what it produces
DONE_FILE = "build_info.json"

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
EOS = "<|end|>"
PAD = "<|pad|>"

#: The control token opens the assistant turn; the model writes it, the
#: template only opens the turn (history turns are rendered as given).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class DemoRecipe:
    """Architecture and training knobs of the demo model (part of the cache key)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4  # head_dim 64: a size vLLM's CPU attention supports
    max_positions: int = 512
    # Handwritten corpus rows are seen this many times per epoch, composed rows once:
    # the composed ones repeat their templates, the handwritten ones carry the variety.
    written_repeats: int = 4
    # Pinned here, not taken from TrainConfig's defaults: they are part of the cache key.
    # prompt_weight and prompt_dropout matter most: without them the model learns the
    # composed rows' templates instead of what prompts ask (CoCoNot AUROC ~0.64, not ~0.8).
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=300, batch_size=32, lr=2e-3, min_lr_ratio=0.1, warmup_steps=30,
            weight_decay=0.01, decision_weight=3.0, max_length=128, seed=0,
            prompt_weight=0.5, prompt_dropout=0.15,
        )
    )


def corpus_path() -> Path:
    return Path(str(resources.files("refusal_training") / "demo" / "corpus.jsonl"))


# Sources the demo model does not train on: the rows written for the SmolLM2 decision head
# after the demo was measured. The short questions (fitted mostly on the corpus, the head took
# plain factual questions for underspecified ones) and the minimal pairs of ``written-2.jsonl``;
# the from-scratch demo's operating point moves with any change of its training stream
# (CoCoNot safety prompts refused 42 -> 13 % with the short questions), and it is the test
# suite's model, so it keeps the rows it was measured on.
NOT_FOR_DEMO = frozenset({"short-question", "written-2"})


def load_corpus(path: Path | None = None, written_repeats: int = 1) -> list[Example]:
    """Read the corpus as training examples (category -> control-token text).

    Rows whose ``source`` is ``written`` (handwritten, see ``demo/compose.py``)
    appear ``written_repeats`` times; families in :data:`NOT_FOR_DEMO` are left out.
    """
    by_category = {name: default_token_text(key) for key, name in COCONOT_CATEGORIES.items()}
    examples = []
    for line in (path or corpus_path()).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("source") in NOT_FOR_DEMO:
            continue
        if row["label"] == "respond":
            control = default_token_text(RESPOND_KEY)
        else:
            control = by_category[row["category"]]
        repeats = written_repeats if row.get("source", "written") == "written" else 1
        examples += [Example(row["prompt"], control, row["response"])] * repeats
    return examples


def cache_key(recipe: DemoRecipe, corpus: Path | None = None) -> str:
    h = hashlib.sha256()
    h.update((corpus or corpus_path()).read_bytes())
    h.update(json.dumps(asdict(recipe), sort_keys=True).encode())
    h.update(f"build-version={BUILD_VERSION}".encode())
    return h.hexdigest()[:16]


def demo_model_dir(cache_dir: Path | None = None, recipe: DemoRecipe | None = None) -> Path:
    """Where the demo model for the current corpus and recipe lives (built or not).

    ``cache_dir`` defaults to the settings' (``REFUSAL_GATEWAY_CACHE_DIR``).
    """
    recipe = recipe or DemoRecipe()
    root = cache_root(cache_dir)
    return root / "models" / f"demo-{cache_key(recipe)}"


def is_built(model_dir: Path) -> bool:
    return (model_dir / DONE_FILE).is_file()


def _train_tokenizer(examples: list[Example], recipe: DemoRecipe):
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [t for e in examples for t in (e.prompt, " " + e.response)]
    tok.train_from_iterator(texts, trainer)
    controls = [default_token_text(k) for k in scheme_keys("categorical")]
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in controls])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=recipe.max_positions,
    )


def _manifest(tokenizer) -> RefusalManifest:
    texts = {key: default_token_text(key) for key in scheme_keys("categorical")}
    ids = {key: tokenizer.convert_tokens_to_ids(text) for key, text in texts.items()}
    return RefusalManifest.build("categorical", texts, ids, extra={"dtype": "float32"})


def build_demo_model(
    out_dir: Path | None = None, recipe: DemoRecipe | None = None, force: bool = False
) -> Path:
    """Build (or reuse) the demo model and return its directory."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    recipe = recipe or DemoRecipe()
    out_dir = out_dir or demo_model_dir(recipe=recipe)
    if is_built(out_dir) and not force:
        return out_dir
    started = time.monotonic()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic BPE merges
    examples = load_corpus(written_repeats=recipe.written_repeats)
    tokenizer = _train_tokenizer(examples, recipe)
    torch.manual_seed(recipe.train.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # One thread, as the BPE: the same weights on any machine, and no slowdown from
    # oversubscribed cores (CI runners, a busy laptop); a model this small gains little
    # from a second thread anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = train(model, tokenizer, examples, recipe.train)
    finally:
        torch.set_num_threads(threads)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _manifest(tokenizer).save(tmp)
    info = {
        "recipe": asdict(recipe),
        "examples": len(examples),
        "final_loss": sum(losses[-20:]) / min(20, len(losses)),
        "seconds": round(time.monotonic() - started, 1),
        "key": cache_key(recipe),
    }
    (tmp / DONE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    logger.info("built demo model in %.0fs at %s (final loss %.3f)", info["seconds"], out_dir, info["final_loss"])
    return out_dir
