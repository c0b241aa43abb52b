"""Profiles and API-key policy: precedence, bounds, authentication."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from refusal_gateway.errors import GatewayError
from refusal_gateway.policy import Policy, PolicyFile, hash_key
from refusal_plugins.params import RefusalParams

POLICY = {
    "default_profile": "balanced",
    "profiles": {
        "strict": {"refusal_bias": {"refuse": 3.0}, "refusal_threshold": {"safety": 0.2}},
        "balanced": {},
        "permissive": {"refusal_bias": {"safety": -2.0, "humanizing": -4.0}},
    },
    "api_keys": [
        {"name": "tenant-a", "sha256": hash_key("key-a"), "profiles": ["strict", "balanced"],
         "default_profile": "strict",
         "bounds": {"refusal_bias": {"safety": {"min": 0.0}}, "refusal_threshold": {"safety": {"max": 0.5}}}},
        {"name": "admin", "sha256": hash_key("key-admin")},
    ],
}


@pytest.fixture
def policy() -> Policy:
    return Policy(PolicyFile.model_validate(POLICY))


def test_precedence_default_profile_then_request(policy):
    params, name = policy.resolve(None, RefusalParams(bias={"humanizing": 1.0}), None)
    assert name == "balanced" and params.bias == {"humanizing": 1.0}
    params, name = policy.resolve("permissive", RefusalParams(bias={"safety": 0.5}), None)
    assert name == "permissive"
    assert params.bias == {"safety": -1.5, "humanizing": -4.0}  # the request adjusts the profile
    params, _ = policy.resolve("strict", RefusalParams(threshold={"safety": 0.6}), None)
    assert params.threshold == {"safety": 0.6}  # a request's threshold replaces the profile's


def test_a_requests_own_temperature_overrides_the_profiles_even_at_one():
    """1.0 is a value like any other: only an absent temperature keeps the profile's."""
    from refusal_plugins.params import parse_refusal_params

    policy = Policy(PolicyFile.model_validate(
        {"profiles": {"sharp": {"refusal_threshold": 0.5, "refusal_temperature": 0.25}}}))
    given = parse_refusal_params({"refusal_temperature": 1.0})
    params, _ = policy.resolve("sharp", given, None)
    assert params.temperature == 1.0
    params, _ = policy.resolve("sharp", parse_refusal_params({}), None)
    assert params.temperature == 0.25
    params, _ = policy.resolve(None, parse_refusal_params({}), None)
    assert params.temperature is None and params.effective_temperature == 1.0


def test_unknown_profile_is_a_400(policy):
    with pytest.raises(GatewayError) as info:
        policy.resolve("lenient", RefusalParams(), None)
    assert info.value.status == 400 and info.value.param == "refusal_profile"
    for bad in (3, ""):  # an empty name must not fall back to the default profile silently
        with pytest.raises(GatewayError) as info:
            policy.resolve(bad, RefusalParams(), None)
        assert info.value.status == 400 and info.value.param == "refusal_profile"


def test_keys_authenticate_by_hash(policy):
    assert policy.authenticate("Bearer key-a").name == "tenant-a"
    assert policy.authenticate("bearer key-admin").name == "admin"
    for header in (None, "", "Bearer", "Basic key-a", "Bearer wrong"):
        with pytest.raises(GatewayError) as info:
            policy.authenticate(header)
        assert info.value.status == 401 and info.value.type == "authentication_error"
    assert Policy(PolicyFile()).authenticate(None) is None  # no keys configured: open


def test_key_bounds_allow_tightening_only(policy):
    key = policy.authenticate("Bearer key-a")
    params, name = policy.resolve(None, RefusalParams(bias={"safety": 2.0}), key)
    assert name == "strict" and params.bias == {"refuse": 3.0, "safety": 2.0}
    with pytest.raises(GatewayError) as info:  # 3 (refuse) - 5 = -2 < 0
        policy.resolve(None, RefusalParams(bias={"safety": -5.0}), key)
    assert info.value.status == 403 and info.value.param == "refusal_bias.safety"
    assert "tenant-a" in info.value.message
    with pytest.raises(GatewayError) as info:
        policy.resolve("permissive", RefusalParams(), key)  # not among its profiles
    assert info.value.status == 403
    with pytest.raises(GatewayError) as info:  # threshold 0.9 > max 0.5: loosening
        policy.resolve("strict", RefusalParams(threshold={"safety": 0.9}), key)
    assert info.value.param == "refusal_threshold.safety"
    with pytest.raises(GatewayError):  # balanced has no threshold, so none is forced
        policy.resolve("balanced", RefusalParams(bias={"safety": 1.0}), key)


def test_merged_bias_stays_in_range(policy):
    with pytest.raises(GatewayError) as info:
        policy.resolve("strict", RefusalParams(bias={"refuse": 99.0}), None)
    assert info.value.status == 400 and info.value.param == "refusal_bias.refuse"


@pytest.mark.parametrize(
    "broken",
    [
        {"default_profile": "missing"},
        {"profiles": {"x": {"refusal_bias": {"violence": 1}}}},
        {"profiles": {"x": {"refusal_bias": {"safety": 1000}}}},
        {"api_keys": [{"name": "a", "sha256": "plaintext-key"}]},
        {"profiles": {"x": {"refusal_bias": {}, "typo": 1}}},
    ],
)
def test_broken_policy_files_fail_at_load(broken):
    with pytest.raises((ValidationError, ValueError)):
        PolicyFile.model_validate(broken)


def test_load_yaml(tmp_path):
    import yaml

    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    assert Policy.load(path).profile_names == ["balanced", "permissive", "strict"]
