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

import json
import logging
import os
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .access_log import RequestLog, configure_layer_logging
from .asgi import header, read_body, replay, request_id, with_header, with_length
from .errors import GatewayError, unavailable
from .gateway import ROUTES, Gateway, Outcome
from .policy import ApiKey
from .responses import Responder
from .routes import UNAUTHENTICATED_PATHS, closed_reason, decide, route_report
from .settings import DRAIN_FILE_ENV, SERVING_FILE_ENV, GatewaySettings

__all__ = ["Gateway", "RefusalGatewayMiddleware"]

logger = logging.getLogger(__name__)


def announce_serving(send: Send, serving_file: str | None) -> Send:
    """``send`` of the lifespan, creating ``serving_file`` as the app's startup completes.

    uvicorn starts accepting on the shared socket right after it gets
    ``lifespan.startup.complete``; the file is there before that, so the
    launcher's standby never takes a connection vLLM could serve.
    """
    if not serving_file:
        return send

    async def announcing(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            Path(serving_file).touch()
        await send(message)

    return announcing


class RefusalGatewayMiddleware:
    """Pure ASGI middleware (no ``BaseHTTPMiddleware``: it must not buffer streams)."""

    def __init__(self, app: ASGIApp, gateway: Gateway | None = None) -> None:
        configure_layer_logging()  # in every API-server process vLLM starts
        self.app = app
        self.gateway = gateway or Gateway.from_settings(GatewaySettings())
        self.inflight = 0
        self.drain_file = os.environ.get(DRAIN_FILE_ENV)
        self._routes_reported = False
        logger.info(
            "refusal gateway layer on %s: model %r, %s scheme",
            ", ".join(ROUTES),
            self.gateway.model_name,
            self.gateway.manifest.scheme,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self._report_routes(scope.get("app"))
            send = announce_serving(send, os.environ.get(SERVING_FILE_ENV))
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        key = None
        canary = self.gateway.canary.expectation(scope)
        if self.gateway.policy.requires_key and path not in UNAUTHENTICATED_PATHS and canary is None:
            # This layer is outside vLLM's own middlewares: authenticate first.
            try:
                authorization = header(scope, b"authorization", lower=False).decode("latin-1")
                key = self.gateway.policy.authenticate(authorization)
            except GatewayError as error:
                await self.gateway.refuse(send, error)
                return
        where = decide(path)
        if self._draining() and (where == "layer" or path == "/health"):
            # The launcher is draining: in-flight requests finish, new ones go elsewhere.
            await self.gateway.refuse(send, self._unavailable(
                "the server is shutting down; retry shortly", "shutting_down"
            ))  # fmt: skip
            return
        if where == "closed":
            await self.gateway.refuse(send, GatewayError(
                404, f"{path} is not served here: {closed_reason(path)}",
                type="not_found_error", code="route_not_served",
            ))  # fmt: skip
            return
        if where == "open" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.gateway.settings.max_inflight_requests
        if limit and self.inflight >= limit:
            await self.gateway.refuse(send, self._unavailable(
                f"the server is at its limit of {limit} requests in flight; retry shortly",
                "server_overloaded",
            ))  # fmt: skip
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
            rid = request_id(scope)
            raw = await read_body(receive, gateway.settings.max_body_bytes)
        except GatewayError as error:
            await self.gateway.refuse(send, error)
            return
        if raw is None:
            return  # the client went away before sending its body
        log = RequestLog(rid, scope["path"], gateway.model_name)
        try:
            body, plan, route = gateway.prepare(raw, scope["path"], key, canary)
        except GatewayError as error:
            log.status, log.error = error.status, error.code
            log.emit()
            await self.gateway.refuse(send, error)
            return
        log.profile, log.controls = plan.profile, plan.controls
        # vLLM takes X-Request-Id as its own request id: one id from client to engine log.
        scope = with_header(with_length(scope, len(body)), b"x-request-id", rid.encode())
        outcome = Outcome(canary=canary)
        try:
            responder = Responder(gateway, plan, route, send, log, outcome)
            await self.app(scope, replay(body, receive), responder)
        finally:
            if plan.report_id is not None:
                gateway.inbox.forget(plan.report_id)

    def _unavailable(self, message: str, code: str) -> GatewayError:
        return unavailable(message, code, self.gateway.settings.retry_after_s)

    def _draining(self) -> bool:
        """Whether the launcher has started draining (it created its drain file)."""
        return self.drain_file is not None and os.path.exists(self.drain_file)

    def _report_routes(self, app: Any) -> None:
        """Log every route of the app by decision (once), warning on undecided ones."""
        if app is None or self._routes_reported:
            return
        self._routes_reported = True
        report = route_report(app)
        logger.info("refusal gateway routes: %s", json.dumps(report))
        if report["undecided"]:
            logger.warning(
                "routes nobody decided about (closed with a 404): %s", report["undecided"]
            )
