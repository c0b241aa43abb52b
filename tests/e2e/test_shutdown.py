"""SIGTERM drains: in-flight streams finish, nothing new is served, no process is left behind.

A server of its own (it is stopped by the test). Streams are started and seen
in flight, then the launcher gets SIGTERM: each stream still completes in
full (finish_reason ``length``, ``[DONE]``); a request sent after the signal
is not served but refused in the open (503 + Retry-After in OpenAI's envelope:
the layer reads the launcher's drain file, REFUSAL_GATEWAY_DRAIN_FILE) or,
once vLLM is gone, finds the port closed; the launcher stops vLLM only once
the streams are done, exits 0, and every process it had started (vLLM's API
server, EngineCore, their helpers) is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .server import running_server

pytestmark = pytest.mark.e2e

STREAMS = 6
GRACE_S = 240  # generous: a hang guard on a loaded CPU, not a timing bound
TOKENS = 120


def body(i: int) -> dict:
    return {"model": "refusal-demo", "messages": [{"role": "user", "content": f"Story {i}, please."}],
            "max_tokens": TOKENS, "ignore_eos": True, "stream": True}  # fmt: skip


async def _late(client: httpx.AsyncClient) -> object:
    """A request sent after the signal: (status, Retry-After, body) or the transport error."""
    try:
        response = await client.post("/v1/chat/completions", json={**body(99), "stream": False,
                                                                    "max_tokens": 2}, timeout=60)  # fmt: skip
        return (response.status_code, response.headers.get("retry-after"), response.text[:300])
    except httpx.HTTPError as exc:
        return repr(exc)


def _signalled(log: Path) -> bool:
    """The launcher has taken the signal (its log line); a hang guard of 60 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "draining in-flight requests" in log.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


async def _drain(base_url: str, launcher: int, log: Path) -> tuple[list, object, object]:
    async with httpx.AsyncClient(base_url=base_url, timeout=GRACE_S) as client:
        streams = []
        for i in range(STREAMS):
            request = client.build_request("POST", "/v1/chat/completions", json=body(i))
            response = await client.send(request, stream=True)
            assert response.status_code == 200, await response.aread()
            lines = response.aiter_lines()
            async for line in lines:  # its first chunk: in flight now
                if line.startswith("data: "):
                    break
            streams.append((response, lines))
        os.kill(launcher, signal.SIGTERM)
        assert await asyncio.to_thread(_signalled, log)
        during = await _late(client)  # while the streams are still being served
        results = []
        for response, lines in streams:
            finish, done, chunks = None, False, 1
            async for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunks += 1
                    for choice in json.loads(line[6:]).get("choices", []):
                        finish = choice.get("finish_reason") or finish
            await response.aclose()
            results.append((finish, done, chunks))
        after = await _late(client)  # once they are done, while vLLM stops
        return results, during, after


def refused_cleanly(answer: object) -> bool:
    """Not served, and said so: a refused/closed connection, or 503 + Retry-After in the envelope."""
    if isinstance(answer, str):
        return True  # a transport error: nobody accepts any more
    status, retry_after, text = answer
    if status != 503 or not retry_after:
        return False
    error = json.loads(text).get("error", {})
    return {"message", "type", "param", "code"} <= set(error)


def test_sigterm_drains_in_flight_streams_and_leaves_no_orphan(demo_model_dir, tmp_path) -> None:
    log = tmp_path / "vllm.log"
    with running_server(demo_model_dir, log, ["--shutdown-grace-s", str(GRACE_S)]) as server:
        launcher = psutil.Process(server.pid)
        tree = launcher.children(recursive=True)
        assert any("EngineCore" in " ".join([p.name(), *p.cmdline()]) for p in tree), tree
        results, during, after = asyncio.run(_drain(server.base_url, server.pid, log))
        code = launcher.wait(timeout=GRACE_S + 60)  # a hang guard
        _, alive = psutil.wait_procs(tree, timeout=60)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    text = log.read_text(errors="replace")
    print("streams:", results, "\nrequest during the drain:", during, "\nrequest after it:", after)
    assert all(finish == "length" and done for finish, done, _ in results), results
    assert code == 0, text[-3000:]
    assert alive == [], [(p.pid, p.name()) for p in alive]
    assert "in-flight requests done" in text  # vLLM was stopped after the drain, not before
    # New work is not taken once the signal is in: refused in the open, never a 5xx.
    # (needs the layer to refuse generation requests while REFUSAL_GATEWAY_DRAIN_FILE exists)
    assert refused_cleanly(during), f"served or 5xx during the drain: {during}"
    assert refused_cleanly(after), f"served or 5xx during vLLM's shutdown: {after}"
