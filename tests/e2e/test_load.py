"""Load and faults against the real stack: many streams, cancellations, counters, the queue bound.

- 330 concurrent streams, every third one cancelled by the client mid-stream:
  each other one completes (``[DONE]``), vLLM's running and waiting counts go
  back to 0, and the engine was not restarted.
- The refusal counters move by exactly the decisions that were sent (each
  request's decision forced with a bias of +/-100, streamed or not).
- Beyond ``--max-inflight-requests N`` requests in flight in the layer, a new
  generation request gets 503 + Retry-After in OpenAI's envelope (code
  ``server_overloaded``); once the in-flight ones are done, requests are
  served again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.hostile.client import EngineWatch, Tally, metric_values, run_all

from .server import Server, running_server

pytestmark = pytest.mark.e2e

STREAMS = 330
#: Hang guard for the engine to settle back to idle; not a performance bound.
SETTLE_S = 300


def chat_body(content: str, max_tokens: int, **extra) -> dict:
    return {"model": "refusal-demo", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, **extra}  # fmt: skip


def completion_body(prompt: str, max_tokens: int, **extra) -> dict:
    return {"model": "refusal-demo", "prompt": prompt, "max_tokens": max_tokens, **extra}


def engine_counts(server: Server) -> tuple[float, float]:
    text = server.metrics_text()
    running = sum(metric_values(text, "vllm:num_requests_running").values())
    waiting = sum(metric_values(text, "vllm:num_requests_waiting").values())
    return running, waiting


def wait_idle(server: Server) -> tuple[float, float]:
    deadline = time.monotonic() + SETTLE_S
    counts = engine_counts(server)
    while counts != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.5)
        counts = engine_counts(server)
    return counts


def control_tokens(server: Server) -> Counter:
    """refusal_gateway_control_tokens_total by category (production series, all sources)."""
    totals: Counter = Counter()
    for labels, value in metric_values(server.metrics_text(), "refusal_gateway_control_tokens_total").items():
        category = labels.split('category="', 1)[1].split('"', 1)[0]
        totals[category] += value
    return totals


def test_concurrent_streams_with_a_third_cancelled(server: Server) -> None:
    watch = EngineWatch(server.base_url, server.log)
    watch.begin()
    before = sum(control_tokens(server).values())
    jobs = []
    for i in range(STREAMS):
        if i % 2:
            path, body = "/v1/chat/completions", chat_body(f"Tell me about item {i}.", 12, stream=True)
        else:
            path, body = "/v1/completions", completion_body(f"Item {i} is", 12, stream=True)
        cancel = 1 if i % 3 == 0 else None  # closed by the client after its first chunk
        jobs.append((path, json.dumps(body).encode(), True, cancel, None))
    tally = Tally()
    asyncio.run(run_all(server.base_url, jobs, STREAMS, tally, watch))
    report = tally.report(watch.restarts(), "concurrent streams")
    assert tally.kinds == Counter({"ok": STREAMS - STREAMS // 3, "cancelled": STREAMS // 3}), report
    assert wait_idle(server) == (0, 0)
    assert watch.restarts() == 0, report
    # Every completed stream was counted once; a cancelled one at most once.
    moved = sum(control_tokens(server).values()) - before
    assert tally.kinds["ok"] <= moved <= STREAMS, (moved, report)


def test_refusal_counters_move_by_exactly_what_was_sent(server: Server) -> None:
    before = control_tokens(server)
    refuse = {"refusal_bias": {"safety": 100}}
    respond = {"refusal_bias": {"refuse": -100}}
    sent = Counter()
    jobs = []
    for i in range(24):
        controls, category = (refuse, "safety") if i % 3 == 0 else (respond, "respond")
        stream = i % 2 == 0
        if i % 4 < 2:
            path, body = "/v1/chat/completions", chat_body(f"Question {i}?", 3, stream=stream, **controls)
        else:
            path, body = "/v1/completions", completion_body(f"Question {i}?", 3, stream=stream, **controls)
        jobs.append((path, json.dumps(body).encode(), stream, None, None))
        sent[category] += 1
    tally = Tally()
    asyncio.run(run_all(server.base_url, jobs, 8, tally))
    assert tally.kinds == Counter({"ok": 24}), tally.report(0, "counters")
    after = control_tokens(server)
    moved = Counter({c: after[c] - before[c] for c in after if after[c] != before[c]})
    assert moved == sent


# --- the queue bound (its own server: a small --max-inflight-requests) -----------------------

INFLIGHT = 3
RETRY_AFTER_S = 4


@pytest.fixture(scope="module")
def bounded(demo_model_dir, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("bounded") / "vllm.log"
    args = ["--max-inflight-requests", str(INFLIGHT), "--retry-after-s", str(RETRY_AFTER_S)]
    with running_server(demo_model_dir, log, args) as s:
        yield s


async def _beyond_the_bound(server: Server) -> tuple[list[httpx.Response], list[int]]:
    # 16 x 440 streamed tokens (~1.5 MB of SSE) outgrow the socket buffers: unless the client
    # reads, the server's send blocks and the request stays in flight, however fast the model.
    long = {**chat_body("Write a long story.", 440, stream=True, ignore_eos=True), "n": 16}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=180) as client:
        holders = []
        for _ in range(INFLIGHT):
            request = client.build_request("POST", "/v1/chat/completions", json=long)
            response = await client.send(request, stream=True)
            assert response.status_code == 200, await response.aread()
            lines = response.aiter_lines()
            async for line in lines:  # the first chunk: it is in flight now
                if line.startswith("data: "):
                    break
            holders.append((response, lines))
        extra = [
            await client.post("/v1/chat/completions", json=chat_body("One more?", 2)),
            await client.post("/v1/completions", json=completion_body("One more", 2)),
            await client.post("/v1/chat/completions", json=chat_body("Stream?", 2, stream=True)),
        ]
        # Open routes are not generation: they still answer while the bound is reached.
        open_routes = [(await client.get(path)).status_code for path in ("/health", "/v1/models")]
        assert open_routes == [200, 200]
        finished = []
        for response, lines in holders:  # the held streams still complete
            done = False
            async for line in lines:
                done = done or line == "data: [DONE]"
            await response.aclose()
            finished.append(done)
        return extra, finished


def test_beyond_the_inflight_bound_requests_get_503_with_retry_after(bounded: Server) -> None:
    watch = EngineWatch(bounded.base_url, bounded.log)
    watch.begin()
    extra, finished = asyncio.run(_beyond_the_bound(bounded))
    assert finished == [True] * INFLIGHT
    for response in extra:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "server_overloaded"
    # Once the held requests are done, requests are served again.
    again = httpx.post(bounded.api_url + "/chat/completions", json=chat_body("Hi", 2), timeout=120)
    assert again.status_code == 200, again.text
    assert wait_idle(bounded) == (0, 0)
    assert watch.restarts() == 0
