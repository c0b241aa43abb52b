"""Sending hostile requests to a running stack and judging the answers.

Shared by the fuzzer and the soak. A request's :class:`Outcome` is one of:
a complete answer (200, and for streams the final ``[DONE]``), a 4xx in
OpenAI's error envelope, a 5xx, a 4xx in another shape, a broken answer
(connection dropped, stream cut short), or cancelled by the client itself.
:class:`EngineWatch` tells whether the engine was restarted meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .schema import CONTROL_STRINGS

ENVELOPE_KEYS = {"message", "type", "param", "code"}
#: A hang guard for one request, not a performance bound.
REQUEST_TIMEOUT_S = 180.0


@dataclass
class Outcome:
    kind: str  # "ok" | "4xx" | "5xx" | "bad_4xx" | "broken" | "cancelled"
    status: int | None
    detail: str = ""
    leaked: bool = False  # a control-token string in the visible text


def envelope_problem(body: bytes) -> str | None:
    """Why ``body`` is not OpenAI's error envelope, or None when it is."""
    try:
        data = json.loads(body)
    except ValueError:
        return "not JSON: " + body[:200].decode(errors="replace")
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not ENVELOPE_KEYS <= set(error):
        return "not {'error': {message, type, param, code}}: " + body[:200].decode(errors="replace")
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return "message/type not strings: " + body[:200].decode(errors="replace")
    return None


def _visible_text(choice: dict[str, Any]) -> str:
    parts = []
    for holder in (choice.get("message"), choice.get("delta"), choice):
        if isinstance(holder, dict):
            for key in ("content", "refusal", "text"):
                if isinstance(holder.get(key), str):
                    parts.append(holder[key])
    return "".join(parts)


def _leaks(chunks: list[dict[str, Any]]) -> bool:
    text = "".join(_visible_text(c) for chunk in chunks for c in chunk.get("choices") or [])
    return any(s in text for s in CONTROL_STRINGS)


def dump(body: Any) -> bytes:
    """A generated body as bytes: JSON (NaN/Infinity literals as Python writes them) or raw."""
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")
    return json.dumps(body).encode("utf-8", "surrogatepass")


async def send(
    client: httpx.AsyncClient,
    path: str,
    content: bytes,
    stream: bool,
    cancel_after_chunks: int | None = None,
    headers: dict[str, str] | None = None,
) -> Outcome:
    """POST ``content`` to ``path`` and classify the answer (see the module's docstring)."""
    hdrs = {"content-type": "application/json", **(headers or {})}
    try:
        async with client.stream("POST", path, content=content, headers=hdrs) as response:
            status = response.status_code
            if status != 200:
                body = await response.aread()
                if status >= 500:
                    return Outcome("5xx", status, body[:300].decode(errors="replace"))
                problem = envelope_problem(body)
                return Outcome("bad_4xx" if problem else "4xx", status, problem or "")
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                body = await response.aread()
                try:
                    data = json.loads(body)
                except ValueError:
                    return Outcome("broken", status, "200 but not JSON")
                return Outcome("ok", status, leaked=_leaks([data]) if isinstance(data, dict) else False)
            chunks: list[dict[str, Any]] = []
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    return Outcome("broken", status, "stream chunk not JSON: " + payload[:200])
                if isinstance(chunk, dict) and "error" in chunk:
                    error = chunk["error"] if isinstance(chunk["error"], dict) else {}
                    code = error.get("code")
                    kind = "5xx" if isinstance(code, int) and code >= 500 else "4xx"
                    if kind == "4xx" and not ENVELOPE_KEYS <= set(error):
                        kind = "bad_4xx"
                    return Outcome(kind, status, "in-stream error: " + payload[:300])
                chunks.append(chunk)
                if cancel_after_chunks is not None and len(chunks) >= cancel_after_chunks:
                    return Outcome("cancelled", status, leaked=_leaks(chunks))
            if not done:
                return Outcome("broken", status, f"stream ended without [DONE] after {len(chunks)} chunks")
            return Outcome("ok", status, leaked=_leaks(chunks))
    except httpx.TimeoutException as exc:
        return Outcome("broken", None, f"timeout: {exc!r}")
    except httpx.HTTPError as exc:
        return Outcome("broken", None, f"transport: {exc!r}")


def served_model(base_url: str, timeout_s: float = 30.0) -> str:
    """The name the server at ``base_url`` serves (``GET /v1/models``, the first entry).

    The hostile runs send it in every request meant to reach the engine: under
    any other name vLLM answers 404 before the layer's checks or the engine,
    and a run would pass without having tested anything.
    """
    response = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=timeout_s)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models or not isinstance(models[0].get("id"), str):
        raise RuntimeError(f"{base_url}/v1/models lists no model: {response.text[:200]}")
    return models[0]["id"]


def metric_values(text: str, name: str) -> dict[str, float]:
    """Every sample of ``name`` in a Prometheus exposition: {labels: value}."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            values[labels[len(name):]] = float(value)
    return values


@dataclass
class EngineWatch:
    """Did the engine (vLLM's API server and EngineCore) restart between two looks?

    Evidence used: vLLM's ``process_start_time_seconds`` on ``/metrics`` (a new
    API server process has a new one; an engine death makes the API server
    exit), the counter ``vllm:request_success_total`` going backwards, the
    launcher's 503 ``engine_unavailable`` answers seen meanwhile, ``/health``,
    and, when given, the launcher's log (its ``restart N`` lines).
    """

    base_url: str
    log: Path | None = None
    start_time: float | None = None
    successes: float = 0.0
    log_restarts: int = 0
    restart_count: float | None = None  # the launcher's refusal_gateway_engine_restarts_total
    unavailable: int = 0  # 503 engine_unavailable answers seen by the client
    health: list[int] = field(default_factory=list)

    def snapshot(self) -> tuple[float | None, float, float | None]:
        text = httpx.get(self.base_url + "/metrics", timeout=30).text
        start = metric_values(text, "process_start_time_seconds")
        succ = metric_values(text, "vllm:request_success_total")
        restarts = metric_values(text, "refusal_gateway_engine_restarts_total")
        return (
            next(iter(start.values())) if start else None,
            sum(succ.values()),
            sum(restarts.values()) if restarts else None,
        )

    def _log_restarts(self) -> int:
        if self.log is None or not self.log.exists():
            return 0
        return len(re.findall(r"restart \d+ in", self.log.read_text(errors="replace")))

    def begin(self) -> None:
        self.start_time, self.successes, self.restart_count = self.snapshot()
        self.log_restarts = self._log_restarts()

    def restarts(self) -> int:
        """Evidence of restarts since :meth:`begin` (0 when there is none)."""
        self.health.append(httpx.get(self.base_url + "/health", timeout=30).status_code)
        start, successes, restart_count = self.snapshot()
        seen = self._log_restarts() - self.log_restarts
        if None not in (restart_count, self.restart_count):
            seen = max(seen, int(restart_count - self.restart_count))
        if None not in (start, self.start_time) and start != self.start_time:
            seen = max(seen, 1)
        if successes < self.successes:
            seen = max(seen, 1)
        if self.unavailable:
            seen = max(seen, 1)
        if self.health[-1] != 200:
            seen = max(seen, 1)
        return seen


@dataclass
class Tally:
    """Figures of a run."""

    requests: int = 0
    kinds: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    leaks: int = 0
    failures: list[tuple[str, bytes, Outcome]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, path: str, content: bytes, outcome: Outcome) -> None:
        self.requests += 1
        self.kinds[outcome.kind] += 1
        self.statuses[outcome.status if outcome.status is not None else "none"] += 1
        self.leaks += outcome.leaked
        if outcome.kind in ("5xx", "bad_4xx", "broken"):
            self.failures.append((path, content, outcome))

    def failed(self, restarts: int) -> int:
        """What makes a run fail: 5xx, non-envelope 4xx, broken answers, engine restarts,
        and a run in which no request was answered at all (nothing reached the engine:
        a wrong model name or URL would otherwise pass as "no 5xx")."""
        lost = self.kinds["5xx"] + self.kinds["bad_4xx"] + self.kinds["broken"] + restarts
        return lost + (self.requests > 0 and self.kinds["ok"] == 0)

    def report(self, restarts: int, title: str) -> str:
        lines = [
            f"{title}: {self.requests} requests in {time.monotonic() - self.started:.0f}s",
            "  statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items(), key=str)),
            "  outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.kinds.items())),
            f"  5xx: {self.kinds['5xx']}   non-envelope 4xx: {self.kinds['bad_4xx']}   "
            f"broken: {self.kinds['broken']}   engine restarts: {restarts}   "
            f"control-token leaks: {self.leaks}",
        ]
        if self.requests and not self.kinds["ok"]:
            lines.append("  FAILED: no request was answered: nothing reached the engine")
        for path, content, outcome in self.failures[:20]:
            shown = content[:400].decode("utf-8", "backslashreplace")
            lines.append(f"  FAILED {outcome.kind} {outcome.status} {path} {shown!r}: {outcome.detail[:300]}")
        return "\n".join(lines)


async def run_all(
    base_url: str,
    jobs: list[tuple[str, bytes, bool, int | None, dict[str, str] | None]],
    concurrency: int,
    tally: Tally,
    watch: EngineWatch | None = None,
    on_done=None,
) -> None:
    """Send ``jobs`` (path, body, stream, cancel-after-chunks, headers) ``concurrency`` at a time."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                path, content, stream, cancel, headers = queue.get_nowait()
                outcome = await send(client, path, content, stream, cancel, headers)
                if outcome.status == 503 and watch is not None:
                    watch.unavailable += "engine_unavailable" in outcome.detail
                tally.add(path, content, outcome)
                if on_done is not None:
                    on_done(tally)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
