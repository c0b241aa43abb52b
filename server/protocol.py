"""The refusal fields of a request, and how a request body is rewritten for vLLM.

A client sends ``refusal_bias`` / ``refusal_threshold`` / ``refusal_temperature``
as top-level fields (the OpenAI SDK's ``extra_body``). vLLM would drop them
silently, so the layer takes them out, validates them with the engine's own
parser (one definition of what is valid), checks them against the model's
manifest and passes them on as flat ``vllm_xargs``. Any other top-level
``refusal_*`` field is an error, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

from refusal_plugins.params import (
    BIAS_FIELD,
    ENGINE_FIELDS,
    TEMPERATURE_FIELD,
    THRESHOLD_FIELD,
    RefusalParamError,
    RefusalParams,
    flatten_refusal_params,
    parse_refusal_params,
)
from refusal_plugins.vocab import RefusalManifest

from .errors import bad_request
from .fields import UNRENDERED, Kind, check_fields
from .policy import PROFILE_FIELD, ApiKey, Policy
from .refusal import ControlText
from .request_checks import check_token_ids, choice_count, is_structured
from .request_rules import check_request_rules


class Reports(Protocol):
    """Where decision reports go (:class:`refusal_gateway.reports.DecisionInbox`)."""

    name: str

    def new_id(self) -> str: ...


#: Top-level request fields of the refusal API.
REQUEST_FIELDS = (BIAS_FIELD, THRESHOLD_FIELD, TEMPERATURE_FIELD)


@dataclass(frozen=True)
class RequestPlan:
    """What the response side needs to know about a rewritten request."""

    stream: bool
    n: int
    params: RefusalParams
    profile: str | None = None
    #: Id of the engine's decision report (None: not asked, e.g. several prompts).
    report_id: str | None = None
    #: ``echo``: the response repeats the prompt before the decision token.
    echo: bool = False
    #: The client asked for logprobs: every event may carry control-token alternatives.
    logprobs: bool = False
    #: The client's ``skip_special_tokens`` (vLLM is always asked to keep them).
    skip_special: bool = True

    @property
    def controls(self) -> str:
        """Which refusal controls the request used (a bounded metric label)."""
        used = [name for name, on in (("bias", self.params.bias), ("threshold", self.params.threshold)) if on]
        return "+".join(used) or "none"


def take_refusal_params(body: dict[str, Any], manifest: RefusalManifest) -> RefusalParams:
    """Remove the refusal fields from ``body`` and return them validated.

    Raises ``GatewayError`` (400) naming the offending field.
    """
    given: dict[str, Any] = {}
    for key in [k for k in body if k.startswith("refusal_") and k != PROFILE_FIELD]:
        if key not in REQUEST_FIELDS:
            raise bad_request(
                f"unknown field {key!r}; refusal fields are {[*REQUEST_FIELDS, PROFILE_FIELD]}",
                param=key,
                code="unknown_field",
            )
        value = body.pop(key)
        if value is not None:
            given[key] = value
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise bad_request("vllm_xargs must be an object", param="vllm_xargs")
    if xargs:
        for key in [k for k in xargs if k.startswith("refusal_")]:
            field = key.partition(".")[0]
            if field in given:
                raise bad_request(
                    f"{field} given both as a field and in vllm_xargs ({key})", param=key
                )
            if field in ENGINE_FIELDS:
                raise bad_request(
                    f"vllm_xargs.{key} is set by the gateway, not by clients", param=key
                )
            given[key] = xargs.pop(key)
    try:
        params = parse_refusal_params(given)
    except RefusalParamError as e:
        raise bad_request(str(e), param=e.param) from None
    for field, keys in ((BIAS_FIELD, params.bias), (THRESHOLD_FIELD, params.threshold)):
        for key in keys:
            if key not in manifest.accepted_keys:
                raise bad_request(
                    f"{field}.{key}: this model ({manifest.scheme} scheme) has no category "
                    f"{key!r}; use one of {sorted(manifest.accepted_keys)}",
                    param=f"{field}.{key}",
                )
    return params


def _prepare(
    body: dict[str, Any],
    kind: Kind,
    manifest: RefusalManifest,
    control: ControlText,
    policy: Policy,
    key: ApiKey | None,
    prompts: int,
    report: Reports | None,
) -> RequestPlan:
    """The part both endpoints share: checks, settings in, ``vllm_xargs`` out.

    With one prompt, the engine is asked for a decision report (all ``n``
    choices share the prompt, so one report describes them all); several
    prompts would share one id, so they go without.
    """
    check_fields(body, kind)
    check_token_ids(body, control)
    n = choice_count(body)
    profile_name = body.pop(PROFILE_FIELD, None)
    requested = take_refusal_params(body, manifest)
    params, profile = policy.resolve(profile_name, requested, key)
    check_request_rules(body, kind, policy.rules(profile), profile)
    if is_structured(body) and (params.bias or params.threshold):
        raise bad_request(
            "structured output (response_format / structured_outputs) cannot be combined with "
            "refusal controls: its grammar masks the control tokens, so the controls would be "
            "ignored" + (f" (they come from profile {profile!r})" if profile else ""),
            param="response_format" if "response_format" in body else "structured_outputs",
            code="unsupported_combination",
        )
    try:  # field by field: the names are known (check_fields), their values are not
        for name in body:  # in chat, special tokens too, wherever the template may render them
            rendered = kind == "chat" and name not in UNRENDERED
            body[name] = control.neutralise_json(body[name], template=rendered, depth=2)
    except ValueError as e:
        raise bad_request(str(e), code="invalid_json") from None
    report_id = None
    if report is not None and prompts == 1:
        report_id = report.new_id()
        params = replace(params, report_to=report.name, report_id=report_id)
    params = replace(params, decide=True)
    skip_special = body.get("skip_special_tokens") is not False
    # The layer reads the decision from the text, so vLLM must keep special
    # tokens; the ones the client did not ask for are removed on the way out.
    body["skip_special_tokens"] = False
    body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), **flatten_refusal_params(params)}
    logprobs = any(
        body.get(name) is not None and body.get(name) is not False
        for name in ("logprobs", "top_logprobs", "prompt_logprobs")
    )
    return RequestPlan(
        stream=body.get("stream") is True,
        n=n * prompts,
        params=params,
        profile=profile,
        report_id=report_id,
        echo=body.get("echo") is True,
        logprobs=logprobs,
        skip_special=skip_special,
    )


def prepare_chat_request(
    body: dict[str, Any],
    manifest: RefusalManifest,
    control: ControlText,
    policy: Policy,
    key: ApiKey | None = None,
    report: Reports | None = None,
) -> RequestPlan:
    """Rewrite a chat-completions body in place for vLLM; return the response plan.

    Precedence: server/key default profile → ``refusal_profile`` → request fields.
    """
    return _prepare(body, "chat", manifest, control, policy, key, prompts=1, report=report)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a text completion, in vLLM's strict shapes, or a 400.

    vLLM would coerce ``[3, 300, 4100.0]`` or ``[3, 300, "4100"]`` into token
    ids, so a control-token id could reach the model that way: only JSON
    integers count as ids here.
    """
    if prompt is None or prompt == []:
        return []  # nothing to check: vLLM answers its own 400 ("at least one prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if _token_ids(prompt):
            return [prompt]
        if all(_token_ids(p) for p in prompt):
            return list(prompt)
    raise bad_request(
        "prompt must be a string, a list of strings, a list of token ids (JSON integers) or a "
        "list of such lists",
        param="prompt",
        code="invalid_type",
    )


def prepare_completion_request(
    body: dict[str, Any],
    manifest: RefusalManifest,
    control: ControlText,
    policy: Policy,
    key: ApiKey | None = None,
    report: Reports | None = None,
) -> RequestPlan:
    """Rewrite a text-completions body in place; prompts are defused like chat messages.

    A prompt given as token ids cannot be defused, so one that contains a
    control-token id (or a negative id) is refused (400) instead of reaching
    the model.
    """
    prompts = completion_prompts(body.get("prompt"))
    for p in prompts:
        if isinstance(p, list):
            if control.ids.intersection(p):
                raise bad_request(
                    "prompt token ids may not contain control tokens "
                    f"{sorted(control.ids)} (they are the model's decision)",
                    param="prompt",
                )
            if p and min(p) < 0:
                raise bad_request("prompt token ids must not be negative", param="prompt")
    return _prepare(
        body, "completion", manifest, control, policy, key, prompts=max(1, len(prompts)),
        report=report,
    )
