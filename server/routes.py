"""Which of vLLM's routes the server serves, and how: default deny.

vLLM's OpenAI server keeps adding generation routes (responses, Anthropic
messages, batch chat, SageMaker invocations, token-in/token-out generate,
render, scoring …). A route that reaches the engine without passing the layer
skips validation, policy, API-key bounds, control-token defusing, hiding and
metrics — a bypass. So the layer decides for every path:

* ``layer``: passes through the refusal layer (chat and text completions, and
  SageMaker's ``/invocations`` when its body is one of those);
* ``open``: probes, scrapes and model listing, passed to vLLM untouched;
* anything else: answered by the layer with a 404 that says why.

At startup the layer lists the app's routes (:func:`route_report`) and logs
any route nobody decided about (it is closed, like every other unlisted
path); the e2e suite fails on such a route, so a vLLM upgrade cannot open a
hole silently.
"""

from __future__ import annotations

from typing import Any, Literal

Decision = Literal["layer", "open", "closed"]

#: Paths whose POST bodies pass through the refusal layer.
LAYER_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/invocations"})
#: Paths passed to vLLM untouched: probes, scrapes, version, model listing.
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version", "/v1/models"})
#: Paths open without an API key (probes and scrapes).
UNAUTHENTICATED_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})

_GENERATION = "it generates without the refusal policy; use /v1/chat/completions or /v1/completions"
#: Routes vLLM 0.32 registers that the layer closes, with the reason a client reads.
CLOSED: dict[str, str] = {
    "/v1/responses": _GENERATION,
    "/v1/responses/{response_id}": _GENERATION,
    "/v1/responses/{response_id}/cancel": _GENERATION,
    "/v1/messages": _GENERATION,
    "/v1/messages/count_tokens": "it tokenizes requests outside the refusal layer",
    "/v1/chat/completions/batch": _GENERATION,
    "/inference/v1/generate": _GENERATION,
    "/v1/chat/completions/render": "it renders prompts outside the refusal layer",
    "/v1/completions/render": "it renders prompts outside the refusal layer",
    "/v1/messages/render": "it renders prompts outside the refusal layer",
    "/v1/responses/render": "it renders prompts outside the refusal layer",
    "/v1/chat/completions/derender": "it decodes token ids outside the refusal layer",
    "/v1/completions/derender": "it decodes token ids outside the refusal layer",
    "/generative_scoring": _GENERATION,
    "/inference/v1/abort_requests": "a vLLM operator route, not part of this API",
    "/scale_elastic_ep": "a vLLM operator route, not part of this API",
    "/is_scaling_elastic_ep": "a vLLM operator route, not part of this API",
    "/v1/systemone": _GENERATION,
    "/tokenize": "it tokenizes text outside the refusal layer",
    "/detokenize": "it decodes token ids outside the refusal layer",
    "/tokenizer_info": "it exposes the tokenizer, control tokens included",
    "/load": "a vLLM operator route, not part of this API",
    "/kv_event_sources": "a vLLM operator route, not part of this API",
    "/fault_tolerance/status": "a vLLM operator route, not part of this API",
    "/fault_tolerance/apply": "a vLLM operator route, not part of this API",
    "/openapi.json": "vLLM's schema does not describe this server's API (see the README)",
    "/docs": "vLLM's schema does not describe this server's API (see the README)",
    "/docs/oauth2-redirect": "vLLM's schema does not describe this server's API",
    "/redoc": "vLLM's schema does not describe this server's API (see the README)",
}
DEFAULT_REASON = "this server serves only /v1/chat/completions and /v1/completions"


def decide(path: str) -> Decision:
    if path in LAYER_PATHS:
        return "layer"
    if path in OPEN_PATHS:
        return "open"
    return "closed"


def closed_reason(path: str) -> str:
    return CLOSED.get(path, DEFAULT_REASON)


def route_report(app: Any) -> dict[str, list[str]]:
    """The app's routes by decision; ``undecided`` lists routes in no table above."""
    report: dict[str, list[str]] = {"layer": [], "open": [], "closed": [], "undecided": []}
    for route in getattr(app, "routes", []) or []:
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        decision = decide(path)
        if decision == "closed" and path not in CLOSED:
            report["undecided"].append(path)
        report[decision].append(path)
    return {k: sorted(set(v)) for k, v in report.items()}
