"""The figures of ``refusal-gateway calibrate``: roc.png and rates.png.

Their own module because they need matplotlib (the ``train`` extra) and say
nothing the numbers in ``calibration.json`` do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from refusal_plugins.vocab import REFUSE_KEY

from .calibrate_fit import Fit, Scores, curve, decisions, figures
from .scoring import auroc


def plot_calibration(scores: Scores, fitted: Fit, out: Path) -> list[Path]:
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
    _, tp, fp, _ = curve(p, pos)
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
