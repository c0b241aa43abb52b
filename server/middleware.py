"""The gateway layer: a pure ASGI middleware that vLLM loads with ``--middleware``.

    vllm serve MODEL --middleware refusal_gateway.middleware.RefusalGatewayMiddleware \
        --logits-processors refusal_plugins.v1:RefusalLogitsProcessor

It owns ``POST /v1/chat/completions``, ``POST /v1/completions`` and SageMaker's
``POST /invocations``: the request body is validated and rewritten before
vLLM's handler sees it, and the response is rewritten on its way out (decision
read, control token hidden, chat refusal text moved to ``refusal``). Probes,
scrapes and the model list go straight to vLLM; every other route is closed
with a 404 that says why (default deny, :mod:`refusal_gateway.routes`). vLLM
builds the class with no arguments, so configuration comes from the
environment the launcher sets (see :mod:`refusal_gateway.settings`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_plugins.vocab import RefusalManifest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .canary import CANARY_EXPECT_HEADER, CANARY_HEADER, CANARY_SECRET_ENV
from .errors import GatewayError, bad_request, send_error
from .metrics import CANARY_EXPECTED, NO_PROFILE, BoundMetrics, get_metrics, reason_for_status
from .policy import ApiKey, Policy
from .protocol import RequestPlan, prepare_chat_request, prepare_completion_request
from .refusal import (
    CHAT_DELTA,
    CHAT_MESSAGE,
    COMPLETION_TEXT,
    ControlText,
    Decision,
    TextShape,
)
from .reports import DecisionInbox
from .routes import UNAUTHENTICATED_PATHS, closed_reason, decide, route_report
from .scrub import (
    Specials,
    special_tokens,
    strip_chat_logprobs,
    strip_completion_logprobs,
    strip_prompt_logprobs,
    strip_token_ids,
)
from .settings import GatewaySettings
from .stream import StreamRewriter

logger = logging.getLogger(__name__)
#: One JSON line per request the layer handles (its own logger, so it can be routed).
access_log = logging.getLogger("refusal_gateway.access")

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
#: The launcher's canary prober proves itself with a per-launch secret and
#: names the prompt's expected behaviour; only such requests are canaries.
CANARY_SECRET = CANARY_HEADER.lower().encode()
CANARY_EXPECT = CANARY_EXPECT_HEADER.lower().encode()
#: Longest X-Request-Id taken from a client (it is echoed back and logged).
MAX_REQUEST_ID = 256
#: What vLLM's 500 says when the EngineCore died under a request.
ENGINE_DEAD_MARKERS = (b"EngineCore encountered an issue", b"EngineDeadError")


@dataclass
class Outcome:
    """What the response side learns about one request beyond its text."""

    #: The model's own control-token probabilities (the engine's decision report).
    probabilities: dict[str, float] | None = None
    #: The canary prompt's expected behaviour, for canary requests only.
    canary: str | None = None


@dataclass
class RequestLog:
    """The one log line of a request: who, what was asked, what was decided, how long."""

    request_id: str
    path: str
    model: str
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    profile: str | None = None
    controls: str | None = None
    decisions: list[str] = field(default_factory=list)
    error: str | None = None

    def emit(self) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        line = {
            "request_id": self.request_id,
            "path": self.path,
            "model": self.model,
            "status": self.status,
            "profile": self.profile,
            "controls": self.controls,
            "decisions": self.decisions,
            "latency_ms": round((time.perf_counter() - self.started) * 1e3, 1),
        }
        if self.error:
            line["error"] = self.error
        access_log.info(json.dumps(line))


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
        self.control = ControlText(manifest)
        self.specials = Specials(special_tokens(model_dir, self.control))
        self.model_name = settings.model_name()
        metrics = get_metrics() if registry is None else get_metrics(registry)
        keys = [t.key for t in manifest.tokens] + ["none"]
        self.metrics = BoundMetrics(metrics, self.model_name, keys, self.policy.profile_names)
        self.inbox = DecisionInbox([t.key for t in manifest.tokens], settings.decision_report_wait_s)
        self.canary_secret = os.environ.get(CANARY_SECRET_ENV, "").encode()

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Gateway:
        model_dir = settings.model_dir()
        return cls(settings, RefusalManifest.load(model_dir), model_dir=model_dir)

    @property
    def copy_content(self) -> bool:
        return self.settings.refusal_content == "copy"

    def canary_expectation(self, scope: Scope) -> str | None:
        """The expected behaviour of a canary request, or None for any other request."""
        given = _header(scope, CANARY_SECRET, lower=False)
        if not (self.canary_secret and given and hmac.compare_digest(given, self.canary_secret)):
            return None
        expected = _header(scope, CANARY_EXPECT).decode()
        return expected if expected in CANARY_EXPECTED else None

    async def learn(self, plan: RequestPlan, outcome: Outcome) -> None:
        """Fetch the engine's decision report once the first bytes of a response exist."""
        if plan.report_id is None:
            return
        outcome.probabilities = await self.inbox.take(plan.report_id)
        if outcome.probabilities is not None and outcome.canary is None:
            p_refuse = sum(p for k, p in outcome.probabilities.items() if k != "respond")
            self.metrics.refusal_probability[plan.profile or NO_PROFILE].observe(p_refuse)

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
    def rewrite_completion(
        self, payload: Any, plan: RequestPlan, shape: TextShape, log: RequestLog, outcome: Outcome
    ) -> None:
        """Rewrite a non-streamed (chat or text) completion in place."""
        if not isinstance(payload, dict):
            return
        record = self.recorder(plan, log, outcome)
        specials = self.specials if plan.skip_special else Specials([])
        strip_prompt_logprobs(self.control, payload)
        for choice in payload.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            strip_token_ids(self.control, choice)
            strip_prompt_logprobs(self.control, choice)
            if shape.has_refusal:
                from_logprobs = strip_chat_logprobs(self.control, choice)
            else:
                strip_completion_logprobs(self.control, choice)
                from_logprobs = None
            target = shape.target(choice)
            if target is None:
                continue
            text = target.get(shape.field)
            decision, echo, rest = self.control.read(text or "")
            choice["refusal_decision"] = record(decision, from_logprobs)
            shape.place(
                target,
                decision.refused,
                specials.strip(rest) if text is not None else None,
                self.copy_content,
                echo=echo,  # the prompt, as vLLM repeats it: its special tokens stay
            )

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


class RefusalGatewayMiddleware:
    """Pure ASGI middleware (no ``BaseHTTPMiddleware``: it must not buffer streams)."""

    def __init__(self, app: ASGIApp, gateway: Gateway | None = None) -> None:
        self.app = app
        self.gateway = gateway or Gateway.from_settings(GatewaySettings())
        self.inflight = 0
        logger.info(
            "refusal gateway layer on %s: model %r, %s scheme",
            ", ".join(ROUTES),
            self.gateway.model_name,
            self.gateway.manifest.scheme,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self._report_routes(scope.get("app"))
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        key = None
        canary = self.gateway.canary_expectation(scope)
        if self.gateway.policy.requires_key and path not in UNAUTHENTICATED_PATHS and canary is None:
            # This layer is outside vLLM's own middlewares: authenticate first.
            try:
                authorization = _header(scope, b"authorization", lower=False).decode("latin-1")
                key = self.gateway.policy.authenticate(authorization)
            except GatewayError as error:
                await self._refuse(send, error)
                return
        where = decide(path)
        if where == "closed":
            await self._refuse(send, GatewayError(
                404, f"{path} is not served here: {closed_reason(path)}",
                type="not_found_error", code="route_not_served",
            ))  # fmt: skip
            return
        if where == "open" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.gateway.settings.max_inflight_requests
        if limit and self.inflight >= limit:
            await self._refuse(send, self._overloaded(limit))
            return
        self.inflight += 1
        try:
            await self._handle(scope, receive, send, key, canary)
        finally:
            self.inflight -= 1

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, key: ApiKey | None, canary: str | None
    ) -> None:
        gateway = self.gateway
        try:
            request_id = _request_id(scope)
            raw = await _read_body(receive, gateway.settings.max_body_bytes)
        except GatewayError as error:
            await self._refuse(send, error)
            return
        if raw is None:
            return  # the client went away before sending its body
        log = RequestLog(request_id, scope["path"], gateway.model_name)
        try:
            body, plan, route = gateway.prepare(raw, scope["path"], key, canary)
        except GatewayError as error:
            log.status, log.error = error.status, error.code
            log.emit()
            await self._refuse(send, error)
            return
        log.profile, log.controls = plan.profile, plan.controls
        # vLLM takes X-Request-Id as its own request id: one id from client to engine log.
        scope = _with_header(_with_length(scope, len(body)), b"x-request-id", request_id.encode())
        outcome = Outcome(canary=canary)
        try:
            await self.app(
                scope, _replay(body, receive), self._responder(plan, route, send, log, outcome)
            )
        finally:
            if plan.report_id is not None:
                gateway.inbox.forget(plan.report_id)

    async def _refuse(self, send: Send, error: GatewayError) -> None:
        self.gateway.reject(error)
        await send_error(send, error)

    def _overloaded(self, limit: int) -> GatewayError:
        return GatewayError(
            503,
            f"the server is at its limit of {limit} requests in flight; retry shortly",
            type="service_unavailable_error",
            code="server_overloaded",
            headers=((b"retry-after", str(self.gateway.settings.retry_after_s).encode()),),
        )

    def _report_routes(self, app: Any) -> None:
        """Log every route of the app by decision (once), warning on undecided ones."""
        if app is None or getattr(self, "_routes_reported", False):
            return
        self._routes_reported = True
        report = route_report(app)
        logger.info("refusal gateway routes: %s", json.dumps(report))
        if report["undecided"]:
            logger.warning(
                "routes nobody decided about (closed with a 404): %s", report["undecided"]
            )

    def _responder(
        self, plan: RequestPlan, route: Route, send: Send, log: RequestLog, outcome: Outcome
    ) -> Send:
        gateway = self.gateway
        state: dict[str, Any] = {"mode": "pass", "start": None, "parts": [], "learnt": False}
        rewriter: StreamRewriter | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal rewriter
            if message["type"] == "http.response.start":
                log.status = message["status"]
                message = _with_header(message, b"x-request-id", log.request_id.encode())
                content_type = _header(message, b"content-type")
                if message["status"] == 500:
                    state["mode"] = "error"  # maybe the engine died: read it first
                    state["start"] = message
                    return
                if message["status"] != 200:
                    state["mode"] = "pass"
                elif content_type.startswith(b"text/event-stream"):
                    state["mode"] = "stream"
                    rewriter = gateway.stream_rewriter(plan, route.delta, log, outcome)
                elif content_type.startswith(b"application/json"):
                    state["mode"] = "json"
                    state["start"] = message
                    return  # sent with the rewritten body
                await send(message)
                return
            more = message.get("more_body", False)
            if message["type"] == "http.response.body" and not more:
                # Decisions are recorded before the last bytes go out; the line follows them.
                try:
                    await _send_body(message, more)
                finally:
                    log.emit()
                return
            await _send_body(message, more)

        async def _send_body(message: Message, more: bool) -> None:
            if message["type"] != "http.response.body" or state["mode"] == "pass":
                await send(message)
                return
            if state["mode"] == "error":
                state["parts"].append(message.get("body", b""))
                if not more:
                    await _send_error_body(b"".join(state["parts"]))
                return
            if not state["learnt"]:
                # Bytes of a successful response exist: the first token, and so
                # the decision report, has been computed.
                state["learnt"] = True
                await gateway.learn(plan, outcome)
            if state["mode"] == "stream":
                assert rewriter is not None
                data = rewriter.feed(message.get("body", b""))
                if not more:
                    data += rewriter.close()
                await send({"type": "http.response.body", "body": data, "more_body": more})
                return
            state["parts"].append(message.get("body", b""))
            if more:
                return
            body = _rewrite_json(
                b"".join(state["parts"]),
                lambda payload: gateway.rewrite_completion(payload, plan, route.message, log, outcome),
            )
            start = dict(state["start"])
            start["headers"] = _set_header(start["headers"], b"content-length", str(len(body)).encode())
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        async def _send_error_body(raw: bytes) -> None:
            """vLLM's 500; a dead engine becomes a 503 + Retry-After (the launcher restarts it)."""
            if any(marker in raw for marker in ENGINE_DEAD_MARKERS):
                log.status = 503
                await self._refuse(send, GatewayError(
                    503, "the model engine stopped while serving this request and is restarting; "
                    "retry shortly", type="service_unavailable_error", code="engine_unavailable",
                    headers=((b"retry-after", str(gateway.settings.retry_after_s).encode()),),
                ))  # fmt: skip
                return
            await send(state["start"])
            await send({"type": "http.response.body", "body": raw, "more_body": False})

        return send_wrapper


def _rewrite_json(raw: bytes, rewrite: Callable[[Any], None]) -> bytes:
    try:
        payload = json.loads(raw)
    except ValueError:
        return raw
    rewrite(payload)
    return json.dumps(payload, ensure_ascii=False).encode()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, None if the client left, or a 413 past ``limit`` bytes."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        part = message.get("body", b"")
        size += len(part)
        if limit and size > limit:
            raise GatewayError(
                413, f"request body is larger than {limit} bytes", code="request_too_large"
            )
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


def _request_id(scope: Scope) -> str:
    """The client's X-Request-Id (printable ASCII, bounded), or a new one.

    vLLM echoes it back and logs it: an unbounded or non-ASCII id would break
    clients and log lines, so such an id is a 400, not silently replaced.
    """
    given = _header(scope, b"x-request-id", lower=False)
    if not given:
        return uuid.uuid4().hex
    if len(given) > MAX_REQUEST_ID or not all(0x21 <= b <= 0x7E for b in given):
        raise bad_request(
            f"X-Request-Id must be 1 to {MAX_REQUEST_ID} printable ASCII characters "
            "without spaces",
            param="X-Request-Id",
            code="invalid_header",
        )
    return given.decode()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the rewritten body once, then the client's own events.

    Delegating afterwards keeps ``http.disconnect`` flowing to vLLM, which is
    how it cancels the engine request when a client goes away.
    """
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _header(message: Message | Scope, name: bytes, lower: bool = True) -> bytes:
    for key, value in message.get("headers", []):
        if key.lower() == name:
            return value.lower() if lower else value
    return b""


def _set_header(headers: Any, name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() != name] + [(name, value)]


def _with_header(message: Any, name: bytes, value: bytes) -> Any:
    return {**message, "headers": _set_header(message.get("headers", []), name, value)}


def _with_length(scope: Scope, length: int) -> Scope:
    return _with_header(scope, b"content-length", str(length).encode())
