"""The access log: one JSON line per request the layer handles.

Its own logger (``refusal_gateway.access``), so operators can route it apart
from the layer's other messages.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

access_log = logging.getLogger("refusal_gateway.access")


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
