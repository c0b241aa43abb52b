"""``refusal-gateway calibrate``: the paper's refusal thresholds, fitted on labelled prompts.

    refusal-gateway calibrate --model DIR calibration.jsonl --out calib/ [--target-over-refusal 0.1]
    refusal-gateway serve --model DIR --policy-file calib/policy.yaml

Why: a model's own argmax is one operating point, and often the wrong one — a
lightly trained model may rank should-refuse prompts well yet never put a
refusal token first (SmolLM2 after a CPU-sized LoRA run), a small one may
over-refuse. The paper's threshold rule moves that point without retraining:
with p = softmax(logits) at the decision position and c* the most likely
refusal category, refuse with c* when p[c*] >= threshold[c*], else
``[respond]``. This tool picks the thresholds from prompts labelled
refuse/respond (benign look-alikes are the informative respond rows) and
writes them as a profile of the server's policy file, plus plots.

Fitting. Each row's decision depends only on the threshold of its own c*, so
the rows split into groups by c* and the fit is exact per group:

* one threshold for every category (the default, written under ``refuse``):
  sweep it over the observed p[c*] values;
* ``--per-category``: one threshold per c* group (groups without calibration
  rows keep the global one). With no target this maximises Youden's J
  (refusal rate - over-refusal), which is a sum over groups, so each group is
  maximised alone; with a target, a Lagrangian sweep over the price of an
  over-refusal picks the group thresholds.

``--target-over-refusal F`` asks for the highest refusal rate on refuse rows
whose over-refusal on respond rows is at most F; without it, Youden's J. A
chosen threshold sits halfway (in log space) between the lowest refused score
and the next score below it, so it does not hinge on one calibration row.

Probabilities come from :func:`.scoring.control_probabilities` (transformers,
temperature 1, no bias), the same quantity the logits processor thresholds;
a request that also sends ``refusal_bias`` or ``refusal_temperature`` moves it.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from .calibrate_fit import NEVER, TIE, Fit, Scores, decisions, figures, fit
from .calibrate_plots import plot_calibration
from .model_option import add_model_arguments, model_dir_from_args
from .scoring import Labelled, auroc, control_probabilities, read_jsonl

logger = logging.getLogger(__name__)

__all__ = [
    "NEVER", "PROFILE_NAME", "TIE", "Fit", "Scores", "calibrate", "decisions", "figures", "fit",
    "main", "parser", "policy_document",
]  # fmt: skip

PROFILE_NAME = "calibrated"
DESCRIPTION = (
    "Score labelled prompts (refuse/respond) with the model and pick the paper's refusal "
    "thresholds: the highest refusal rate within --target-over-refusal, or the best refusal "
    "rate minus over-refusal. Writes calibration.json, policy.yaml (a default profile for "
    "`serve --policy-file`) and roc.png / rates.png. See refusal_training.calibrate."
)


def policy_document(thresholds: Mapping[str, float], name: str = PROFILE_NAME) -> dict:
    """A policy file (see :mod:`refusal_gateway.policy`) whose default profile holds the thresholds."""
    return {"default_profile": name, "profiles": {name: {"refusal_threshold": dict(thresholds)}}}


def calibrate(
    model_dir: Path,
    rows: Sequence[Labelled],
    out: Path,
    target: float | None = None,
    per_category: bool = False,
    profile: str = PROFILE_NAME,
    plots: bool = True,
) -> dict:
    """Score ``rows`` with the model, fit, and write ``calibration.json``, ``policy.yaml`` and plots."""
    import yaml
    from refusal_plugins.vocab import RefusalManifest

    keys = [t.key for t in RefusalManifest.load(model_dir).tokens]
    scores = Scores.of(keys, control_probabilities(model_dir, [r.prompt for r in rows]), rows)
    fitted = fit(scores, target, per_category)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy.yaml").write_text(
        yaml.safe_dump(policy_document(fitted.thresholds, profile), sort_keys=False)
    )
    result = {
        "model": str(model_dir),
        "rows": {
            "refuse": int(scores.should_refuse.sum()),
            "respond": int((~scores.should_refuse).sum()),
        },
        "target_over_refusal": target,
        "per_category": per_category,
        "thresholds": fitted.thresholds,
        "auroc_p_star": auroc(scores.p_star, scores.should_refuse),
        "argmax": figures(scores, decisions(scores, None)),
        "calibrated": fitted.calibration,
        "policy_file": str(out / "policy.yaml"),
        "plots": [str(p) for p in plot_calibration(scores, fitted, out)] if plots else [],
    }
    (out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def parser(prog: str = "refusal-gateway calibrate") -> argparse.ArgumentParser:
    """The flags of ``refusal-gateway calibrate``."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_model_arguments(p)
    p.add_argument(
        "data", nargs="+", type=Path, help="JSONL with prompt, label (refuse/respond), category"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="directory for calibration.json, policy.yaml, plots"
    )
    p.add_argument(
        "--target-over-refusal",
        type=float,
        help="highest refusal rate with at most this over-refusal on respond rows "
        "(default: maximise refusal rate - over-refusal)",
    )
    p.add_argument("--per-category", action="store_true", help="one threshold per category")
    p.add_argument("--profile-name", default=PROFILE_NAME, help="profile name in policy.yaml")
    p.add_argument("--no-plots", action="store_true", help="skip roc.png and rates.png")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Calibrate; print the result and how to serve with it."""
    args = parser().parse_args(argv)
    model_dir = model_dir_from_args(args)
    try:
        result = calibrate(
            model_dir,
            read_jsonl(args.data),
            args.out,
            target=args.target_over_refusal,
            per_category=args.per_category,
            profile=args.profile_name,
            plots=not args.no_plots,
        )
    except ValueError as e:
        raise SystemExit(f"calibrate: {e}") from None
    print(json.dumps(result, indent=2))  # noqa: T201 (the command's output)
    serve = f"refusal-gateway serve --model {model_dir} --policy-file {result['policy_file']}"
    print(f"\nserve with: {serve}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
