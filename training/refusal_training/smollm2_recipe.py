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
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from refusal_plugins.vocab import MANIFEST_FILE

from .smollm2 import REFUSE_FILE, DataFiles, Split, convert_smollm2, file_sha256, split_data

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecipeOptions:
    """The flags of ``refusal-gateway recipe smollm2``."""

    files: DataFiles
    out: Path
    steps: int = 120
    batch_size: int = 8
    max_length: int = 128
    lr: float = 3e-4
    decision_weight: float = 3.0
    lora_rank: int = 16
    seed: int = 0
    split_seed: int = 0
    heldout_fraction: float = 0.5
    calibration_fraction: float = 0.5  # of the held-out original and contrast rows
    target_over_refusal: float | None = 0.1  # None: maximise refusal rate - over-refusal
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    cache_dir: Path | None = None
    compare_demo: bool = True
    demo_model: Path | None = None  # default: this checkout's demo model, built if missing


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


def score_model(model_dir: Path, split: Split, thresholds: dict[str, float] | None = None) -> dict:
    """The scoring figures on the held-out original + contrast rows (and the benign set).

    With ``thresholds`` (from :func:`.calibrate.calibrate`), ``calibrated``
    holds the same rates under the threshold rule.
    """
    from refusal_plugins.vocab import RefusalManifest

    from .calibrate import Scores, decisions, figures
    from .scoring import control_probabilities, evaluate_probabilities, read_jsonl

    started = time.monotonic()
    manifest = RefusalManifest.load(model_dir)
    keys = [t.key for t in manifest.tokens]

    def scored(paths: list[Path]) -> tuple[dict, dict | None]:
        rows = read_jsonl(paths)
        probs = control_probabilities(model_dir, [r.prompt for r in rows])
        with warnings.catch_warnings():  # a file without refuse rows: their means are empty
            warnings.simplefilter("ignore", RuntimeWarning)
            plain = evaluate_probabilities(manifest, probs, rows)
        if not thresholds:
            return plain, None
        scores = Scores.of(keys, probs, rows)
        return plain, figures(scores, decisions(scores, thresholds))

    report, ruled = scored([split.heldout, split.contrast])
    benign = scored([split.benign]) if split.benign is not None else None
    if benign is not None:
        report["over_refusal_on_benign"] = benign[0]["over_refusal_on_respond"]
        report["n_benign"] = benign[0]["n"]
    if ruled is not None:
        report["calibrated"] = {
            "thresholds": thresholds,
            **ruled,
            "over_refusal_on_benign": benign[1]["over_refusal_on_respond"] if benign else None,
        }
    report["seconds"] = round(time.monotonic() - started, 1)
    return {"model": str(model_dir), **report}


def calibrate_model(options: RecipeOptions, name: str, model_dir: Path, split: Split) -> dict | None:
    """Thresholds of ``model_dir`` from the calibration rows (None when the split has none)."""
    from .calibrate import calibrate
    from .scoring import read_jsonl

    if split.calibration is None:
        return None
    result = calibrate(
        model_dir,
        read_jsonl([split.calibration]),
        options.out / "calibration" / name,
        target=options.target_over_refusal,
    )
    return result["thresholds"]


def _figure(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.2f}"


def report_markdown(report: dict) -> str:
    """The figures as a Markdown table (the README's columns)."""
    lines = [
        "| model | decision | AUROC of p(refuse) | refusal rate on held-out original | over-refusal "
        "on contrast | over-refusal on self-instruct | category accuracy (refused prompts) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in report["scores"].items():
        lines.append(
            f"| {name} | argmax | {_figure(s['auroc'])} | {_figure(s['refusal_rate_on_refuse'])} "
            f"| {_figure(s['over_refusal_on_respond'])} | {_figure(s.get('over_refusal_on_benign'))} "
            f"| {_figure(s['category_accuracy_refused'])} |"
        )
        c = s.get("calibrated")
        if c:
            lines.append(
                f"| {name} | thresholds {_thresholds(c['thresholds'])} | | "
                f"{_figure(c['refusal_rate_on_refuse'])} | {_figure(c['over_refusal_on_respond'])} "
                f"| {_figure(c.get('over_refusal_on_benign'))} "
                f"| {_figure(c['category_accuracy_of_refusals'])} |"
            )
    split = report["split"]
    calibration = split.get("calibration") or {}
    return "\n".join(lines) + (
        f"\n\nHeld-out original: {sum(split['heldout_original'].values())} prompts; contrast: "
        f"{split['contrast']}; self-instruct user-oriented: {split['benign']}; calibration: "
        f"{sum(calibration.values())} (split seed {split['seed']}, held-out fraction "
        f"{split['heldout_fraction']}, calibration fraction {split.get('calibration_fraction', 0)}, "
        f"target over-refusal {report['recipe'].get('target_over_refusal')}). Category accuracy: "
        "most likely refusal category (argmax rows) or the refusal emitted (threshold rows).\n"
    )


def _thresholds(thresholds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in thresholds.items())


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``refusal-gateway recipe smollm2``."""
    d = RecipeOptions(files=DataFiles(Path(), (), Path()), out=Path())
    parser.add_argument(
        "--out", type=Path, required=True, help="work directory (data, model, report)"
    )
    parser.add_argument("--data-dir", type=Path, help="a directory laid out as ../shared/data")
    parser.add_argument(
        "--refuse", type=Path, help=f"should-refuse JSONL to split (default {REFUSE_FILE})"
    )
    parser.add_argument(
        "--respond", type=Path, nargs="+", help="benign JSONL with responses, trained on"
    )
    parser.add_argument("--contrast", type=Path, help="benign look-alikes, evaluation only")
    parser.add_argument(
        "--benign", type=Path, help="plain benign prompts, evaluation only (optional)"
    )
    parser.add_argument("--steps", type=int, default=d.steps, help="LoRA optimizer steps")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument(
        "--decision-weight",
        type=float,
        default=d.decision_weight,
        help="loss weight of the control token",
    )
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank)
    parser.add_argument("--seed", type=int, default=d.seed, help="training seed")
    parser.add_argument("--split-seed", type=int, default=d.split_seed)
    parser.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    parser.add_argument(
        "--calibration-fraction",
        type=float,
        default=d.calibration_fraction,
        help="share of the held-out original and contrast rows used to fit thresholds (0: none)",
    )
    parser.add_argument(
        "--target-over-refusal",
        type=float,
        default=d.target_over_refusal,
        help="calibrate for at most this over-refusal on the calibration look-alikes "
        "(negative: maximise refusal rate - over-refusal instead)",
    )
    parser.add_argument("--max-train-rows", type=int, help="subsample training rows (quick runs)")
    parser.add_argument(
        "--max-eval-rows", type=int, help="subsample each evaluation file (quick runs)"
    )
    parser.add_argument("--cache-dir", type=Path, help="default: the settings' cache dir")
    parser.add_argument(
        "--demo-model", type=Path, help="demo model to compare with (default: build or find it)"
    )
    parser.add_argument("--no-demo", action="store_true", help="do not score the demo model")


def options_from_args(args: argparse.Namespace) -> RecipeOptions:
    """Parsed flags -> :class:`RecipeOptions`; ``--data-dir`` fills the files not given."""
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
    return RecipeOptions(
        files=files,
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=args.lr,
        decision_weight=args.decision_weight,
        lora_rank=args.lora_rank,
        seed=args.seed,
        split_seed=args.split_seed,
        heldout_fraction=args.heldout_fraction,
        calibration_fraction=args.calibration_fraction,
        target_over_refusal=args.target_over_refusal if args.target_over_refusal >= 0 else None,
        max_train_rows=args.max_train_rows,
        max_eval_rows=args.max_eval_rows,
        cache_dir=args.cache_dir,
        compare_demo=not args.no_demo,
        demo_model=args.demo_model,
    )
