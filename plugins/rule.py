"""The decision rule of the processor, on the host, in pure Python.

The same rule as :func:`refusal_plugins.core.decide` (bias, then the threshold
rule over the whole vocabulary, then the greedy control token), applied to the
model's own control probabilities as the engine reports them. The gateway's
shadow profiles and ``refusal-gateway eval``'s sweeps both use it, so what they
predict is what the processor would have emitted. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .params import RefusalParams
from .vocab import REFUSE_KEY

NEG_INF = float("-inf")


@dataclass(frozen=True)
class ShadowRule:
    """One profile's settings as per-column vectors, in manifest order (``respond`` first).

    ``bias[0]`` is always 0 (``respond`` is never biased); ``threshold[i]`` is
    None where category ``i`` has no threshold.
    """

    bias: tuple[float, ...]
    threshold: tuple[float | None, ...]
    temperature: float

    @classmethod
    def from_params(cls, params: RefusalParams, keys: Sequence[str]) -> ShadowRule:
        """The same column mapping as ``RefusalTable.write`` in ``refusal_plugins.core``:
        ``refuse`` covers every refusal category, a category's own value adds
        (bias) or overrides (threshold)."""
        bias = [0.0] * len(keys)
        threshold: list[float | None] = [None] * len(keys)
        general_bias = params.bias.get(REFUSE_KEY, 0.0)
        general_threshold = params.threshold.get(REFUSE_KEY)
        for i, key in enumerate(keys):
            if i == 0:
                continue
            own_bias = params.bias.get(key, 0.0) if key != REFUSE_KEY else 0.0
            bias[i] = general_bias + own_bias
            threshold[i] = params.threshold.get(key, general_threshold)
        return cls(tuple(bias), tuple(threshold), float(params.effective_temperature))

    def decide(self, probabilities: Sequence[float]) -> int:
        """The column of the control token this rule emits greedily, given the
        model's own control probabilities (full-vocabulary softmax, unbiased)."""
        logp = [math.log(p) if p > 0.0 else NEG_INF for p in probabilities]
        biased = [lp + b for lp, b in zip(logp, self.bias, strict=True)]
        if len(biased) > 1 and any(t is not None for t in self.threshold):
            # c*: the most likely refusal category after bias (first on ties, like torch.argmax).
            c_star = 1 + max(range(len(biased) - 1), key=lambda i: (biased[1 + i], -i))
            limit = self.threshold[c_star]
            if limit is not None:
                p_star = self.p_star(probabilities, biased, c_star)
                forced = c_star if p_star >= limit else 0
                if biased[forced] > NEG_INF and not math.isnan(p_star):
                    return forced
        # No threshold applies: the greedy choice among the biased control tokens.
        return max(range(len(biased)), key=lambda i: (biased[i], -i))

    def p_star(
        self, probabilities: Sequence[float], biased: Sequence[float], c_star: int
    ) -> float:
        """``softmax(biased logits / T)[c*]`` over the whole vocabulary, estimated
        with the non-control mass as one unbiased token (exact at T = 1)."""
        inv_t = 1.0 / self.temperature
        rest = max(0.0, 1.0 - math.fsum(probabilities))
        scaled = [b * inv_t for b in biased]
        if rest > 0.0:
            scaled.append(math.log(rest) * inv_t)
        top = max(scaled)
        if top == NEG_INF:
            return math.nan  # nothing finite left: the processor leaves the row alone too
        total = math.fsum(math.exp(s - top) for s in scaled)
        return math.exp(scaled[c_star] - top) / total
