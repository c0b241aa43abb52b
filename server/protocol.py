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
from typing import Any

from refusal_plugins.params import (
    BIAS_FIELD,
    DECIDE_FIELD,
    TEMPERATURE_FIELD,
    THRESHOLD_FIELD,
    RefusalParamError,
    RefusalParams,
    flatten_refusal_params,
    parse_refusal_params,
)
from refusal_plugins.vocab import RefusalManifest

from .errors import bad_request
from .refusal import ControlText

#: Top-level request fields of the refusal API.
REQUEST_FIELDS = (BIAS_FIELD, THRESHOLD_FIELD, TEMPERATURE_FIELD)


@dataclass(frozen=True)
class RequestPlan:
    """What the response side needs to know about a rewritten request."""

    stream: bool
    n: int
    params: RefusalParams

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
    for key in [k for k in body if k.startswith("refusal_")]:
        if key not in REQUEST_FIELDS:
            raise bad_request(
                f"unknown field {key!r}; refusal fields are {list(REQUEST_FIELDS)}",
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
            if field == DECIDE_FIELD:
                continue
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


def prepare_chat_request(
    body: dict[str, Any], manifest: RefusalManifest, control: ControlText
) -> RequestPlan:
    """Rewrite a chat-completions body in place for vLLM; return the response plan."""
    params = replace(take_refusal_params(body, manifest), decide=True)
    control.neutralise_messages(body.get("messages"))
    # The layer reads the decision from the text, so vLLM must keep special tokens.
    body["skip_special_tokens"] = False
    body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), **flatten_refusal_params(params)}
    n = body.get("n")
    return RequestPlan(
        stream=body.get("stream") is True,
        n=n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1,
        params=params,
    )
