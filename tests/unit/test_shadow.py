"""Shadow profiles decide like the logits processor, from the K control probabilities alone.

The reference is the processor itself: ``refusal_plugins.core`` (the tensor code
the V1/V2 adapters run) applied to full-vocabulary logits, then the greedy
choice. The shadow sees only what a decision report carries: the K control
probabilities of the unbiased full-vocabulary softmax.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from refusal_gateway.policy import Policy, PolicyFile
from refusal_gateway.shadow import ShadowDecisions
from refusal_plugins.core import RefusalTable, apply_rows
from refusal_plugins.params import RefusalParams, parse_refusal_params
from refusal_plugins.rule import ShadowRule
from refusal_plugins.vocab import ControlToken, RefusalManifest, scheme_keys

from .helpers import categorical_manifest

VOCAB = 40


def manifest(scheme: str) -> RefusalManifest:
    keys = scheme_keys(scheme)  # type: ignore[arg-type]
    return RefusalManifest(
        scheme=scheme,  # type: ignore[arg-type]
        tokens=tuple(ControlToken(k, f"[{k}]", 30 + i, None) for i, k in enumerate(keys)),
    )


def processor_decision(man: RefusalManifest, logits: list[float], fields: dict) -> str:
    """What the processor makes a greedy request emit at the decision position."""
    table = RefusalTable(man, max_rows=1, device=torch.device("cpu"))
    params = parse_refusal_params(fields)
    # Through the gateway every request is restricted to control tokens (decide=True).
    table.write(0, RefusalParams(params.bias, params.threshold, params.temperature, True))
    row = torch.tensor([logits], dtype=torch.float32)
    yes = torch.tensor([True])
    apply_rows(table, row, None, yes, torch.tensor([False]), torch.tensor([0]))
    ctrl = row[0, table.ctrl_ids]
    return man.tokens[int(ctrl.argmax())].key


def control_probabilities(man: RefusalManifest, logits: list[float]) -> dict[str, float]:
    """What the decision report carries: softmax over the whole vocabulary, before bias."""
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0)
    return {t.key: float(p[t.id]) for t in man.tokens}


def shadow_decision(man: RefusalManifest, probs: dict[str, float], fields: dict) -> str:
    keys = [t.key for t in man.tokens]
    rule = ShadowRule.from_params(parse_refusal_params(fields), keys)
    return keys[rule.decide([probs[k] for k in keys])]


def random_fields(rng: random.Random, keys: list[str], temperature: bool) -> dict:
    refusal = [k for k in keys[1:]] + (["refuse"] if "refuse" not in keys else [])
    fields: dict = {}
    bias = {
        k: rng.choice([-4.0, -1.0, 0.5, 2.0, 6.0])
        for k in rng.sample(refusal, rng.randint(0, min(2, len(refusal))))
    }
    if bias:
        fields["refusal_bias"] = bias
    if rng.random() < 0.8:
        thr = {
            k: rng.choice([0.0, 0.05, 0.2, 0.5, 0.9])
            for k in rng.sample(refusal, rng.randint(1, min(2, len(refusal))))
        }
        fields["refusal_threshold"] = thr
    if temperature:
        fields["refusal_temperature"] = rng.choice([0.5, 2.0, 4.0])
    return fields


def random_logits(rng: random.Random, man: RefusalManifest, one_other_token: bool) -> list[float]:
    """Logits where the control tokens compete with the rest of the vocabulary."""
    ids = set(man.ids)
    logits = [
        -40.0 if one_other_token and i not in ids else rng.gauss(0.0, 2.0) for i in range(VOCAB)
    ]
    if one_other_token:  # all non-control mass on one token
        logits[next(i for i in range(VOCAB) if i not in ids)] = rng.gauss(2.0, 2.0)
    for i in man.ids:
        logits[i] = rng.gauss(1.0, 3.0)
    return logits


@pytest.mark.parametrize("scheme", ["categorical", "binary"])
def test_at_temperature_one_the_shadow_equals_the_processor(scheme: str) -> None:
    man, rng = manifest(scheme), random.Random(7)
    keys = [t.key for t in man.tokens]
    forced_refusals = 0
    for _ in range(400):
        logits = random_logits(rng, man, one_other_token=False)
        fields = random_fields(rng, keys, temperature=False)
        want = processor_decision(man, logits, fields)
        got = shadow_decision(man, control_probabilities(man, logits), fields)
        assert got == want, (logits, fields)
        forced_refusals += want != "respond"
    assert 20 < forced_refusals < 380  # the sample exercises both outcomes


@pytest.mark.parametrize("scheme", ["categorical", "binary"])
def test_at_other_temperatures_it_is_exact_when_the_rest_is_one_token(scheme: str) -> None:
    man, rng = manifest(scheme), random.Random(11)
    keys = [t.key for t in man.tokens]
    for _ in range(300):
        logits = random_logits(rng, man, one_other_token=True)
        fields = random_fields(rng, keys, temperature=True)
        want = processor_decision(man, logits, fields)
        got = shadow_decision(man, control_probabilities(man, logits), fields)
        assert got == want, (logits, fields)


def test_the_estimate_errs_in_the_documented_direction() -> None:
    """Spread non-control mass: p[c*] is underestimated for T < 1, overestimated for T > 1."""
    man = manifest("binary")
    keys = [t.key for t in man.tokens]
    # respond and refuse tiny, the rest spread evenly over 38 tokens.
    logits = [0.0] * VOCAB
    logits[man.ids[0]], logits[man.ids[1]] = -3.0, -2.0
    probs = control_probabilities(man, logits)
    rule = {
        T: ShadowRule.from_params(parse_refusal_params({"refusal_temperature": T}), keys)
        for T in (0.5, 2.0)
    }
    values = [probs[k] for k in keys]
    for T, bound in ((0.5, "lower"), (2.0, "upper")):
        scaled = torch.tensor(logits, dtype=torch.float64) / T
        exact = float(torch.softmax(scaled, dim=0)[man.ids[1]])
        estimate = rule[T].p_star(values, [math.log(v) for v in values], 1)
        assert (estimate < exact) if bound == "lower" else (estimate > exact), (T, estimate, exact)


def test_no_threshold_is_the_greedy_choice_after_bias() -> None:
    man = categorical_manifest()
    keys = [t.key for t in man.tokens]
    probs = [0.6, 0.01, 0.01, 0.01, 0.3, 0.01]
    assert keys[ShadowRule.from_params(parse_refusal_params({}), keys).decide(probs)] == "respond"
    strict = ShadowRule.from_params(parse_refusal_params({"refusal_bias": {"refuse": 1.0}}), keys)
    assert keys[strict.decide(probs)] == "safety"  # log(0.3) + 1 > log(0.6)
    # A category's own bias adds to the general one.
    both = ShadowRule.from_params(
        parse_refusal_params({"refusal_bias": {"refuse": 1.0, "safety": -2.0}}), keys
    )
    assert keys[both.decide(probs)] == "respond"


def test_a_masked_category_is_never_forced() -> None:
    keys = [t.key for t in manifest("binary").tokens]
    rule = ShadowRule.from_params(parse_refusal_params({"refusal_threshold": 0.0}), keys)
    assert keys[rule.decide([0.9, 0.0])] == "respond"
    assert keys[rule.decide([0.9, 0.001])] == "refuse"  # threshold 0 forces any finite c*


POLICY = {
    "default_profile": "balanced",
    "profiles": {
        "balanced": {},
        "strict": {"refusal_bias": {"refuse": 3.0}, "refusal_threshold": {"safety": 0.2}},
        "permissive": {"refusal_bias": {"safety": -2.0}},
    },
    "shadow_profiles": ["strict", "permissive"],
}


def _sample(registry: CollectorRegistry, profile: str, category: str) -> float:
    value = registry.get_sample_value(
        "refusal_gateway_shadow_decisions_total",
        {"model": "m", "profile": profile, "category": category},
    )
    assert value is not None, (profile, category)
    return value


def test_observe_counts_each_shadow_profile_by_category() -> None:
    man, registry = categorical_manifest(), CollectorRegistry()
    shadow = ShadowDecisions.from_policy(
        Policy(PolicyFile.model_validate(POLICY)), man, "m", registry
    )
    assert shadow is not None
    keys = [t.key for t in man.tokens]
    # Every label set exists before the first request.
    assert all(_sample(registry, p, k) == 0.0 for p in ("strict", "permissive") for k in keys)
    probs = dict(zip(keys, [0.6, 0.01, 0.01, 0.01, 0.3, 0.01], strict=True))
    assert shadow.decide(probs) == {"strict": "safety", "permissive": "respond"}
    shadow.observe(probs)
    shadow.observe(probs)
    shadow.observe(dict(zip(keys, [0.99, 0.0, 0.0, 0.0, 0.005, 0.0], strict=True)))
    assert _sample(registry, "strict", "safety") == 2.0
    assert _sample(registry, "strict", "respond") == 1.0
    assert _sample(registry, "permissive", "respond") == 3.0
    assert _sample(registry, "permissive", "safety") == 0.0


def test_no_shadow_profiles_means_no_shadow() -> None:
    policy = Policy(
        PolicyFile.model_validate({k: v for k, v in POLICY.items() if k != "shadow_profiles"})
    )
    assert (
        ShadowDecisions.from_policy(policy, categorical_manifest(), "m", CollectorRegistry())
        is None
    )


def test_shadow_profiles_must_name_existing_profiles() -> None:
    with pytest.raises(ValidationError, match="unknown profiles referenced"):
        PolicyFile.model_validate({**POLICY, "shadow_profiles": ["strict", "paranoid"]})
    assert list(Policy(PolicyFile.model_validate(POLICY)).shadow_params()) == [
        "strict",
        "permissive",
    ]
