"""The figures of ``refusal-gateway recipe smollm2``: scores, thresholds, the report table.

Split from :mod:`.smollm2_recipe` (which converts, splits and trains) because
this is the half that judges a model: the same held-out files for every model
compared, each scored with its own argmax and with thresholds calibrated on
rows it was not trained on, and the Markdown table the README quotes.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

from .smollm2_data import Split
from .smollm2_options import RecipeOptions


def score_model(model_dir: Path, split: Split, thresholds: dict[str, float] | None = None) -> dict:
    """The scoring figures on the held-out original + contrast rows (and the benign set).

    With ``thresholds`` (from :func:`.calibrate.calibrate`), ``calibrated``
    holds the same rates under the threshold rule.
    """
    from refusal_plugins.vocab import RefusalManifest

    from .calibrate_fit import Scores, decisions, figures
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


