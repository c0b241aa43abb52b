"""Supervision, for real: the engine dies, clients get 503 + Retry-After, the server comes back.

A server of its own (the session server must not die under other tests). The
engine-core process is killed the way an OOM kill or a driver fault would; vLLM's
API server then exits, the launcher answers on the port it owns while it
restarts vLLM, and the same client gets answers again afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

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


def wait_for_running(server: Server, request: Future[httpx.Response], timeout_s: float = 60) -> bool:
    """Poll vLLM's own gauge until a request is running (a hang guard, not a timing check).

    False as soon as ``request`` has finished: on a fast tiny model a whole request
    can run between two polls, and the caller then sends a longer one.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not request.done():
        metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
        running = [line for line in metrics.splitlines()
                   if line.startswith("vllm:num_requests_running")]
        if any(float(line.rsplit(" ", 1)[1]) >= 1 for line in running) and not request.done():
            return True
        time.sleep(0.05)
    return False


def kill_engine_under_a_request(server: Server, cores: list[psutil.Process]) -> httpx.Response:
    """Kill the engine while a long request is running in it; return that request's answer.

    Each try asks for more work (``n`` parallel samples of the longest answer the
    model allows), so a request outlives the polling even on a fast machine.
    """
    with ThreadPoolExecutor(1) as pool:
        for n in (8, 32, 128):
            long = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 480, "ignore_eos": True, "n": n,
                    "refusal_bias": {"refuse": -100}}
            in_flight = pool.submit(
                httpx.post, server.api_url + "/chat/completions", json=long, timeout=300
            )
            if wait_for_running(server, in_flight):
                for process in cores:
                    process.kill()
                return in_flight.result()
            finished = in_flight.result()
            assert finished.status_code == 200, finished.text
    pytest.fail("no request stayed in the engine long enough to be interrupted")


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
    interrupted = kill_engine_under_a_request(restartable, cores)
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
    # From vLLM's first answer on, vLLM takes every connection: the standby stops as vLLM's app
    # starts (the layer's serving file), not at the launcher's next /health poll.
    after = [chat(restartable) for _ in range(20)]
    assert [r.status_code for r in after] == [200] * 20, [r.text for r in after if r.status_code != 200]
    for response in unavailable:
        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "engine_unavailable"
    health = httpx.get(restartable.base_url + "/health", timeout=10)
    assert health.status_code == 200
    log = restartable.log.read_text(errors="replace")
    assert "restart 1" in log
