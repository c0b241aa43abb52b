"""The options of ``refusal-gateway recipe smollm2`` (its flags are generated from them).

Their own module because the recipe (:mod:`.smollm2_recipe`) and its figures
(:mod:`.smollm2_figures`: where calibrations go, at which target) both read
them. The data files are one field with flags of their own (``--data-dir``
or the files one by one), added by the recipe's parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .options_cli import option
from .smollm2_data import DataFiles


@dataclass(frozen=True)
class RecipeOptions:
    """The flags of ``refusal-gateway recipe smollm2``."""

    files: DataFiles = option(cli=False)
    out: Path = option(help="work directory (data, model, report)")
    steps: int = option(120, help="LoRA optimizer steps")
    batch_size: int = option(8)
    max_length: int = option(128, help="tokens per example")
    lr: float = option(3e-4, help="peak learning rate")
    decision_weight: float = option(3.0, help="loss weight of the control token")
    lora_rank: int = option(16)
    seed: int = option(0, help="training seed")
    split_seed: int = option(0)
    heldout_fraction: float = option(0.5)
    calibration_fraction: float = option(
        0.5,  # of the held-out original and contrast rows
        help="share of the held-out original and contrast rows used to fit thresholds (0: none)",
    )
    target_over_refusal: float | None = option(
        0.1,  # None: maximise refusal rate - over-refusal (a negative flag value)
        help="calibrate for at most this over-refusal on the calibration look-alikes "
        "(negative: maximise refusal rate - over-refusal instead)",
    )
    max_train_rows: int | None = option(None, help="subsample training rows (quick runs)")
    max_eval_rows: int | None = option(None, help="subsample each evaluation file (quick runs)")
    cache_dir: Path | None = option(None, help="default: the settings' cache dir")
    device: str | None = option(None, help="torch device of training (default: cuda if available)")
    max_minutes: float | None = option(None, help="time budget of the LoRA training (CPU runs)")
    compare_demo: bool = option(True, flag="--no-demo", help="do not score the demo model")
    demo_model: Path | None = option(
        None,  # default: this checkout's demo model, built if missing
        help="demo model to compare with (default: build or find it)",
    )
