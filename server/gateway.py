"""One request's journey through the refusal service: validate, resolve, count, decide.

The ASGI middleware (:mod:`refusal_gateway.middleware`) moves bytes; this is
the service it calls: the body in (:meth:`Gateway.prepare`: parse, route,
validate, apply the policy, defuse), the decision report once the first token
exists (:meth:`Gateway.learn`), and the judging and counting of each choice's
decision (:meth:`Gateway.recorder`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_plugins.vocab import RefusalManifest
from starlette.types import Send

from .access_log import RequestLog
from .canary_check import CanaryCheck
from .errors import GatewayError, bad_request, send_error
from .metrics import NO_PROFILE, BoundMetrics, get_metrics, reason_for_status
from .policy import ApiKey, Policy
from .protocol import RequestPlan, prepare_chat_request, prepare_completion_request
from .refusal import CHAT_DELTA, CHAT_MESSAGE, COMPLETION_TEXT, ControlText, Decision, TextShape
from .reports import DecisionInbox
from .scrub import Specials, special_tokens
from .settings import GatewaySettings
from .shadow import ShadowDecisions
from .stream import StreamRewriter


@dataclass(frozen=True)
class Route:
    """One endpoint the layer owns: how its request is prepared, where its text lives."""

    prepare: Callable[..., RequestPlan]
    message: TextShape
    delta: TextShape


ROUTES = {
    "/v1/chat/completions": Route(prepare_chat_request, CHAT_MESSAGE, CHAT_DELTA),
    "/v1/completions": Route(prepare_completion_request, COMPLETION_TEXT, COMPLETION_TEXT),
}


@dataclass
class Outcome:
    """What the response side learns about one request beyond its text."""

    #: The model's own control-token probabilities (the engine's decision report).
    probabilities: dict[str, float] | None = None
    #: The canary prompt's expected behaviour, for canary requests only.
    canary: str | None = None


class Gateway:
    """The refusal service of one served model: manifest, text handling, metrics."""

    def __init__(
        self,
        settings: GatewaySettings,
        manifest: RefusalManifest,
        policy: Policy | None = None,
        registry=None,
        model_dir: Path | None = None,
    ):
        self.settings = settings
        self.manifest = manifest
        self.policy = policy or Policy.load(settings.policy_file)
        specials = special_tokens(model_dir, manifest.by_text())
        self.control = ControlText(manifest, specials)
        self.specials = Specials(specials)
        self.model_name = settings.model_name()
        metrics = get_metrics() if registry is None else get_metrics(registry)
        keys = [t.key for t in manifest.tokens] + ["none"]
        self.metrics = BoundMetrics(metrics, self.model_name, keys, self.policy.profile_names)
        #: What-if profiles: counted from the model's own probabilities, never enforced.
        self.shadow = ShadowDecisions.from_policy(self.policy, manifest, self.model_name, registry)
        self.inbox = DecisionInbox([t.key for t in manifest.tokens], settings.decision_report_wait_s)
        self.canary = CanaryCheck.from_environment()

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Gateway:
        model_dir = settings.model_dir()
        return cls(settings, RefusalManifest.load(model_dir), model_dir=model_dir)

    @property
    def copy_content(self) -> bool:
        return self.settings.refusal_content == "copy"

    async def learn(self, plan: RequestPlan, outcome: Outcome) -> None:
        """Fetch the engine's decision report once the first bytes of a response exist."""
        if plan.report_id is None:
            return
        outcome.probabilities = await self.inbox.take(plan.report_id)
        if outcome.probabilities is not None and outcome.canary is None:
            p_refuse = sum(p for k, p in outcome.probabilities.items() if k != "respond")
            self.metrics.refusal_probability[plan.profile or NO_PROFILE].observe(p_refuse)
            if self.shadow is not None:
                self.shadow.observe(outcome.probabilities)

    def recorder(self, plan: RequestPlan, log: RequestLog, outcome: Outcome):
        """Judges, counts and logs each decision of one request; returns its JSON."""
        profile = plan.profile or NO_PROFILE
        counters = self.metrics.control_tokens
        controlled = plan.controls != "none"

        def record(decision: Decision, from_logprobs: dict[str, float] | None) -> dict[str, Any]:
            probabilities = outcome.probabilities or from_logprobs
            source = decision.source(probabilities, controlled)
            if outcome.canary is None:
                counters[decision.key, profile, source].inc()
            else:  # synthetic traffic: only in the canary series
                result = "none" if decision.token is None else ("refuse" if decision.refused else "respond")
                self.metrics.canary(outcome.canary, result).inc()
            log.decisions.append(decision.key)
            return decision.to_json(probabilities, source)

        return record

    def reject(self, error: GatewayError) -> None:
        self.metrics.rejected[reason_for_status(error.status)].inc()

    async def refuse(self, send: Send, error: GatewayError) -> None:
        """Answer ``error`` in OpenAI's envelope, and count it."""
        self.reject(error)
        await send_error(send, error)

    # -- request side --------------------------------------------------------
    def prepare(
        self, raw: bytes, path: str, key: ApiKey | None = None, canary: str | None = None
    ) -> tuple[bytes, RequestPlan, Route]:
        body = parse_body(raw)
        route = self.route_for(path, body)
        plan = route.prepare(body, self.manifest, self.control, self.policy, key, self.inbox)
        if canary is None:
            self.metrics.requests[plan.controls, plan.profile or NO_PROFILE].inc()
        try:
            encoded = json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
        except ValueError:
            raise bad_request(
                "NaN and Infinity are not valid JSON numbers", code="invalid_json"
            ) from None
        return encoded, plan, route

    @staticmethod
    def route_for(path: str, body: dict[str, Any]) -> Route:
        """The layer route of ``path``; SageMaker's ``/invocations`` by its body's shape."""
        if path != "/invocations":
            return ROUTES[path]
        if "messages" in body:
            return ROUTES["/v1/chat/completions"]
        if "prompt" in body:
            return ROUTES["/v1/completions"]
        raise bad_request(
            "/invocations serves chat completions (messages) and text completions (prompt) "
            "only on this server",
            code="unsupported_request",
        )

    # -- response side -------------------------------------------------------
    def stream_rewriter(
        self, plan: RequestPlan, shape: TextShape, log: RequestLog, outcome: Outcome
    ) -> StreamRewriter:
        record = self.recorder(plan, log, outcome)
        return StreamRewriter(self.control, plan, self.copy_content, record, shape, self.specials)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (never a 500).

    Invalid UTF-8 and integers too long to parse are errors, and nesting too
    deep for the parser is a 400 rather than a ``RecursionError``.
    ``NaN``/``Infinity`` literals parse, so that the field holding one is
    named in its 400; none is ever passed on (see :meth:`Gateway.prepare`).
    """
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad_request("request body nests too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    return body
