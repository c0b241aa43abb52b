"""What-if (shadow) profiles: the decision each named profile would have made, on live traffic.

"What would our refusal rate be under the strict profile?" normally needs a
replay of traffic. It does not here: every request's decision report already
carries the model's own control-token probabilities at the decision step
(softmax over the whole vocabulary, before bias or threshold). From those,
:class:`ShadowDecisions` applies each shadow profile's settings with the same
rule as the logits processor (``refusal_plugins.core``: bias, then the
threshold rule, then the argmax over control tokens) and counts the outcome in
``refusal_gateway_shadow_decisions_total{model, profile, category}``. No extra
model call, no change to the response.

Where the estimate differs from enforcement:

* **Sampling.** The shadow decision is the *most likely* control token after
  bias and threshold: exactly what a greedy request (temperature 0) gets. A
  sampled request (temperature > 0) draws its decision from the restricted
  control-token distribution, so unless the threshold forces it, it may differ
  per request; over many requests the shadow share is the share of the
  mode, not the sampled share.
* **The threshold's softmax at T != 1.** The rule compares
  ``p[c*] = softmax(biased logits / T)[c*]`` over the *whole* vocabulary. With
  logits ``z_i = log p_i + L`` (``L`` the log-normaliser, which cancels),
  ``exp(z'_c / T) = exp(L / T) * (p_c * e^{b_c})^{1/T}`` for control tokens,
  but the non-control tokens contribute ``exp(L / T) * sum_j p_j^{1/T}``,
  which depends on how their mass ``R = 1 - sum_c p_c`` is spread, and the
  report carries only the K control probabilities. At ``T = 1`` this is
  ``R`` itself and the estimate is exact. At other temperatures we treat the
  non-control mass as one unbiased token (``R^{1/T}``): exact when that mass
  sits on one token, and otherwise a lower bound of ``p[c*]`` for ``T < 1``
  (``sum p_j^{1/T} <= R^{1/T}``) and an upper bound for ``T > 1``. For a
  refusal-token model ``R`` at the decision step is small, so the error is
  small, and it only matters for requests whose ``p[c*]`` is near the
  threshold.
* **Masks.** A control probability of exactly 0 is treated like a masked token
  (never forced), as the processor treats ``-inf`` logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry
from refusal_plugins.rule import ShadowRule
from refusal_plugins.vocab import RefusalManifest

from .metrics import get_metrics
from .policy import Policy

NEG_INF = float("-inf")


class ShadowDecisions:
    """Counts, per request, the decision of every shadow profile of the policy file."""

    def __init__(
        self,
        rules: Mapping[str, ShadowRule],
        keys: Sequence[str],
        model_name: str,
        registry: CollectorRegistry | None = None,
    ):
        counter = (get_metrics() if registry is None else get_metrics(registry)).shadow_decisions
        self.keys = tuple(keys)
        self.rules = dict(rules)
        # Children bound up front (all at 0): the dashboard's shares have data
        # from the first scrape, and observe() does no label lookup.
        self._counters = {
            name: [counter.labels(model=model_name, profile=name, category=k) for k in self.keys]
            for name in self.rules
        }

    @classmethod
    def from_policy(
        cls,
        policy: Policy,
        manifest: RefusalManifest,
        model_name: str,
        registry: CollectorRegistry | None = None,
    ) -> ShadowDecisions | None:
        """The shadow profiles named in the policy file, or None when there are none."""
        params = policy.shadow_params()
        if not params:
            return None
        keys = [t.key for t in manifest.tokens]
        rules = {name: ShadowRule.from_params(p, keys) for name, p in params.items()}
        return cls(rules, keys, model_name, registry)

    def decide(self, probabilities: Mapping[str, float]) -> dict[str, str]:
        """``{profile: category key}`` each shadow profile would have emitted."""
        values = [float(probabilities.get(k, 0.0)) for k in self.keys]
        return {name: self.keys[rule.decide(values)] for name, rule in self.rules.items()}

    def observe(self, probabilities: Mapping[str, float]) -> None:
        """Count each shadow profile's decision for one request's decision report.

        ``probabilities``: control key -> the model's own probability at the
        decision step (the ``refusal_decision.probabilities`` of the response);
        a key it lacks counts as probability 0.
        """
        values = [float(probabilities.get(k, 0.0)) for k in self.keys]
        for name, rule in self.rules.items():
            self._counters[name][rule.decide(values)].inc()
