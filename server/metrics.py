"""Prometheus collectors of the gateway layer, served on vLLM's own ``/metrics``.

vLLM's ``/metrics`` exports prometheus-client's default registry (or its
multiprocess collector when several API servers run), so collectors registered
here appear beside vLLM's series. Names start with ``refusal_gateway_``: vLLM
unregisters foreign ``vllm:*`` collectors. Label values are bounded: model
names, profile names from the policy file, the manifest's category keys and
fixed vocabularies below, nothing from free text. Latency, TTFT, queue depth
and token counts are vLLM's own series; nothing here duplicates them.
"""

from __future__ import annotations

import weakref

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from .launcher_metrics import register_launcher_series

#: Why the layer answered a request itself (label ``reason``).
REJECT_REASONS = ("validation", "auth", "policy", "route", "unavailable")
#: Which refusal controls a request used (label ``controls``).
CONTROLS = ("none", "bias", "threshold", "bias+threshold")
NO_PROFILE = "none"
#: Whose decision the emitted control token was (label ``source``).
SOURCES = ("model", "forced", "unknown")
#: Canary labels: the prompt's expected behaviour and what happened.
CANARY_EXPECTED = ("respond", "refuse")
CANARY_OUTCOMES = ("respond", "refuse", "none")
#: Buckets of the model's own refusal probability at the decision step.
PROBABILITY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, GatewayMetrics] = (
    weakref.WeakKeyDictionary()
)


def reason_for_status(status: int) -> str:
    return {401: "auth", 403: "policy", 404: "route", 503: "unavailable"}.get(status, "validation")


class GatewayMetrics:
    """The collectors, registered once per registry."""

    def __init__(self, registry: CollectorRegistry):
        self.control_tokens = Counter(
            "refusal_gateway_control_tokens",
            "Control tokens emitted at the decision position, by model, category "
            "(respond, a refusal category key, or none when no control token came), profile "
            "and source (model: the model's own top control token, or no controls used; "
            "forced: bias/threshold changed it; unknown: no decision report).",
            ["model", "category", "profile", "source"],
            registry=registry,
        )
        self.refusal_probability = Histogram(
            "refusal_gateway_refusal_probability",
            "The model's own probability of refusing at the decision step (sum over refusal "
            "categories of softmax(logits), before bias or threshold), one per request.",
            ["model", "profile"],
            buckets=PROBABILITY_BUCKETS,
            registry=registry,
        )
        self.canary = Counter(
            "refusal_gateway_canary_decisions",
            "Decisions on the canary set (the launcher's prober), by the prompt's expected "
            "behaviour and the outcome (refuse: any refusal category).",
            ["model", "expected", "outcome"],
            registry=registry,
        )
        self.requests = Counter(
            "refusal_gateway_requests",
            "Requests accepted by the refusal layer, by the refusal controls they used.",
            ["model", "controls", "profile"],
            registry=registry,
        )
        self.rejected = Counter(
            "refusal_gateway_rejected_requests",
            "Requests the refusal layer answered with an error itself, by reason "
            "(validation, auth, policy, unavailable).",
            ["model", "reason"],
            registry=registry,
        )
        self.shadow_decisions = Counter(
            "refusal_gateway_shadow_decisions",
            "Decisions the policy file's shadow (what-if) profiles would have made on the "
            "requests served, by model, profile and category (respond or a refusal category "
            "key), computed from the model's own control-token probabilities: the greedy "
            "decision under that profile's bias and threshold (refusal_gateway.shadow).",
            ["model", "profile", "category"],
            registry=registry,
        )


class BoundMetrics:
    """Children bound once for one served model, so the hot path does no label lookup.

    Profiles come from the policy file, so every label set is known up front.
    """

    def __init__(self, metrics: GatewayMetrics, model: str, keys: list[str], profiles: list[str]):
        names = [NO_PROFILE, *profiles]
        self.control_tokens = {
            (key, p, s): metrics.control_tokens.labels(
                model=model, category=key, profile=p, source=s
            )
            for key in keys
            for p in names
            for s in SOURCES
        }
        self.refusal_probability = {
            p: metrics.refusal_probability.labels(model=model, profile=p) for p in names
        }
        self.requests = {
            (c, p): metrics.requests.labels(model=model, controls=c, profile=p)
            for c in CONTROLS
            for p in names
        }
        self.rejected = {r: metrics.rejected.labels(model=model, reason=r) for r in REJECT_REASONS}
        self._canary_counter = metrics.canary
        self._model = model
        self._canary: dict[tuple[str, str], Counter] | None = None

    def canary(self, expected: str, outcome: str):
        """A canary child. The series appear (all at 0) with the first canary
        request, so they exist exactly where a canary runs, and ratios of them
        have data even for outcomes that have not happened yet."""
        if self._canary is None:
            self._canary = {
                (e, o): self._canary_counter.labels(model=self._model, expected=e, outcome=o)
                for e in CANARY_EXPECTED
                for o in CANARY_OUTCOMES
            }
        return self._canary[expected, outcome]


def get_metrics(registry: CollectorRegistry = REGISTRY) -> GatewayMetrics:
    """The collectors of ``registry`` (created on first use; a registry takes a name once)."""
    metrics = _BY_REGISTRY.get(registry)
    if metrics is None:
        metrics = _BY_REGISTRY[registry] = GatewayMetrics(registry)
        # The launcher's series (engine state, restarts, standby answers) on
        # the same /metrics while vLLM serves; see refusal_gateway.launcher_metrics.
        register_launcher_series(registry)
    return metrics
