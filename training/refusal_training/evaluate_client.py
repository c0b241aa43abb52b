"""The HTTP side of ``refusal-gateway eval``: chat completions with our fields, retried.

Its own module because talking to a live server has rules of its own:
keep-alive connections that expire before vLLM's idle timeout, 429/503
retried after their Retry-After (bounded), connection errors with a short
back-off, and any other error stopping the run with the server's message.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import httpx

from .evaluate_decisions import Decision, Settings
from .evaluate_rows import EvalError
from .system_prompts import Context, chat_messages

#: vLLM (uvicorn) closes idle keep-alive connections after 5 s; ours expire first.
KEEPALIVE_S = 4.0
#: Longest Retry-After honoured (seconds).
MAX_RETRY_AFTER_S = 60.0


class Client:
    """Chat completions with our fields, ``concurrency`` at a time, with retries."""

    def __init__(
        self,
        url: str,
        model: str | None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_attempts: int = 8,
        progress: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        before: Context | None = None,
    ):
        base = url.rstrip("/")
        self.transport = transport  # tests: an httpx.MockTransport
        self.api = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = max(1, concurrency)
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)
        self.max_attempts = max(1, max_attempts)
        self.progress = progress
        # The deployment's own system message (it replaces the template's default) and
        # earlier turns move the decision (docs/quality/experiments.md): measure under them.
        self.before = before
        self.sent = 0
        self.retries = 0

    def _http(self) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=self.concurrency,
            max_keepalive_connections=self.concurrency,
            keepalive_expiry=KEEPALIVE_S,
        )
        return httpx.AsyncClient(
            timeout=self.timeout, limits=limits, headers=self.headers, transport=self.transport
        )

    async def _request(
        self, http: httpx.AsyncClient, method: str, path: str, **kw
    ) -> httpx.Response:
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = await http.request(method, self.api + path, **kw)
            except (httpx.TransportError, httpx.PoolTimeout) as e:
                if attempt == self.max_attempts:
                    raise EvalError(f"{method} {path}: {type(e).__name__}: {e}") from None
                self.retries += 1
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 10.0))
                continue
            if response.status_code in (429, 503) or response.status_code >= 500:
                if attempt == self.max_attempts:
                    raise EvalError(
                        f"{method} {path}: HTTP {response.status_code} after {attempt} attempts: {response.text[:300]}"
                    )
                self.retries += 1
                await asyncio.sleep(retry_after(response.headers.get("retry-after"), attempt))
                continue
            if response.status_code != 200:
                raise EvalError(
                    f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}"
                )
            return response
        raise AssertionError("unreachable")

    async def resolve_model(self, http: httpx.AsyncClient) -> str:
        if self.model is None:
            data = (await self._request(http, "GET", "/models")).json().get("data") or []
            if not data:
                raise EvalError("the server lists no models; pass --model")
            self.model = data[0]["id"]
        return self.model

    def body(self, prompt: str, settings: Settings) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": chat_messages(prompt, self.before),
            "temperature": 0,
            "max_tokens": 1,  # the first generated token is the decision
            **settings.body(),
        }

    async def decide_all(
        self, jobs: Sequence[tuple[str, Settings]], description: str = "requests"
    ) -> list[Decision]:
        """One decision per (prompt, settings), in order."""
        from tqdm import tqdm

        results: list[Decision | None] = [None] * len(jobs)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(jobs)):
            queue.put_nowait(i)
        bar = tqdm(
            total=len(jobs),
            desc=description,
            unit="req",
            disable=not self.progress,
            file=sys.stderr,
        )

        async with self._http() as http:
            await self.resolve_model(http)

            async def worker() -> None:
                while True:
                    try:
                        i = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    prompt, settings = jobs[i]
                    response = await self._request(
                        http, "POST", "/chat/completions", json=self.body(prompt, settings)
                    )
                    results[i] = Decision.of_response(response.json())
                    self.sent += 1
                    bar.update(1)

            tasks = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(jobs)))]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                bar.close()
        return results  # type: ignore[return-value]


def retry_after(header: str | None, attempt: int) -> float:
    """Seconds to wait: the header's (bounded), else an exponential back-off."""
    if header:
        try:
            return min(max(float(header), 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    return min(0.5 * 2 ** (attempt - 1), 10.0)
