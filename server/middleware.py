"""The gateway layer: a pure ASGI middleware that vLLM loads with ``--middleware``.

    vllm serve MODEL --middleware refusal_gateway.middleware.RefusalGatewayMiddleware \
        --logits-processors refusal_plugins.v1:RefusalLogitsProcessor

It owns ``POST /v1/chat/completions``: the request body is validated and
rewritten before vLLM's handler sees it, and the response is rewritten on its
way out (decision read, control token hidden, refusal text moved to
``refusal``). Every other path goes straight to vLLM. vLLM builds the class
with no arguments, so configuration comes from the environment the launcher
sets (see :mod:`refusal_gateway.settings`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from refusal_plugins.vocab import RefusalManifest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import GatewayError, bad_request, send_error
from .metrics import BoundMetrics, get_metrics, reason_for_status
from .protocol import RequestPlan, prepare_chat_request
from .refusal import ControlText, Decision, place_text, strip_logprobs
from .settings import GatewaySettings
from .stream import ChatStreamRewriter

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"


class Gateway:
    """The refusal service of one served model: manifest, text handling, metrics."""

    def __init__(self, settings: GatewaySettings, manifest: RefusalManifest, registry=None):
        self.settings = settings
        self.manifest = manifest
        self.control = ControlText(manifest)
        self.model_name = settings.model_name()
        metrics = get_metrics() if registry is None else get_metrics(registry)
        keys = [t.key for t in manifest.tokens] + ["none"]
        self.metrics = BoundMetrics(metrics, self.model_name, keys)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Gateway:
        return cls(settings, RefusalManifest.load(settings.model_dir()))

    @property
    def copy_content(self) -> bool:
        return self.settings.refusal_content == "copy"

    def record(self, decision: Decision) -> None:
        self.metrics.control_tokens[decision.key].inc()

    def reject(self, error: GatewayError) -> None:
        self.metrics.rejected[reason_for_status(error.status)].inc()

    # -- request side --------------------------------------------------------
    def prepare(self, raw: bytes) -> tuple[bytes, RequestPlan]:
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object", code="invalid_json")
        plan = prepare_chat_request(body, self.manifest, self.control)
        self.metrics.requests[plan.controls].inc()
        return json.dumps(body, ensure_ascii=False).encode(), plan

    # -- response side -------------------------------------------------------
    def rewrite_completion(self, payload: Any) -> None:
        """Rewrite a non-streamed chat completion in place."""
        if not isinstance(payload, dict):
            return
        for choice in payload.get("choices") or []:
            message = choice.get("message")
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            decision, visible = self.control.split(content or "")
            self.record(decision)
            choice["refusal_decision"] = decision.to_json(strip_logprobs(self.control, choice))
            place_text(
                message,
                decision.refused,
                visible if content is not None else None,
                self.copy_content,
            )

    def stream_rewriter(self, plan: RequestPlan) -> ChatStreamRewriter:
        return ChatStreamRewriter(self.control, plan.n, self.copy_content, self.record)


class RefusalGatewayMiddleware:
    """Pure ASGI middleware (no ``BaseHTTPMiddleware``: it must not buffer streams)."""

    def __init__(self, app: ASGIApp, gateway: Gateway | None = None) -> None:
        self.app = app
        self.gateway = gateway or Gateway.from_settings(GatewaySettings())
        logger.info(
            "refusal gateway layer on %s: model %r, %s scheme",
            CHAT_PATH,
            self.gateway.model_name,
            self.gateway.manifest.scheme,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        if raw is None:
            return  # the client went away before sending its body
        try:
            body, plan = self.gateway.prepare(raw)
        except GatewayError as error:
            self.gateway.reject(error)
            await send_error(send, error)
            return
        await self.app(_with_length(scope, len(body)), _replay(body, receive), self._responder(plan, send))

    def _responder(self, plan: RequestPlan, send: Send) -> Send:
        gateway = self.gateway
        state: dict[str, Any] = {"mode": "pass", "start": None, "parts": []}
        rewriter: ChatStreamRewriter | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal rewriter
            if message["type"] == "http.response.start":
                content_type = _header(message, b"content-type")
                if message["status"] != 200:
                    state["mode"] = "pass"
                elif content_type.startswith(b"text/event-stream"):
                    state["mode"] = "stream"
                    rewriter = gateway.stream_rewriter(plan)
                elif content_type.startswith(b"application/json"):
                    state["mode"] = "json"
                    state["start"] = message
                    return  # sent with the rewritten body
                await send(message)
                return
            if message["type"] != "http.response.body" or state["mode"] == "pass":
                await send(message)
                return
            more = message.get("more_body", False)
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
            body = _rewrite_json(b"".join(state["parts"]), gateway.rewrite_completion)
            start = dict(state["start"])
            start["headers"] = _set_header(start["headers"], b"content-length", str(len(body)).encode())
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return send_wrapper


def _rewrite_json(raw: bytes, rewrite: Callable[[Any], None]) -> bytes:
    try:
        payload = json.loads(raw)
    except ValueError:
        return raw
    rewrite(payload)
    return json.dumps(payload, ensure_ascii=False).encode()


async def _read_body(receive: Receive) -> bytes | None:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


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


def _header(message: Message, name: bytes) -> bytes:
    for key, value in message.get("headers", []):
        if key.lower() == name:
            return value.lower()
    return b""


def _set_header(headers: Any, name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() != name] + [(name, value)]


def _with_length(scope: Scope, length: int) -> Scope:
    return {**scope, "headers": _set_header(scope["headers"], b"content-length", str(length).encode())}
