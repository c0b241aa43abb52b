"""``refusal-gateway train``: make a Hugging Face causal LM a refusal-token model.

    refusal-gateway train --base ./Qwen2.5-0.5B-Instruct --out ./qwen-refusal \\
        --scheme categorical --data coconot.jsonl contrast.jsonl \\
        --holdout-fraction 0.1 --split-seed 0 [--lora] [--resume]

This module runs the recipe and owns its options and flags; each step's rules
are in the module that does it. What it does, in order:

1. **Data** (:mod:`.train_data`). JSONL rows (``prompt``, ``label``,
   ``category``, optional ``response`` and ``id``) are read and validated.
2. **Holdout** (:mod:`.train_data`). With ``--holdout-fraction`` a seeded,
   stratified fraction of the rows goes to ``<out>/holdout.jsonl`` and is never
   trained on: evaluate on exactly that file
   (``refusal-gateway score --model <out> <out>/holdout.jsonl``).
3. **Examples** (:mod:`.train_data`). Each row becomes the prompt, its control
   token and a response; rows that cannot be trained on are skipped, with a
   warning.
4. **Tokens** (:mod:`.control_tokens`). The control tokens are added as special
   tokens and their new embedding rows start at the base vocabulary's mean.
5. **Chat template** (:mod:`.chat_template`). The base template is kept (a
   template-less base gets a default one); the model learns to emit the
   control token first in the assistant turn, then the response and the token
   that ends the turn (also an eos id of ``generation_config.json``).
6. **Training** (:mod:`.sft`). Loss on the assistant turn only (control token
   + response + end of turn), the decision token weighted by
   ``--decision-weight``. An example is at most ``--max-length`` tokens (the
   prompt is kept whole, a long response is clipped). A full fine-tune by
   default, or ``--lora`` (:mod:`.lora`: adapters plus the new tokens'
   embedding rows, merged into the base weights before saving; the rows
   learn at ``--token-lr-scale`` x the learning rate, default 30, because
   they start identical and must move much further than the adapters: at 1x
   SmolLM2's argmax never refused after 120 steps). Checkpoints
   every ``--checkpoint-every`` steps, and ``--resume`` from the newest one
   with the same settings and data (:mod:`.checkpoints`).
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
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from refusal_plugins.vocab import MANIFEST_FILE, RefusalManifest

from .chat_template import ensure_chat_template, generation_config, turn_end_id
from .checkpoints import CHECKPOINTS_DIR, DirectoryCheckpointer, run_fingerprint
from .control_tokens import (
    add_control_tokens,
    parse_token_overrides,
    resize_embeddings,
    token_texts,
)
from .lora import apply_lora
from .options_cli import add_options_arguments, options_from_namespace
from .train_data import fitting_examples, load_rows, rows_to_examples, split_holdout, write_holdout
from .train_options import TrainOptions

if TYPE_CHECKING:  # heavy imports stay out of `refusal-gateway --help`
    import torch

logger = logging.getLogger(__name__)

HOLDOUT_FILE = "holdout.jsonl"
INFO_FILE = "train_info.json"

__all__ = ["HOLDOUT_FILE", "INFO_FILE", "TrainOptions", "TrainResult", "main", "train_refusal_model"]


# -- the run -------------------------------------------------------------------
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
    save_name = _base_dtype(base) if options.save_dtype == "auto" else options.save_dtype
    save_dtype = _resolve_dtype(save_name)
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
        run_fingerprint(options, texts),
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
        # peft's TrainableTokens deltas: the new rows, trained in full next to the adapters.
        lr_scales={"trainable_tokens": options.token_lr_scale} if options.lora else None,
        max_minutes=options.max_minutes,
    )

    if options.lora:
        model = model.merge_and_unload()
    model.to("cpu").to(save_dtype)
    model.save_pretrained(out)
    tokenizer.init_kwargs.pop("local_files_only", None)  # a load option, not a property
    tokenizer.save_pretrained(out)
    generation_config(base, tokenizer, end_id).save_pretrained(out)
    manifest = RefusalManifest.build(
        options.scheme,
        texts,
        dict(zip(texts, control_ids, strict=True)),
        # Served in the precision it was saved in (RefusalManifest.dtype): vLLM would
        # otherwise downcast float32 weights (to bfloat16 on CPU) and move near-tied decisions.
        extra={"base_model": str(base), "created_by": "refusal-gateway train", "dtype": save_name},
    )
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
DESCRIPTION = (
    "Add the control tokens, fine-tune (full or --lora) so the first assistant token is "
    "[respond] or a refusal token, and write a vLLM-ready model directory with "
    "refusal_manifest.json. See refusal_training.train for the recipe."
)


def parser(prog: str = "refusal-gateway train") -> argparse.ArgumentParser:
    """The flags of ``refusal-gateway train``: :class:`TrainOptions`' fields, plus token texts."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_options_arguments(p, TrainOptions)
    p.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="KEY=TEXT",
        help='token text override, e.g. respond="<respond>" (repeatable)',
    )
    p.add_argument(
        "--tokens", metavar="JSON", help="token texts as a JSON object or a JSON file path"
    )
    return p


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """Parsed flags -> :class:`TrainOptions`."""
    tokens = parse_token_overrides(args.token, args.tokens)
    return options_from_namespace(TrainOptions, args, tokens=tokens)


def main(argv: Sequence[str] | None = None) -> int:
    """``refusal-gateway train ...``: train, then print the model directory."""
    result = train_refusal_model(options_from_args(parser().parse_args(argv)))
    print(result.out)  # noqa: T201 (the command's output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
