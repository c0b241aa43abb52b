"""``refusal-gateway train``: make a Hugging Face causal LM a refusal-token model.

    refusal-gateway train --base ./Qwen2.5-0.5B-Instruct --out ./qwen-refusal \\
        --scheme categorical --data coconot.jsonl contrast.jsonl \\
        --holdout-fraction 0.1 --split-seed 0 [--lora] [--resume]

What it does, in order:

1. **Data.** Every ``--data`` file is JSONL with ``prompt``, ``label``
   (``refuse`` | ``respond``), ``category`` (a CoCoNot category name such as
   ``"Requests with safety concerns"``, or its API key ``"safety"``, or null)
   and optionally ``response`` and ``id``. A row's id is its ``id`` field, else
   ``<file name>:<line number>``; ids must be unique.
2. **Holdout.** With ``--holdout-fraction F`` a seeded (``--split-seed``)
   fraction of the rows is held out, stratified by (label, category): in each
   stratum the rows are sorted by id, shuffled with a generator seeded by the
   split seed and the stratum, and the first ``round(F * n)`` are held out. The
   split is a pure function of the rows' ids, labels, categories and the seed,
   so it does not depend on file order and a resumed run holds out the same
   rows. The held-out rows (``id``, ``prompt``, ``label``, ``category``) go to
   ``<out>/holdout.jsonl``, in the format ``refusal-gateway score`` reads, and
   are never trained on: evaluate on exactly that file
   (``refusal-gateway score --model <out> <out>/holdout.jsonl``). Rows are held
   out before responses are checked, so the holdout may contain ``respond``
   rows without a response (scoring needs none).
3. **Examples.** ``respond`` rows become ``[respond] <response>``; a
   ``respond`` row without a response is skipped with a warning (we cannot
   invent answers). ``refuse`` rows become ``<refusal token> <response>``: the
   category's token in the categorical scheme (a refuse row without a category
   is skipped there, with a warning), ``[refuse]`` in the binary scheme. A refuse
   row without a response gets a short refusal text for its category from
   :mod:`.refusal_texts`, chosen by (``--seed``, row id).
4. **Tokens.** The control tokens (``--token key=text``, ``--tokens JSON``,
   default the paper's strings) are added as special tokens (one id each,
   ``normalized=False``, skipped when decoding with ``skip_special_tokens``).
   The embedding matrix grows to ``len(tokenizer)`` when it is smaller (it is
   never padded to a multiple, nor shrunk when a base model already has
   padding rows), and the new tokens' input and output rows (both, when the
   embeddings are untied) start at the mean of the base vocabulary's rows.
5. **Chat template.** The base template is kept unchanged: a prompt is the
   base template's rendering of the user turn with the generation prompt, and
   the model learns to emit the control token as the first assistant token,
   followed by the response and the token that ends an assistant turn in that
   template (``<|im_end|>``, ``<|eot_id|>``, ... found by rendering a turn;
   the eos otherwise, and it is added to ``generation_config.json``'s eos ids
   so vLLM stops there). A base model without a chat template gets
   :data:`DEFAULT_CHAT_TEMPLATE` with its own eos (and bos, if it has one).
   *History:* earlier assistant turns are rendered by the base template as
   given. The gateway returns text without control tokens, so clients send
   history without them, and training uses single-turn prompts only: the
   decision is learnt for the newest assistant turn, and earlier turns are
   ordinary context.
6. **Training.** Loss on the assistant turn only (control token + response +
   end of turn), the decision token weighted by ``--decision-weight``. An
   example is at most ``--max-length`` tokens: the prompt is kept whole (the
   decision depends on all of it; an example whose prompt does not fit is
   skipped, with a warning) and a long response is clipped, without its end
   of turn. A full fine-tune by default, or ``--lora`` (LoRA on the attention
   / MLP projections, i.e. every linear layer but the output one unless
   ``--lora-targets`` names modules, plus the new tokens' embedding rows,
   merged into the base weights with ``merge_and_unload`` before saving). Every
   ``--checkpoint-every`` steps the trainable weights, optimizer, RNG states and
   step go to ``<out>/checkpoints/step-N`` (the newest two are kept);
   ``--resume`` continues from the newest one with exactly the batches and
   random numbers an uninterrupted run would have used. A checkpoint records a
   fingerprint of the run's settings and data, and resuming with different
   ones is refused.
7. **Output.** ``<out>`` holds what vLLM loads unchanged: ``config.json``,
   safetensors weights, the tokenizer files (with the chat template),
   ``generation_config.json`` and ``refusal_manifest.json`` (written last, so a
   directory with a manifest is a finished model), plus ``train_info.json``
   (settings and losses) and ``holdout.jsonl`` when a holdout was asked for.
   Checkpoints are deleted after a successful run unless
   ``--keep-checkpoints``.

Nothing here touches the network: the base model must be a local directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_plugins.vocab import (
    COCONOT_CATEGORIES,
    MANIFEST_FILE,
    REFUSE_KEY,
    RESPOND_KEY,
    ControlToken,
    RefusalManifest,
    Scheme,
    default_token_text,
    scheme_keys,
)

from .refusal_texts import refusal_text

if TYPE_CHECKING:  # heavy imports stay out of `refusal-gateway --help`
    import torch

    from .sft import Example, LoopState

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
HOLDOUT_FILE = "holdout.jsonl"
INFO_FILE = "train_info.json"
KEEP_LAST_CHECKPOINTS = 2
LABELS = ("refuse", "respond")
KEY_OF_CATEGORY = {name: key for key, name in COCONOT_CATEGORIES.items()}

#: For base models without a chat template (as in the demo model, but with
#: the model's own end-of-sequence text): role tags are plain text.
#: ``@BOS@`` / ``@EOS@`` become Jinja string literals of the tokenizer's texts.
DEFAULT_CHAT_TEMPLATE = (
    "{{ @BOS@ }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + @EOS@ }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# -- options -------------------------------------------------------------------
@dataclass(frozen=True)
class TrainOptions:
    """Everything ``refusal-gateway train`` takes (the CLI flags, one to one)."""

    base: Path
    out: Path
    data: tuple[Path, ...]
    scheme: Scheme = "categorical"
    tokens: dict[str, str] = field(default_factory=dict)  # key -> text overrides
    max_steps: int | None = None  # default: two epochs
    batch_size: int = 8
    lr: float | None = None  # default: 1e-5 full fine-tune, 2e-4 LoRA
    warmup_steps: int | None = None  # default: min(30, steps // 10)
    max_length: int = 512
    decision_weight: float = 3.0
    weight_decay: float = 0.0
    seed: int = 0
    split_seed: int = 0
    holdout_fraction: float = 0.0
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ()  # default: every linear layer but the output
    checkpoint_every: int = 100  # 0: never
    resume: bool = False
    keep_checkpoints: bool = False
    overwrite: bool = False
    device: str | None = None  # default: cuda if available
    dtype: str = "float32"  # training dtype
    save_dtype: str = "auto"  # the base model's dtype


def token_texts(scheme: Scheme, overrides: dict[str, str]) -> dict[str, str]:
    """Token text per key of the scheme, in manifest order; overrides validated."""
    keys = scheme_keys(scheme)
    unknown = set(overrides) - set(keys)
    if unknown:
        raise ValueError(
            f"unknown token keys for the {scheme} scheme: {sorted(unknown)} (keys: {keys})"
        )
    texts = {key: overrides.get(key, default_token_text(key)) for key in keys}
    if any(not t.strip() for t in texts.values()):
        raise ValueError("control-token texts must not be empty")
    if len(set(texts.values())) != len(texts):
        raise ValueError(f"control-token texts must be distinct: {texts}")
    return texts


def parse_token_overrides(pairs: Sequence[str], mapping: str | None) -> dict[str, str]:
    """``key=text`` pairs and/or a JSON object (inline or a file path) -> {key: text}."""
    out: dict[str, str] = {}
    if mapping:
        inline = mapping.lstrip().startswith("{")
        data = json.loads(mapping if inline else Path(mapping).read_text())
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError("--tokens must be a JSON object of key -> token text")
        out.update(data)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--token expects key=text, got {pair!r}")
        out[key.strip()] = text
    return out


# -- data ----------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One labelled prompt of the training data."""

    id: str
    prompt: str
    label: str  # refuse | respond
    category: str | None  # API key (``safety``, ...) or None
    response: str | None


def _category_key(value: Any, where: str) -> str | None:
    """A row's category as an API key; CoCoNot names and keys are both accepted."""
    if value is None or value == "":
        return None
    if value in COCONOT_CATEGORIES:
        return value
    if value in KEY_OF_CATEGORY:
        return KEY_OF_CATEGORY[value]
    raise ValueError(
        f"{where}: unknown category {value!r} (expected one of {sorted(KEY_OF_CATEGORY)})"
    )


def load_rows(paths: Sequence[Path]) -> list[Row]:
    """Read and validate JSONL rows; fail early, naming the file and line."""
    rows: list[Row] = []
    seen: set[str] = set()
    for path in paths:
        for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            raw = json.loads(line)
            if raw.get("label") not in LABELS:
                raise ValueError(
                    f"{where}: label must be one of {LABELS}, got {raw.get('label')!r}"
                )
            if not isinstance(raw.get("prompt"), str) or not raw["prompt"].strip():
                raise ValueError(f"{where}: missing prompt")
            row_id = str(raw["id"]) if raw.get("id") is not None else f"{Path(path).name}:{lineno}"
            if row_id in seen:
                raise ValueError(
                    f"{where}: duplicate row id {row_id!r} (give rows unique 'id' fields)"
                )
            seen.add(row_id)
            response = raw.get("response")
            rows.append(
                Row(
                    id=row_id,
                    prompt=raw["prompt"],
                    label=raw["label"],
                    category=_category_key(raw.get("category"), where),
                    response=response if isinstance(response, str) and response.strip() else None,
                )
            )
    return rows


def split_holdout(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, holdout): a seeded, stratified (label, category) holdout; see the module doc."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(rows), []
    strata: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        strata.setdefault((row.label, row.category or ""), []).append(row)
    held: set[str] = set()
    for (label, category), members in sorted(strata.items()):
        members = sorted(members, key=lambda r: r.id)
        random.Random(f"holdout:{seed}:{label}:{category}").shuffle(members)
        held.update(r.id for r in members[: math.floor(fraction * len(members) + 0.5)])
    return [r for r in rows if r.id not in held], [r for r in rows if r.id in held]


def write_holdout(rows: Sequence[Row], path: Path) -> None:
    """Held-out rows in the format ``refusal-gateway score`` reads (CoCoNot names)."""
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            category = COCONOT_CATEGORIES[r.category] if r.category else None
            record = {"id": r.id, "prompt": r.prompt, "label": r.label, "category": category}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def rows_to_examples(
    rows: Sequence[Row], scheme: Scheme, texts: dict[str, str], seed: int
) -> list[Example]:
    """Training examples of the rows; rows that cannot be trained on are skipped, with a warning."""
    from .sft import Example

    examples = []
    no_answer, no_category = [], []
    for row in rows:
        if row.label == "respond":
            if row.response is None:
                no_answer.append(row.id)
                continue
            examples.append(Example(row.prompt, texts[RESPOND_KEY], row.response))
            continue
        if scheme == "binary":
            key = REFUSE_KEY
        elif row.category is None:
            no_category.append(row.id)
            continue
        else:
            key = row.category
        response = row.response or refusal_text(row.category or REFUSE_KEY, row.id, seed)
        examples.append(Example(row.prompt, texts[key], response))
    if no_answer:
        logger.warning(
            "skipped %d respond rows without a response (e.g. %s): answers are not invented",
            len(no_answer),
            ", ".join(no_answer[:3]),
        )
    if no_category:
        logger.warning(
            "skipped %d refuse rows without a category (e.g. %s): the categorical scheme needs one",
            len(no_category),
            ", ".join(no_category[:3]),
        )
    return examples


# -- tokenizer and embeddings --------------------------------------------------
def add_control_tokens(tokenizer, texts: Sequence[str]) -> tuple[list[int], list[int]]:
    """Add ``texts`` as special tokens; return (their ids, the ids that are new).

    A text already in the vocabulary keeps its id (and its trained rows); it
    may not be one of the tokenizer's own special tokens (eos, pad, ...).
    """
    from tokenizers import AddedToken

    own_specials = set(tokenizer.all_special_tokens) - set(tokenizer.extra_special_tokens or [])
    clash = set(texts) & own_specials
    if clash:
        raise ValueError(
            f"control tokens {sorted(clash)} are already special tokens of the base tokenizer"
        )
    before = tokenizer.get_vocab()
    previous_specials = set(tokenizer.extra_special_tokens or [])
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in texts]},
        replace_extra_special_tokens=False,
    )
    ids = [tokenizer.convert_tokens_to_ids(t) for t in texts]
    for text, tid in zip(texts, ids, strict=True):
        if tokenizer.encode(text, add_special_tokens=False) != [tid]:
            raise ValueError(f"control token {text!r} does not encode to its single id {tid}")
        if text in before:  # e.g. retraining a refusal-token model: fine; an ordinary word: odd
            log = logger.info if text in previous_specials else logger.warning
            log("control token %r is already in the vocabulary (id %d); reusing it", text, tid)
    return ids, [tid for text, tid in zip(texts, ids, strict=True) if text not in before]


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def init_rows_with_mean(model, new_ids: Sequence[int], base_vocab: int) -> None:
    """Set the new tokens' embedding rows to the mean of the base vocabulary's rows.

    The mean keeps a new token's initial logit and hidden state in the range
    of ordinary tokens (a random row can dominate or vanish). Rows of the base
    vocabulary (ids < ``base_vocab``, the new ids excluded) form the mean; the
    output matrix gets its own mean when it is not tied to the input one.
    """
    import torch

    if not new_ids:
        return
    idx = torch.tensor(sorted(set(new_ids)), dtype=torch.long)
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and not _tied(model):
        matrices.append(out.weight)
    with torch.no_grad():
        for weight in matrices:
            keep = torch.ones(min(base_vocab, weight.shape[0]), dtype=torch.bool)
            keep[idx[idx < keep.numel()]] = False
            mean = weight[: keep.numel()][keep].float().mean(dim=0)
            weight[idx.to(weight.device)] = mean.to(weight.dtype).to(weight.device)
        bias = getattr(out, "bias", None)
        if bias is not None:
            keep = torch.ones(min(base_vocab, bias.shape[0]), dtype=torch.bool)
            keep[idx[idx < keep.numel()]] = False
            bias[idx.to(bias.device)] = bias[: keep.numel()][keep].float().mean().to(bias.dtype)


def resize_embeddings(model, tokenizer, new_ids: Sequence[int], base_vocab: int) -> None:
    """Grow the embeddings to ``len(tokenizer)`` (never pad, never shrink) and mean-init new rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        logger.info("embeddings resized from %d to %d rows", rows, len(tokenizer))
    init_rows_with_mean(model, new_ids, base_vocab)


def default_chat_template(tokenizer) -> str:
    """:data:`DEFAULT_CHAT_TEMPLATE` with the tokenizer's own eos / bos texts baked in."""
    if tokenizer.eos_token is None:
        raise ValueError("the base tokenizer has no eos token; cannot end assistant turns")
    literals = {
        "BOS": json.dumps(tokenizer.bos_token or ""),
        "EOS": json.dumps(tokenizer.eos_token),
    }
    return re.sub(r"@(BOS|EOS)@", lambda m: literals[m.group(1)], DEFAULT_CHAT_TEMPLATE)


def ensure_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer the default chat template; True if it did."""
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = default_chat_template(tokenizer)
    logger.info("base model has no chat template; using the default one")
    return True


def _is_special(tokenizer, token_id: int) -> bool:
    """A special token of the tokenizer, named in its map or only flagged as added-special."""
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or (added is not None and added.special)


def turn_end_id(tokenizer) -> int:
    """The token that closes an assistant turn in the chat template (eos if none is found).

    Rendering a finished assistant turn shows what the template puts after
    the content; a special token there (``<|im_end|>``, ``<|eot_id|>``) is
    what the model should emit to end its turn.
    """
    sentinel = "Zq7xRefusalSentinel"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sentinel}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as exc:  # templates raise arbitrary errors
        logger.info("could not render an assistant turn (%s); ending turns with eos", exc)
        return tokenizer.eos_token_id
    if sentinel in text:
        tail = tokenizer.encode(text.split(sentinel, 1)[1], add_special_tokens=False)
        if tail and _is_special(tokenizer, tail[0]):
            return tail[0]
    return tokenizer.eos_token_id


def fitting_examples(
    tokenizer, examples: Sequence[Example], max_length: int, end_id: int
) -> list[Example]:
    """The examples whose whole prompt fits ``max_length``; the rest are skipped, with a warning.

    A truncated prompt is a different request (the decision depends on all of
    it), so long prompts are dropped rather than cut; long responses are
    clipped instead (see :func:`.sft.encode` with ``keep_prompt``).
    """
    from .sft import PromptTooLong, encode

    kept, clipped = [], 0
    for example in examples:
        try:
            enc = encode(tokenizer, example, max_length, end_id, keep_prompt=True)
        except PromptTooLong:
            continue
        kept.append(example)
        clipped += enc.input_ids[-1] != end_id
    if len(kept) < len(examples):
        logger.warning(
            "skipped %d examples whose prompt does not fit --max-length %d",
            len(examples) - len(kept),
            max_length,
        )
    if clipped:
        logger.info("%d responses clipped to --max-length %d", clipped, max_length)
    if not kept:
        raise ValueError(f"no example fits --max-length {max_length}")
    return kept


# -- LoRA ----------------------------------------------------------------------
def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def apply_lora(model, options: TrainOptions, control_ids: Sequence[int]):
    """Wrap ``model`` with LoRA adapters plus trainable rows for the control tokens.

    Without trainable control rows the new tokens would keep their identical
    mean initialisation and the model could not tell them apart.
    """
    from peft import LoraConfig, get_peft_model

    ids = sorted(set(control_ids))
    if _tied(model):
        trainable_tokens: list[int] | dict[str, list[int]] = ids
    else:
        trainable_tokens = {
            _module_name(model, model.get_input_embeddings()): ids,
            _module_name(model, model.get_output_embeddings()): ids,
        }
    config = LoraConfig(
        r=options.lora_rank,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=list(options.lora_targets) or "all-linear",
        trainable_token_indices=trainable_tokens,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA: %d trainable parameters", trainable)
    return peft_model


# -- checkpoints ---------------------------------------------------------------
class DirectoryCheckpointer:
    """``<out>/checkpoints/step-N``: trainable weights, optimizer, RNG states, loop state.

    Only the parameters that train are saved (all of them for a full
    fine-tune, adapters and token rows for LoRA); the rest is rebuilt from the
    base model by the same deterministic setup.
    """

    def __init__(self, root: Path, every: int, fingerprint: str, resume: bool):
        self.root, self.every, self.fingerprint, self.resume = root, every, fingerprint, resume
        self.restored_step: int | None = None

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        found = [p for p in self.root.glob("step-*") if (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))

    def restore(self, model, optimizer) -> LoopState | None:
        import torch
        from safetensors.torch import load_file

        from .sft import LoopState

        if not self.resume:
            return None
        found = self.checkpoints()
        if not found:
            logger.info("no checkpoint under %s; starting from step 0", self.root)
            return None
        latest = found[-1]
        meta = json.loads((latest / "state.json").read_text())
        if meta["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"{latest} was written by a run with other settings or data; "
                "resume with the same options, or start over with --overwrite"
            )
        weights = load_file(latest / "trainable.safetensors")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != set(params):
            raise ValueError(f"{latest} does not match the model's trainable parameters")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name].to(param.device))
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", map_location="cpu"))
        rng = torch.load(latest / "rng.pt", weights_only=True)
        self.restored_step = meta["step"]
        logger.info("restored %s", latest)
        return LoopState(
            step=meta["step"],
            losses=meta["losses"],
            batches=meta["batches"],
            rng_state=rng["python"],
            torch_rng_state=rng["torch"],
            cuda_rng_state=rng["cuda"],
        )

    def after_step(self, model, optimizer, state: LoopState, total_steps: int) -> None:
        if self.every <= 0 or state.step % self.every or state.step >= total_steps:
            return  # the finished model is saved by the caller
        self.save(model, optimizer, state)

    def save(self, model, optimizer, state: LoopState) -> Path:
        """Write ``step-N`` atomically (a temp dir renamed), then drop old checkpoints."""
        import torch
        from safetensors.torch import save_file

        final = self.root / f"step-{state.step}"
        tmp = self.root / f".step-{state.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {
            n: p.detach().to("cpu").contiguous()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {
            "python": state.rng_state,
            "torch": state.torch_rng_state,
            "cuda": state.cuda_rng_state,
        }
        torch.save(rng, tmp / "rng.pt")
        meta = {
            "step": state.step,
            "fingerprint": self.fingerprint,
            "losses": state.losses,
            "batches": state.batches,
        }
        (tmp / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.checkpoints()[:-KEEP_LAST_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", final)
        return final


# -- the run -------------------------------------------------------------------
def _fingerprint(options: TrainOptions, texts: dict[str, str]) -> str:
    """Hash of what decides the run's numbers: settings, token texts, data, base config."""
    h = hashlib.sha256()
    skip = {
        "out",
        "resume",
        "keep_checkpoints",
        "overwrite",
        "checkpoint_every",
        "device",
        "data",
        "base",
        "save_dtype",
    }
    settings = {k: v for k, v in asdict(options).items() if k not in skip}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(texts, sort_keys=True).encode())
    for path in options.data:
        h.update(Path(path).read_bytes())
    h.update((Path(options.base) / "config.json").read_bytes())
    return h.hexdigest()[:16]


def _prepare_out_dir(options: TrainOptions) -> None:
    """Refuse to clobber a non-empty directory unless resuming or told to overwrite."""
    out = Path(options.out)
    if out.resolve() == Path(options.base).resolve():
        raise ValueError("--out must differ from --base")
    if out.exists() and any(out.iterdir()) and not (options.resume or options.overwrite):
        raise FileExistsError(f"{out} is not empty: pass --resume to continue a run or --overwrite")
    finished = (out / MANIFEST_FILE).is_file()
    if options.resume and finished and not options.overwrite:
        raise FileExistsError(f"{out} holds a finished model; --overwrite to train it again")
    if options.overwrite:
        # A stale manifest would mark half-written weights as a finished model.
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        if not options.resume:
            shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _generation_config(base: Path, tokenizer, end_id: int):
    """The base model's generation config, with the turn end among its eos ids."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(base, local_files_only=True)
    except OSError:
        config = GenerationConfig()
    eos = config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    for tid in (end_id, tokenizer.eos_token_id):
        if tid is not None and tid not in eos_ids:
            eos_ids.append(tid)
    config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if config.pad_token_id is None:
        config.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    return config


def _manifest(
    scheme: Scheme, texts: dict[str, str], ids: Sequence[int], base: Path
) -> RefusalManifest:
    tokens = tuple(
        ControlToken(key=key, text=texts[key], id=tid, category=COCONOT_CATEGORIES.get(key))
        for key, tid in zip(scheme_keys(scheme), ids, strict=True)
    )
    extra = {"base_model": str(base), "created_by": "refusal-gateway train"}
    return RefusalManifest(scheme=scheme, tokens=tokens, extra=extra)


def _resolve_dtype(name: str) -> torch.dtype:
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r} (one of {sorted(dtypes)})")
    return dtypes[name]


def _base_dtype(base: Path) -> str:
    """The dtype the base weights were saved in (config.json), float32 if unsaid."""
    config = json.loads((base / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name.removeprefix("torch.")


@dataclass
class TrainResult:
    """What a finished run reports (also written to ``train_info.json``)."""

    out: Path
    manifest: RefusalManifest
    losses: list[float]
    examples: int
    holdout: int
    resumed_from: int | None


def train_refusal_model(options: TrainOptions) -> TrainResult:
    """Run the whole recipe of the module docstring; return where the model went."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sft import TrainConfig, train

    started = time.monotonic()
    base, out = Path(options.base), Path(options.out)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"{base} is not a local Hugging Face model directory (no config.json)"
        )
    texts = token_texts(options.scheme, options.tokens)
    rows = load_rows(options.data)
    train_rows, holdout = split_holdout(rows, options.holdout_fraction, options.split_seed)
    examples = rows_to_examples(train_rows, options.scheme, texts, options.seed)
    if not examples:
        raise ValueError("no trainable rows in the data")
    logger.info(
        "%d rows: %d training examples, %d held out", len(rows), len(examples), len(holdout)
    )
    _prepare_out_dir(options)
    if holdout:
        write_holdout(holdout, out / HOLDOUT_FILE)

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    default_template = ensure_chat_template(tokenizer)
    base_vocab = len(tokenizer)
    control_ids, new_ids = add_control_tokens(tokenizer, list(texts.values()))
    end_id = turn_end_id(tokenizer)
    examples = fitting_examples(tokenizer, examples, options.max_length, end_id)

    torch.manual_seed(options.seed)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=_resolve_dtype(options.dtype), local_files_only=True
    )
    save_dtype = _resolve_dtype(
        _base_dtype(base) if options.save_dtype == "auto" else options.save_dtype
    )
    resize_embeddings(model, tokenizer, new_ids, base_vocab)
    model.to(device)
    if options.lora:
        model = apply_lora(model, options, control_ids)

    steps = options.max_steps or max(1, math.ceil(2 * len(examples) / options.batch_size))
    config = TrainConfig(
        steps=steps,
        batch_size=options.batch_size,
        lr=options.lr if options.lr is not None else (2e-4 if options.lora else 1e-5),
        warmup_steps=options.warmup_steps
        if options.warmup_steps is not None
        else min(30, steps // 10),
        weight_decay=options.weight_decay,
        decision_weight=options.decision_weight,
        max_length=options.max_length,
        seed=options.seed,
    )
    checkpointer = DirectoryCheckpointer(
        out / CHECKPOINTS_DIR,
        options.checkpoint_every,
        _fingerprint(options, texts),
        options.resume,
    )
    losses = train(
        model,
        tokenizer,
        examples,
        config,
        eos_id=end_id,
        keep_prompt=True,
        checkpointer=checkpointer,
    )

    if options.lora:
        model = model.merge_and_unload()
    model.to("cpu").to(save_dtype)
    model.save_pretrained(out)
    tokenizer.init_kwargs.pop("local_files_only", None)  # a load option, not a property
    tokenizer.save_pretrained(out)
    _generation_config(base, tokenizer, end_id).save_pretrained(out)
    manifest = _manifest(options.scheme, texts, control_ids, base)
    result = TrainResult(
        out, manifest, losses, len(examples), len(holdout), checkpointer.restored_step
    )
    info = {
        "options": asdict(options),
        "train_config": asdict(config),
        "examples": len(examples),
        "holdout": len(holdout),
        "default_chat_template": default_template,
        "turn_end_id": end_id,
        "resumed_from_step": checkpointer.restored_step,
        "losses": losses,
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    manifest.save(out)  # last: a manifest marks a finished model
    if not options.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    logger.info("refusal-token model written to %s (final loss %.3f)", out, losses[-1])
    return result


# -- command line --------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``refusal-gateway train`` (kept here, next to what they control)."""
    d = TrainOptions(base=Path(), out=Path(), data=())
    parser.add_argument(
        "--base", type=Path, required=True, help="local Hugging Face causal-LM directory"
    )
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        help="JSONL files (prompt, label, category, response)",
    )
    parser.add_argument("--scheme", choices=["binary", "categorical"], default=d.scheme)
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="KEY=TEXT",
        help='token text override, e.g. respond="<respond>" (repeatable)',
    )
    parser.add_argument(
        "--tokens", metavar="JSON", help="token texts as a JSON object or a JSON file path"
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps (default: two epochs)"
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 1e-5, 2e-4 with --lora)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warm-up (default min(30, steps/10))"
    )
    parser.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example")
    parser.add_argument(
        "--decision-weight",
        type=float,
        default=d.decision_weight,
        help="loss weight of the control token",
    )
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="training seed (batches, init, refusal texts)"
    )
    parser.add_argument(
        "--split-seed", type=int, default=d.split_seed, help="seed of the holdout split"
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=d.holdout_fraction,
        help="fraction held out to <out>/holdout.jsonl",
    )
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters and merge them")
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank)
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    parser.add_argument(
        "--lora-targets", nargs="+", default=[], help="module names (default: all linear layers)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="steps between checkpoints (0: none)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in <out>"
    )
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep checkpoints after success"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--dtype", default=d.dtype, choices=["float32", "bfloat16"], help="training dtype"
    )
    parser.add_argument(
        "--save-dtype",
        default=d.save_dtype,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the saved weights (auto: the base model's)",
    )


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """Parsed flags -> :class:`TrainOptions`."""
    return TrainOptions(
        base=args.base,
        out=args.out,
        data=tuple(args.data),
        scheme=args.scheme,
        tokens=parse_token_overrides(args.token, args.tokens),
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        max_length=args.max_length,
        decision_weight=args.decision_weight,
        weight_decay=args.weight_decay,
        seed=args.seed,
        split_seed=args.split_seed,
        holdout_fraction=args.holdout_fraction,
        lora=args.lora,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=tuple(args.lora_targets),
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        overwrite=args.overwrite,
        device=args.device,
        dtype=args.dtype,
        save_dtype=args.save_dtype,
    )
