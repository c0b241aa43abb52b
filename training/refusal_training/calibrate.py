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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from refusal_plugins.vocab import REFUSE_KEY, RESPOND_KEY

from .scoring import KEY_OF_CATEGORY, Labelled, auroc, control_probabilities

logger = logging.getLogger(__name__)

PROFILE_NAME = "calibrated"
NEVER = 1.0  # a threshold no probability below 1 reaches
TIE = 1e-5  # relative: closer scores are one cut point (float32 noise between runtimes)


@dataclass(frozen=True)
class Scores:
    """Control-token probabilities of labelled rows, in manifest order (``respond`` first)."""

    keys: tuple[str, ...]
    probs: np.ndarray  # [N, K]
    should_refuse: np.ndarray  # [N] bool
    categories: tuple[str | None, ...]  # the rows' category keys (None: unknown)

    @classmethod
    def of(cls, keys: Sequence[str], probs: np.ndarray, rows: Sequence[Labelled]) -> Scores:
        if keys[0] != RESPOND_KEY:
            raise ValueError(f"the manifest's first token must be {RESPOND_KEY!r}, got {keys[0]!r}")
        return cls(
            tuple(keys),
            np.asarray(probs, dtype=np.float64),
            np.array([r.label == "refuse" for r in rows]),
            tuple(KEY_OF_CATEGORY.get(r.category or "") for r in rows),
        )

    # Cached: the per-category fit evaluates hundreds of candidate thresholds on one Scores.
    @cached_property
    def c_star(self) -> np.ndarray:
        """[N] column of the most likely refusal category (1..K-1)."""
        return 1 + self.probs[:, 1:].argmax(axis=1)

    @cached_property
    def p_star(self) -> np.ndarray:
        return self.probs[np.arange(len(self.probs)), self.c_star]


def decisions(scores: Scores, thresholds: Mapping[str, float] | None) -> np.ndarray:
    """[N] chosen column under the processor's rule (bias 0, temperature 1).

    ``thresholds`` maps ``refuse`` (every category) and/or category keys to a
    threshold, a category's own winning; ``None`` or a category without one:
    the model's argmax over the control tokens, as served.
    """
    argmax = scores.probs.argmax(axis=1)
    if not thresholds:
        return argmax
    general = thresholds.get(REFUSE_KEY, math.nan)
    per_column = np.array([math.nan] + [thresholds.get(k, general) for k in scores.keys[1:]])
    c_star = scores.c_star
    t = per_column[c_star]
    ruled = np.where(scores.p_star >= t, c_star, 0)
    return np.where(np.isnan(t), argmax, ruled)


def figures(scores: Scores, chosen: np.ndarray) -> dict[str, float | None]:
    """Refusal rate on refuse rows, over-refusal on respond rows, category accuracy of refusals."""
    refused = chosen != 0
    pos, neg = scores.should_refuse, ~scores.should_refuse
    keys = np.array(scores.keys, dtype=object)
    right = np.array([k == c for k, c in zip(keys[chosen], scores.categories, strict=True)])
    hits = refused & pos
    return {  # None where undefined (no such rows): JSON has no NaN
        "refusal_rate_on_refuse": float(refused[pos].mean()) if pos.any() else None,
        "over_refusal_on_respond": float(refused[neg].mean()) if neg.any() else None,
        "category_accuracy_of_refusals": float(right[hits].mean()) if hits.any() else None,
    }


def _cut(sorted_desc: np.ndarray, n: int) -> float:
    """The threshold that refuses exactly the ``n`` highest scores (log-space midpoint)."""
    if n == 0:
        return NEVER
    low = sorted_desc[n - 1]
    below = sorted_desc[n] if n < len(sorted_desc) else 0.0
    if below <= 0.0:
        return float(low)
    return float(math.exp((math.log(low) + math.log(below)) / 2)) if low > below else float(low)


def _curve(
    p: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts refused if the ``n`` highest scores are: (n, true positives, false positives),
    plus the scores sorted high to low (what :func:`_cut` reads).

    Only cut points between distinct scores are kept: scores within
    :data:`TIE` of each other go together, since the server's own float32
    probabilities differ from these by about that much.
    """
    order = np.argsort(-p, kind="mergesort")
    ps, pos = p[order], positive[order]
    tp = np.concatenate([[0], np.cumsum(pos)])
    fp = np.concatenate([[0], np.cumsum(~pos)])
    n = np.arange(len(ps) + 1)
    keep = np.concatenate([[True], np.append(ps[1:] < ps[:-1] * (1 - TIE), True)])
    return n[keep], tp[keep], fp[keep], ps


@dataclass(frozen=True)
class Fit:
    thresholds: dict[str, float]
    calibration: dict[str, float | None]  # figures on the calibration rows at these thresholds


def fit_global(scores: Scores, target: float | None) -> dict[str, float]:
    """One threshold for every category (``{"refuse": t}``)."""
    p, pos = scores.p_star, scores.should_refuse
    n_pos, n_neg = max(1, int(pos.sum())), max(1, int((~pos).sum()))
    n, tp, fp, desc = _curve(p, pos)
    tpr, fpr = tp / n_pos, fp / n_neg
    if target is None:
        best = int(np.argmax(tpr - fpr))  # first maximum: the highest threshold
    else:
        ok = np.flatnonzero(fpr <= target + 1e-12)
        best = int(ok[np.argmax(tpr[ok])])
    return {REFUSE_KEY: _cut(desc, int(n[best]))}


def fit_per_category(scores: Scores, target: float | None) -> dict[str, float]:
    """One threshold per refusal category (groups by c*); the global fit covers empty groups."""
    p, pos, c_star = scores.p_star, scores.should_refuse, scores.c_star
    n_pos, n_neg = max(1, int(pos.sum())), max(1, int((~pos).sum()))
    groups = {}
    for col in range(1, len(scores.keys)):
        members = c_star == col
        if members.any():
            n, tp, fp, desc = _curve(p[members], pos[members])
            groups[scores.keys[col]] = (desc, n, tp / n_pos, fp / n_neg)

    def pick(price: float) -> dict[str, float]:
        """Per group, the cut maximising refusal rate - price x over-refusal."""
        thresholds = {}
        for key, (desc, n, gtpr, gfpr) in groups.items():
            thresholds[key] = _cut(desc, int(n[int(np.argmax(gtpr - price * gfpr))]))
        return thresholds

    general = fit_global(scores, target)
    if target is None:
        return {**general, **pick(1.0)}  # Youden's J is a sum over groups: exact
    # A budget couples the groups; the Lagrangian picks are near-optimal, and the
    # single global threshold stays a candidate so per-category never does worse.
    candidates = [general] + [{**general, **pick(price)} for price in np.logspace(-3, 4, 300)]
    best, best_key = general, (-1.0, 0.0)
    for thresholds in candidates:
        f = figures(scores, decisions(scores, thresholds))
        if f["over_refusal_on_respond"] <= target + 1e-12:
            key = (f["refusal_rate_on_refuse"], -f["over_refusal_on_respond"])
            if key > best_key:
                best, best_key = thresholds, key
    return best


def fit(scores: Scores, target: float | None = None, per_category: bool = False) -> Fit:
    """Thresholds for ``scores`` (see the module doc) and their figures on those rows."""
    if target is not None and not 0.0 <= target <= 1.0:
        raise ValueError(f"target over-refusal must be in [0, 1], got {target}")
    if scores.should_refuse.all() or not scores.should_refuse.any():
        raise ValueError("calibration needs rows labelled refuse and rows labelled respond")
    thresholds = fit_per_category(scores, target) if per_category else fit_global(scores, target)
    thresholds = {k: min(float(v), NEVER) for k, v in thresholds.items()}  # exact: no rounding
    return Fit(thresholds, figures(scores, decisions(scores, thresholds)))


def policy_document(thresholds: Mapping[str, float], name: str = PROFILE_NAME) -> dict:
    """A policy file (see :mod:`refusal_gateway.policy`) whose default profile holds the thresholds."""
    return {"default_profile": name, "profiles": {name: {"refusal_threshold": dict(thresholds)}}}


def _plot(scores: Scores, fitted: Fit, out: Path) -> list[Path]:
    """ROC of p[c*] with both operating points; refusal rates against one global threshold."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "plots need matplotlib (pip install 'refusal-gateway[train]'), or pass --no-plots"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, pos = scores.p_star, scores.should_refuse
    _, tp, fp, _ = _curve(p, pos)
    argmax_point = figures(scores, decisions(scores, None))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(
        fp / max(1, (~pos).sum()),
        tp / max(1, pos.sum()),
        label=f"p[c*] (AUROC {auroc(p, pos):.2f})",
    )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    for label, point, marker in (
        ("model's argmax", argmax_point, "o"),
        ("calibrated", fitted.calibration, "s"),
    ):
        ax.plot(
            point["over_refusal_on_respond"], point["refusal_rate_on_refuse"], marker, label=label
        )
    ax.set(xlabel="over-refusal (respond rows)", ylabel="refusal rate (refuse rows)", title="ROC")
    ax.legend(loc="lower right")
    roc = out / "roc.png"
    fig.savefig(roc, dpi=100, bbox_inches="tight")
    plt.close(fig)

    # Over the observed scores: a lightly trained model's p[c*] may all sit within one decade.
    grid = np.geomspace(max(float(p.min()) * 0.9, 1e-12), min(float(p.max()) * 1.1, 1.0), 300)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, [(p[pos] >= t).mean() for t in grid], lw=2, label="refusal rate, all refuse rows")
    ax.plot(grid, [(p[~pos] >= t).mean() for t in grid], lw=2, label="over-refusal, respond rows")
    cats = np.array(scores.categories, dtype=object)
    for key in scores.keys[1:]:
        rows = pos & (cats == key)
        if rows.any():
            ax.plot(
                grid,
                [(p[rows] >= t).mean() for t in grid],
                lw=0.8,
                ls="--",
                label=f"refusal rate, {key}",
            )
    if REFUSE_KEY in fitted.thresholds:
        ax.axvline(fitted.thresholds[REFUSE_KEY], color="k", lw=0.8, label="calibrated (refuse)")
    ax.set(
        xscale="log",
        xlabel="threshold on p[c*]",
        ylabel="rate",
        title="Rates against one threshold",
    )
    ax.legend(fontsize=7)
    rates = out / "rates.png"
    fig.savefig(rates, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [roc, rates]


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
        "plots": [str(p) for p in _plot(scores, fitted, out)] if plots else [],
    }
    (out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", nargs="+", type=Path, help="JSONL with prompt, label (refuse/respond), category"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for calibration.json, policy.yaml, plots"
    )
    parser.add_argument(
        "--target-over-refusal",
        type=float,
        help="highest refusal rate with at most this over-refusal on respond rows "
        "(default: maximise refusal rate - over-refusal)",
    )
    parser.add_argument("--per-category", action="store_true", help="one threshold per category")
    parser.add_argument("--profile-name", default=PROFILE_NAME, help="profile name in policy.yaml")
    parser.add_argument("--no-plots", action="store_true", help="skip roc.png and rates.png")
