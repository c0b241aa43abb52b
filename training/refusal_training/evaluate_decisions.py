"""What the server decided, and what it would decide under other settings (offline).

Split from the HTTP client because the offline rule is the subtle half of
``refusal-gateway eval``: sweeps are computed from the first pass's reported
probabilities wherever that is exact (see :mod:`.evaluate`), so this module
must say precisely when it is not and send those rows instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from refusal_plugins.params import RefusalParams
from refusal_plugins.vocab import REFUSE_KEY, RESPOND_KEY

from .evaluate_rows import EvalError

#: Near ties closer than this (log-probability, or relative p[c*] vs threshold)
#: are sent to the server: the engine computes in float32.
TIE = 1e-4
#: The smallest positive float32: a reported probability of 0 is below it.
FLOAT32_TINY = 1.4e-45


@dataclass(frozen=True)
class Decision:
    """What the server decided for one request."""

    key: str | None  # "respond", the refusal category key, or None (no decision: masked)
    probabilities: dict[str, float] | None  # the model's own, before bias/threshold

    @property
    def refused(self) -> bool:
        return self.key not in (None, RESPOND_KEY)

    @classmethod
    def of_response(cls, body: Mapping[str, Any]) -> Decision:
        try:
            report = body["choices"][0]["refusal_decision"]
        except (KeyError, IndexError, TypeError):
            raise EvalError(
                "the response has no choices[0].refusal_decision: is this a refusal-gateway "
                f"server? ({json.dumps(body)[:300]})"
            ) from None
        if report.get("refused"):
            key = report.get("category") or REFUSE_KEY
        else:
            key = RESPOND_KEY if report.get("token") is not None else None
        probs = report.get("probabilities")
        return cls(key, {k: float(v) for k, v in probs.items()} if probs else None)


@dataclass(frozen=True)
class Settings:
    """The refusal fields of a request; ``threshold`` a number or key -> number."""

    bias: Mapping[str, float] = field(default_factory=dict)
    threshold: float | Mapping[str, float] | None = None
    temperature: float | None = None
    profile: str | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.bias:
            out["refusal_bias"] = dict(self.bias)
        if self.threshold is not None:
            out["refusal_threshold"] = (
                self.threshold if isinstance(self.threshold, float) else dict(self.threshold)
            )
        if self.temperature is not None:
            out["refusal_temperature"] = self.temperature
        if self.profile is not None:
            out["refusal_profile"] = self.profile
        return out

    def params(self) -> RefusalParams:
        threshold = self.threshold
        if isinstance(threshold, float):
            threshold = {REFUSE_KEY: threshold}
        return RefusalParams(
            bias=dict(self.bias), threshold=dict(threshold or {}), temperature=self.temperature
        )

    def with_bias(self, value: float) -> Settings:
        """``value`` added to ``refusal_bias.refuse``."""
        bias = dict(self.bias)
        bias[REFUSE_KEY] = bias.get(REFUSE_KEY, 0.0) + value
        return Settings(bias, self.threshold, self.temperature, self.profile)

    def with_threshold(self, value: float) -> Settings:
        return Settings(self.bias, float(value), self.temperature, self.profile)


def offline_exact(settings: Settings) -> bool:
    """Whether the rule on reported probabilities gives exactly the server's decision."""
    if settings.profile is not None:
        return False
    has_threshold = settings.threshold is not None
    return not has_threshold or settings.temperature in (None, 1.0)


def offline_decisions(
    probabilities: Sequence[Mapping[str, float] | None], keys: Sequence[str], settings: Settings
) -> list[str | None]:
    """Per row, the key the server emits at temperature 0 under ``settings`` (see the module
    doc), or None where that cannot be settled from the probabilities (send the row)."""
    from refusal_plugins.rule import ShadowRule

    rule = ShadowRule.from_params(settings.params(), keys)
    out: list[str | None] = []
    for probs in probabilities:
        if probs is None:
            out.append(None)
            continue
        p = [float(probs.get(k, 0.0)) for k in keys]
        out.append(None if _unsettled(rule, p) else keys[rule.decide(p)])
    return out


def _unsettled(rule, p: Sequence[float]) -> bool:
    """A near tie, a threshold within float noise, or an underflowed 0 the bias could lift."""
    biased = [math.log(x) + b if x > 0 else -math.inf for x, b in zip(p, rule.bias, strict=True)]
    top = max(biased)
    if top == -math.inf:
        return True
    lifted = [math.log(FLOAT32_TINY) + b for x, b in zip(p, rule.bias, strict=True) if x <= 0]
    if any(v >= top - TIE for v in lifted):
        return True
    ranked = sorted(biased, reverse=True)
    if len(ranked) > 1 and ranked[0] - ranked[1] < TIE:
        return True
    if any(t is not None for t in rule.threshold) and len(p) > 1:
        refusal = biased[1:]
        c_star = 1 + max(range(len(refusal)), key=lambda i: (refusal[i], -i))
        limit = rule.threshold[c_star]
        if limit is not None:
            p_star = rule.p_star(p, biased, c_star)
            if math.isnan(p_star) or abs(p_star - limit) <= TIE * max(limit, 1e-12):
                return True
    return False
