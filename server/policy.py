"""Refusal profiles and API-key policy: the effective refusal settings of one request.

The policy file (YAML or JSON, the same on every replica — a ConfigMap in
Kubernetes) names refusal profiles and, optionally, API keys::

    default_profile: balanced          # used when a request names none
    request_rules:                     # what clients may send around a request (defaults shown)
      system_messages: allow           # system/developer messages
      assistant_prefill: reject        # continue_final_message / add_generation_prompt: false
      raw_prompts: allow               # /v1/completions
    profiles:
      strict:     {refusal_bias: {refuse: 3.0}, request_rules: {system_messages: reject}}
      balanced:   {}
      permissive: {refusal_bias: {safety: -2.0, humanizing: -4.0}}
    api_keys:                          # when present, /v1 needs "Authorization: Bearer <key>"
      - name: tenant-a
        sha256: 9f86d08...             # hex SHA-256 of the key (never the key itself)
        profiles: [strict, balanced]   # profiles this key may use (default: all)
        default_profile: strict
        bounds:                        # limits on the effective settings of this key
          refusal_bias: {safety: {min: 0.0}}         # may tighten safety, never loosen it
          refusal_threshold: {safety: {max: 0.5}}

Precedence (spelled out in :meth:`Policy.resolve`): server default profile or
the key's default → the requested ``refusal_profile`` → the request's own
fields. Biases add up (a request *adjusts* its profile); a request's threshold
or temperature replaces the profile's for that key. The key's bounds are
checked on the result: violations are 403, unknown profiles 400. The request
rules (:mod:`.request_rules`) are the server's, overridden by the profile the
request runs under; a rejected request is a 403 too.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from refusal_plugins.params import (
    BIAS_FIELD,
    BIAS_LIMIT,
    THRESHOLD_FIELD,
    RefusalParams,
    parse_refusal_params,
)

from .errors import GatewayError, bad_request
from .request_rules import RequestRules

PROFILE_FIELD = "refusal_profile"


class Bound(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None


class Profile(BaseModel):
    """A named set of refusal settings (the request fields, minus the profile)."""

    model_config = ConfigDict(extra="forbid")
    refusal_bias: dict[str, float] = Field(default_factory=dict)
    refusal_threshold: float | dict[str, float] | None = None
    refusal_temperature: float | None = None
    #: Overrides of the server-wide request rules for requests under this profile.
    request_rules: RequestRules | None = None

    def params(self) -> RefusalParams:
        fields = self.model_dump(exclude_none=True, exclude_defaults=False, exclude={"request_rules"})
        return parse_refusal_params(fields)


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    sha256: str = Field(description="hex SHA-256 of the key")
    profiles: list[str] | None = None
    default_profile: str | None = None
    bounds: dict[str, dict[str, Bound]] = Field(default_factory=dict)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("sha256 must be 64 hex characters (the key's SHA-256, not the key)")
        return value

    @field_validator("bounds")
    @classmethod
    def _bounded_fields(cls, value: dict[str, dict[str, Bound]]) -> dict[str, dict[str, Bound]]:
        unknown = set(value) - {BIAS_FIELD, THRESHOLD_FIELD}
        if unknown:
            raise ValueError(f"bounds may limit {BIAS_FIELD} and {THRESHOLD_FIELD}, not {unknown}")
        return value


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default_profile: str | None = None
    #: What clients may put around a request (system messages, prefill, raw prompts).
    request_rules: RequestRules = Field(default_factory=RequestRules)
    profiles: dict[str, Profile] = Field(default_factory=dict)
    api_keys: list[ApiKey] = Field(default_factory=list)
    #: What-if profiles: for every request, the decision each would have made is
    #: counted (refusal_gateway_shadow_decisions_total; refusal_gateway.shadow).
    shadow_profiles: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> PolicyFile:
        names = set(self.profiles)
        refs = [self.default_profile] + [k.default_profile for k in self.api_keys]
        refs += [p for k in self.api_keys for p in k.profiles or []]
        refs += self.shadow_profiles
        missing = {r for r in refs if r is not None and r not in names}
        if missing:
            raise ValueError(f"unknown profiles referenced: {sorted(missing)}")
        for profile in self.profiles.values():
            profile.params()  # the same validation as a request's fields
        return self


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Policy:
    """The loaded policy: profile lookup, key authentication, bounds."""

    def __init__(self, policy: PolicyFile):
        self.file = policy
        self._profiles = {name: p.params() for name, p in policy.profiles.items()}

    @classmethod
    def load(cls, path: str | Path | None) -> Policy:
        if path is None:
            return cls(PolicyFile())
        text = Path(path).read_text()
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        return cls(PolicyFile.model_validate(data))

    @property
    def requires_key(self) -> bool:
        return bool(self.file.api_keys)

    @property
    def profile_names(self) -> list[str]:
        return sorted(self._profiles)

    def shadow_params(self) -> dict[str, RefusalParams]:
        """The settings of each shadow profile (policy file order, duplicates once)."""
        return {name: self._profiles[name] for name in self.file.shadow_profiles}

    def rules(self, profile: str | None) -> RequestRules:
        """The request rules that apply under ``profile`` (None: the server-wide ones)."""
        own = self.file.profiles[profile].request_rules if profile is not None else None
        return self.file.request_rules.overridden(own)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key entry; 401 when keys are configured and this one is not."""
        if not self.requires_key:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayError(
                401, "missing API key: send 'Authorization: Bearer <key>'",
                type="authentication_error", code="invalid_api_key",
            )
        digest = hash_key(token.strip())
        match = None
        for entry in self.file.api_keys:  # compare against every entry: constant-time per key
            if secrets.compare_digest(entry.sha256, digest):
                match = entry
        if match is None:
            raise GatewayError(
                401, "invalid API key", type="authentication_error", code="invalid_api_key"
            )
        return match

    def resolve(
        self, profile_name: Any, request: RefusalParams, key: ApiKey | None
    ) -> tuple[RefusalParams, str | None]:
        """Effective settings and the profile used: default → profile → request."""
        if profile_name is not None and (not isinstance(profile_name, str) or not profile_name):
            raise bad_request(f"{PROFILE_FIELD} must be a non-empty string", param=PROFILE_FIELD)
        name = profile_name or (key.default_profile if key else None) or self.file.default_profile
        base = RefusalParams()
        if name is not None:
            if name not in self._profiles:
                raise bad_request(
                    f"unknown {PROFILE_FIELD} {name!r}; profiles: {self.profile_names}",
                    param=PROFILE_FIELD, code="unknown_profile",
                )
            if key is not None and key.profiles is not None and name not in key.profiles:
                raise GatewayError(
                    403, f"API key {key.name!r} may not use profile {name!r}; allowed: {key.profiles}",
                    param=PROFILE_FIELD, type="permission_error", code="profile_not_allowed",
                )
            base = self._profiles[name]
        merged = _merge(base, request)
        if key is not None:
            _check_bounds(merged, key)
        return merged, name


def _merge(base: RefusalParams, request: RefusalParams) -> RefusalParams:
    """Profile then request, as objects: biases add up, a given threshold or temperature wins.

    Both sides were validated when they were parsed; only a sum of biases can
    leave the allowed range, so that is the one check here.
    """
    bias = dict(base.bias)
    for key, value in request.bias.items():
        total = bias.get(key, 0.0) + value
        if not -BIAS_LIMIT <= total <= BIAS_LIMIT:
            raise bad_request(
                f"profile plus request: {BIAS_FIELD}.{key} adds up to {total:g}, outside "
                f"[-{BIAS_LIMIT:g}, {BIAS_LIMIT:g}]",
                param=f"{BIAS_FIELD}.{key}",
            )
        bias[key] = total
    # None means "not given": a request's explicit 1.0 overrides the profile's temperature.
    temperature = request.temperature if request.temperature is not None else base.temperature
    return RefusalParams(bias, {**base.threshold, **request.threshold}, temperature, request.decide)


def _effective(values: Mapping[str, float], key: str) -> float | None:
    """The value that applies to ``key``: its own, else the general ``refuse`` one."""
    return values.get(key, values.get("refuse"))


def _check_bounds(params: RefusalParams, key: ApiKey) -> None:
    fields = {BIAS_FIELD: params.bias, THRESHOLD_FIELD: params.threshold}
    for field, bounds in key.bounds.items():
        for category, bound in bounds.items():
            value = fields[field].get(category, 0.0 if field == BIAS_FIELD else None)
            if field == BIAS_FIELD and category != "refuse":
                value = (value or 0.0) + fields[field].get("refuse", 0.0)
            elif field == THRESHOLD_FIELD:
                value = _effective(fields[field], category)
                if value is None:
                    value = 1.0 if bound.max is not None else 0.0  # no threshold = never forced
            ok = (bound.min is None or value >= bound.min) and (bound.max is None or value <= bound.max)
            if not ok:
                limits = " and ".join(
                    f"{op} {v:g}" for op, v in ((">=", bound.min), ("<=", bound.max)) if v is not None
                )
                raise GatewayError(
                    403,
                    f"API key {key.name!r} may not set {field}.{category} to {value:g}: "
                    f"it must be {limits} (after the profile is applied)",
                    param=f"{field}.{category}", type="permission_error", code="policy_violation",
                )
