"""Supervision, for real: the engine dies, clients get 503 + Retry-After, the server comes back.

A server of its own (the session server must not die under other tests). The
engine-core process is killed the way an OOM kill or a driver fault would; vLLM's
API server then exits, the launcher answers on the port it owns while it
restarts vLLM, and the same client gets answers again afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from .server import Server, running_server

pytestmark = pytest.mark.e2e

RETRY_AFTER_S = 3


@pytest.fixture(scope="module")
def restartable(demo_model_dir, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("supervision") / "vllm.log"
    args = ["--retry-after-s", str(RETRY_AFTER_S), "--restart-backoff-s", "2"]
    with running_server(demo_model_dir, log, args) as s:
        yield s


def chat(server: Server) -> httpx.Response:
    body = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return httpx.post(server.api_url + "/chat/completions", json=body, timeout=30)


def engine_cores(server: Server) -> list[psutil.Process]:
    children = psutil.Process(server.pid).children(recursive=True)
    return [p for p in children if "EngineCore" in " ".join([p.name(), *p.cmdline()])]


def wait_for_running(server: Server, timeout_s: float = 60) -> bool:
    """Poll vLLM's own gauge until a request is running (a hang guard, not a timing check)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
        running = [line for line in metrics.splitlines()
                   if line.startswith("vllm:num_requests_running")]
        if any(float(line.rsplit(" ", 1)[1]) >= 1 for line in running):
            return True
        time.sleep(0.1)
    return False


def launcher_knows_it_is_healthy(server: Server, timeout_s: float = 60) -> bool:
    """The launcher restarts only a server it has seen healthy: wait for its banner."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "refusal-gateway is serving" in server.log.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def test_engine_death_gives_503_with_retry_after_then_recovers(restartable: Server) -> None:
    assert chat(restartable).status_code == 200
    assert launcher_knows_it_is_healthy(restartable)
    cores = engine_cores(restartable)
    assert cores, "no EngineCore process under the launcher"
    # A request in flight when the engine dies gets the same 503 as the ones after it.
    long = {"model": restartable.model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 480, "ignore_eos": True, "refusal_bias": {"refuse": -100}}
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            httpx.post, restartable.api_url + "/chat/completions", json=long, timeout=120
        )
        assert wait_for_running(restartable), "the long request never reached the engine"
        for process in cores:
            process.kill()
        interrupted = in_flight.result()
    assert interrupted.status_code == 503, interrupted.text
    assert interrupted.headers["retry-after"] == str(RETRY_AFTER_S)
    assert interrupted.json()["error"]["code"] == "engine_unavailable"
    unavailable: list[httpx.Response] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            response = chat(restartable)
        except httpx.TransportError:  # a connection vLLM accepted as it went down
            time.sleep(0.2)
            continue
        if response.status_code == 503:
            unavailable.append(response)
        elif response.status_code == 200 and unavailable:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no recovery after the engine died ({len(unavailable)} answers of 503)")
    for response in unavailable:
        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "engine_unavailable"
    health = httpx.get(restartable.base_url + "/health", timeout=10)
    assert health.status_code == 200
    log = restartable.log.read_text(errors="replace")
    assert "restart 1" in log
