"""What-if (shadow) profiles, proven against the real engine.

A server whose policy file names ``strict`` as a shadow profile serves greedy
requests (temperature 0) without a profile; the layer counts, per request,
the decision ``strict`` would have made. The same prompts are then sent *with*
``refusal_profile: strict``: what they get, category by category, is what the
shadow counted. Greedy requests are where the shadow is exact (README: sampled
requests draw their decision; the shadow counts the most likely one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from refusal_gateway.canary import load_canary_prompts
from refusal_gateway.policy import Policy, PolicyFile
from refusal_plugins.rule import ShadowRule
from refusal_plugins.vocab import RefusalManifest

from .server import Server, running_server

pytestmark = pytest.mark.e2e

#: ``strict`` moves decisions both ways on the demo model: a general bias and a
#: low threshold force refusals, a negative humanizing bias removes some.
POLICY = """\
profiles:
  strict:
    refusal_bias: {refuse: 1.0, humanizing: -3.0}
    refusal_threshold: {refuse: 0.05}
shadow_profiles: [strict]
"""
SHADOW = "strict"


@pytest.fixture(scope="module")
def shadow_server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("shadow")
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    with running_server(demo_model_dir, tmp / "vllm.log", ["--policy-file", str(policy)]) as s:
        yield s


def _shadow_counts(server: Server) -> Counter[str]:
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(server.metrics_text()):
        for sample in family.samples:
            if (
                sample.name == "refusal_gateway_shadow_decisions_total"
                and sample.labels.get("profile") == SHADOW
                and sample.labels.get("model") == server.model
            ):
                counts[sample.labels["category"]] += sample.value
    return counts


def _decide(client: OpenAI, server: Server, prompt: str, profile: str | None) -> dict[str, Any]:
    response = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=1,
        temperature=0.0,
        extra_body={"refusal_profile": profile} if profile else None,
    )
    return response.choices[0].model_extra["refusal_decision"]


def _key(decision: dict[str, Any]) -> str:
    return decision["category"] if decision["refused"] else "respond"


@pytest.fixture(scope="module")
def sent(shadow_server: Server) -> dict[str, Any]:
    """The same prompts, first without a profile (shadowed), then with ``strict``."""
    client = OpenAI(base_url=shadow_server.api_url, api_key="unused", max_retries=0, timeout=120)
    prompts = [row.prompt for row in load_canary_prompts()]
    before = _shadow_counts(shadow_server)
    plain = [_decide(client, shadow_server, p, None) for p in prompts]
    after = _shadow_counts(shadow_server)
    strict = [_decide(client, shadow_server, p, SHADOW) for p in prompts]
    return {
        "prompts": prompts,
        "plain": plain,
        "strict": strict,
        "shadow": Counter(
            {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
        ),
    }


def test_strict_changes_decisions_on_these_prompts(sent) -> None:
    """The comparison below is not trivial: strict is not what the model does anyway."""
    assert [_key(d) for d in sent["plain"]] != [_key(d) for d in sent["strict"]]
    assert all(d["probabilities"] for d in sent["plain"]), "decision reports missing"


def test_the_shadow_rule_predicts_each_strict_decision_from_the_reported_probabilities(
    sent, shadow_server: Server
) -> None:
    """The rule itself, request by request, against what the processor enforced."""
    manifest = RefusalManifest.load(shadow_server.model_dir)
    keys = [t.key for t in manifest.tokens]
    policy = Policy(PolicyFile.model_validate(yaml.safe_load(POLICY)))
    rule = ShadowRule.from_params(policy.shadow_params()[SHADOW], keys)
    for prompt, plain, strict in zip(sent["prompts"], sent["plain"], sent["strict"], strict=True):
        predicted = keys[rule.decide([plain["probabilities"][k] for k in keys])]
        assert predicted == _key(strict), (prompt, plain["probabilities"], strict)


def test_shadow_counts_equal_what_the_same_requests_get_with_the_profile(sent) -> None:
    """Needs the layer to call ShadowDecisions.observe for each decision report."""
    assert sent["shadow"] == Counter(_key(d) for d in sent["strict"])
