"""The threshold fit of ``refusal-gateway calibrate``: scores, decisions, exact per-group fits.

Pure numpy on the probabilities, split from the command (which scores a model
and writes files) so the fit is tested against the processor's own rule
without a model. The method is in :mod:`.calibrate`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from refusal_plugins.vocab import REFUSE_KEY, RESPOND_KEY

from .scoring import KEY_OF_CATEGORY, Labelled

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


def curve(
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
    n, tp, fp, desc = curve(p, pos)
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
            n, tp, fp, desc = curve(p[members], pos[members])
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
