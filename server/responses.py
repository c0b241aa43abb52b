"""The response side of one request: read the decision, hide the token, count it.

:class:`Responder` is the ASGI ``send`` the middleware hands to vLLM for one
request. A successful JSON completion is buffered and rewritten whole
(:func:`rewrite_completion`); an event stream goes through a
:class:`~refusal_gateway.stream.StreamRewriter` chunk by chunk; vLLM's own
errors get OpenAI's values (:func:`~refusal_gateway.errors.openai_shape`),
and the 500 of an engine that died under the request becomes the same 503 +
``Retry-After`` as the requests after it.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Message, Send

from .access_log import RequestLog
from .asgi import header, set_header, with_header
from .errors import openai_shape, unavailable
from .gateway import Gateway, Outcome, Route
from .protocol import RequestPlan
from .refusal import TextShape
from .scrub import (
    Specials,
    strip_chat_logprobs,
    strip_completion_logprobs,
    strip_prompt_logprobs,
    strip_token_ids,
)
from .stream import StreamRewriter
from .vllm_json import decode

#: What vLLM's 500 says when the EngineCore died under a request.
ENGINE_DEAD_MARKERS = (b"EngineCore encountered an issue", b"EngineDeadError")


class Responder:
    """An ASGI ``send`` that rewrites one response on its way to the client."""

    def __init__(
        self, gateway: Gateway, plan: RequestPlan, route: Route, send: Send, log: RequestLog,
        outcome: Outcome,
    ) -> None:  # fmt: skip
        self.gateway, self.plan, self.route = gateway, plan, route
        self.send, self.log, self.outcome = send, log, outcome
        self.mode = "pass"  # "json", "stream", "error" (a 500 read before it goes out)
        self.start: Message | None = None  # held back for "json" and "error"
        self.parts: list[bytes] = []
        self.learnt = False
        self.rewriter: StreamRewriter | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            await self._start(message)
            return
        more = message.get("more_body", False)
        if message["type"] != "http.response.body" or not more:
            # Decisions are recorded before the last bytes go out; the log line follows them.
            try:
                await self._body(message, more)
            finally:
                if message["type"] == "http.response.body":
                    self.log.emit()
            return
        await self._body(message, more)

    async def _start(self, message: Message) -> None:
        self.log.status = message["status"]
        message = with_header(message, b"x-request-id", self.log.request_id.encode())
        content_type = header(message, b"content-type")
        status = message["status"]
        if status == 500 or (status != 200 and content_type.startswith(b"application/json")):
            self.mode, self.start = "error", message  # maybe the engine died: read it first
            return
        if status != 200:
            self.mode = "pass"
        elif content_type.startswith(b"text/event-stream"):
            self.mode = "stream"
            self.rewriter = self.gateway.stream_rewriter(
                self.plan, self.route.delta, self.log, self.outcome
            )
        elif content_type.startswith(b"application/json"):
            self.mode, self.start = "json", message
            return  # sent with the rewritten body
        await self.send(message)

    async def _body(self, message: Message, more: bool) -> None:
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        self.parts.append(message.get("body", b""))
        if self.mode == "error":
            if not more:
                await self._error(b"".join(self.parts))
            return
        if not self.learnt:
            # Bytes of a successful response exist: the first token, and so the
            # decision report, has been computed.
            self.learnt = True
            await self.gateway.learn(self.plan, self.outcome)
        if self.mode == "stream":
            assert self.rewriter is not None
            data = self.rewriter.feed(self.parts.pop())
            if not more:
                data += self.rewriter.close()
            await self.send({"type": "http.response.body", "body": data, "more_body": more})
            return
        if more:
            return
        await self._send_whole(self._rewrite_json(b"".join(self.parts)))

    async def _send_whole(self, body: bytes) -> None:
        """The buffered response's start (with its new length) and ``body``."""
        assert self.start is not None
        start = dict(self.start)
        start["headers"] = set_header(start["headers"], b"content-length", str(len(body)).encode())
        await self.send(start)
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def _rewrite_json(self, raw: bytes) -> bytes:
        try:
            document = decode(raw)
        except (ValueError, RecursionError):
            return raw
        rewrite_completion(
            self.gateway, document.value, self.plan, self.route.message, self.log, self.outcome
        )
        return document.encode()

    async def _error(self, raw: bytes) -> None:
        """vLLM's error in OpenAI's shape; a dead engine's 500 becomes a 503 + Retry-After
        (the launcher restarts it)."""
        assert self.start is not None
        status = self.start["status"]
        if status == 500 and any(marker in raw for marker in ENGINE_DEAD_MARKERS):
            self.log.status = 503
            await self.gateway.refuse(self.send, unavailable(
                "the model engine stopped while serving this request and is restarting; "
                "retry shortly", "engine_unavailable", self.gateway.settings.retry_after_s,
            ))  # fmt: skip
            return
        await self._send_whole(openai_shape(raw, status))


def rewrite_completion(
    gateway: Gateway,
    payload: Any,
    plan: RequestPlan,
    shape: TextShape,
    log: RequestLog,
    outcome: Outcome,
) -> None:
    """Rewrite a non-streamed (chat or text) completion in place."""
    if not isinstance(payload, dict):
        return
    record = gateway.recorder(plan, log, outcome)
    control = gateway.control
    specials = gateway.specials if plan.skip_special else Specials([])
    strip_prompt_logprobs(control, payload)
    for choice in payload.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        strip_token_ids(control, choice)
        strip_prompt_logprobs(control, choice)
        if shape.has_refusal:
            from_logprobs = strip_chat_logprobs(control, choice)
        else:
            strip_completion_logprobs(control, choice)
            from_logprobs = None
        target = shape.target(choice)
        if target is None:
            continue
        text = target.get(shape.field)
        decision, echo, rest = control.read(text or "")
        choice["refusal_decision"] = record(decision, from_logprobs)
        shape.place(
            target,
            decision.refused,
            specials.strip(rest) if text is not None else None,
            gateway.copy_content,
            echo=echo,  # the prompt, as vLLM repeats it: its special tokens stay
        )
