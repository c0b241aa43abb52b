"""The options of ``refusal-gateway train`` (its flags are generated from them).

Their own module because the run (:mod:`.train`), its checkpoints
(:mod:`.checkpoints`: the resume fingerprint hashes them) and its LoRA set-up
(:mod:`.lora`) all read them; here, none of those imports another to get
them. The field set is also a cache key: ``recipe smollm2`` reuses a finished
model whose ``train_info.json`` holds the same options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refusal_plugins.vocab import Scheme

from .options_cli import option


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``refusal-gateway train`` takes (the CLI flags, one to one)."""

    base: Path = option(help="local Hugging Face causal-LM directory")
    out: Path = option(help="output model directory")
    data: tuple[Path, ...] = option(help="JSONL files (prompt, label, category, response)")
    scheme: Scheme = option("categorical")
    # key -> text overrides; flags --token KEY=TEXT and --tokens JSON (see train.parser)
    tokens: dict[str, str] = option(default_factory=dict, cli=False)
    max_steps: int | None = option(None, help="optimizer steps (default: two epochs)")
    batch_size: int = option(8)
    lr: float | None = option(None, help="peak learning rate (default 1e-5, 2e-4 with --lora)")
    warmup_steps: int | None = option(None, help="linear warm-up (default min(30, steps/10))")
    max_length: int = option(512, help="tokens per example")
    decision_weight: float = option(3.0, help="loss weight of the control token")
    weight_decay: float = option(0.0)
    seed: int = option(0, help="training seed (batches, init, refusal texts)")
    split_seed: int = option(0, help="seed of the holdout split")
    holdout_fraction: float = option(0.0, help="fraction held out to <out>/holdout.jsonl")
    lora: bool = option(False, help="train LoRA adapters and merge them")
    lora_rank: int = option(16)
    lora_alpha: int = option(32)
    lora_dropout: float = option(0.05)
    lora_targets: tuple[str, ...] = option(
        (), help="module names (default: all linear layers but the output one)"
    )
    token_lr_scale: float = option(
        30.0,
        help="with --lora: learning-rate multiplier of the control-token embedding rows, which "
        "start identical and must move further than the adapters",
    )
    checkpoint_every: int = option(100, help="steps between checkpoints (0: none)")
    resume: bool = option(False, help="continue from the newest checkpoint in <out>")
    keep_checkpoints: bool = option(False, help="keep checkpoints after success")
    overwrite: bool = option(False, help="write into a non-empty --out")
    device: str | None = option(None, help="torch device (default: cuda if available)")
    max_minutes: float | None = option(
        None, help="time budget of the training loop (CPU runs): stop after the step that passes it"
    )
    dtype: str = option("float32", choices=["float32", "bfloat16"], help="training dtype")
    save_dtype: str = option(
        "auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the saved weights (auto: the base model's)",
    )
