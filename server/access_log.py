"""The access log: one JSON line per request the layer handles.

Its own logger (``refusal_gateway.access``), so operators can route it apart
from the layer's other messages.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

access_log = logging.getLogger("refusal_gateway.access")
#: Set by the launcher's vLLM entry point: the layer's processes log to stderr.
LAYER_LOGS_ENV = "REFUSAL_GATEWAY_LAYER_LOGS"


def configure_layer_logging() -> None:
    """Give the layer's loggers (``refusal_gateway.*``, the access log included) a handler.

    vLLM configures only its own ``vllm`` logger, so without this the layer's
    INFO lines (its route report, one access line per request) would be lost.
    Idempotent; a no-op unless :data:`LAYER_LOGS_ENV` asks for it, so tests
    and embedders keep their own logging.
    """
    layer = logging.getLogger("refusal_gateway")
    if os.environ.get(LAYER_LOGS_ENV) != "stderr" or layer.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    layer.addHandler(handler)
    layer.setLevel(logging.INFO)
    layer.propagate = False


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
