"""A plain, row-by-row reference of the refusal rule (numpy, no vectorisation).

Written straight from the paper's description so the vectorised core can be
checked against it: bias the control logits, p = softmax(logits / T) over the
vocabulary, c* = the most likely refusal category; a controlled c* is emitted
when p[c*] >= threshold else ``respond``; then the decision row is restricted
to control tokens. Later positions ban the control tokens.
"""

from __future__ import annotations

import math

import numpy as np


def reference_row(
    logits: np.ndarray,
    ctrl_ids: list[int],
    bias: list[float],
    threshold: list[float],
    temperature: float,
    state: str,
) -> tuple[np.ndarray, float | None]:
    """One row's output logits, and |p[c*] - threshold| when a threshold decided.

    ``state`` is ``off`` (untouched), ``ban`` (after the decision position) or
    ``decide``. ``threshold`` holds NaN for uncontrolled categories.
    """
    out = logits.astype(np.float32).copy()
    if state == "off":
        return out, None
    if state == "ban":
        out[ctrl_ids] = -np.inf
        return out, None
    for k, token in enumerate(ctrl_ids):
        out[token] = np.float32(out[token] + np.float32(bias[k]))
    ctrl = out[ctrl_ids]
    c_star = 1 + int(np.argmax(ctrl[1:]))
    p_star = None
    scaled = out.astype(np.float64) / temperature
    finite = scaled[np.isfinite(scaled)]
    if finite.size and not math.isnan(threshold[c_star]):
        top = finite.max()
        lse = top + math.log(np.exp(finite - top).sum())
        p_star = math.exp(scaled[ctrl_ids[c_star]] - lse)
        chosen = c_star if p_star >= threshold[c_star] else 0
        p_star = abs(p_star - threshold[c_star])
        if out[ctrl_ids[chosen]] > -np.inf:
            forced = np.full_like(out, -np.inf)
            forced[ctrl_ids[chosen]] = 0.0
            return forced, p_star
    if np.any(ctrl > -np.inf):
        keep = out[ctrl_ids].copy()
        out[:] = -np.inf
        out[ctrl_ids] = keep
    return out, p_star
