"""Several API-server processes in one replica (``--api-server-count 2``).

vLLM then serves ``/metrics`` through prometheus-client's multiprocess
collector; the layer's counters are created in each frontend process and must
add up across them, whichever process answers the scrape.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from .server import Server, running_server

pytestmark = pytest.mark.e2e

COUNTER = "refusal_gateway_control_tokens_total"
#: Hang guard for "both frontends served": only a hang or a frontend that never
#: accepts a connection runs it out, never a slow machine.
HANG_S = 300.0


@pytest.fixture(scope="module")
def two_frontends(demo_model_dir, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("scale_out") / "vllm.log"
    with running_server(demo_model_dir, log, ["--api-server-count", "2"]) as s:
        yield s


def decisions(server: Server) -> dict[str, float]:
    """Decisions per category, summed over profiles and sources."""
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == COUNTER and s.labels.get("model") == server.model:
                out[s.labels["category"]] = out.get(s.labels["category"], 0.0) + s.value
    return out


def api_servers(server: Server) -> list[psutil.Process]:
    """The replica's API-server processes (vLLM titles them ``VLLM::APIServer_<i>``)."""
    found = []
    for proc in psutil.Process(server.pid).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("VLLM::APIServer"):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def metric_files(server: Server) -> dict[int, Path]:
    """Each API server's own ``counter_<pid>.db`` in vLLM's PROMETHEUS_MULTIPROC_DIR.

    prometheus-client's multiprocess mode keeps one file per process and kind
    open (memory-mapped) for the process's whole life.
    """
    out: dict[int, Path] = {}
    for proc in api_servers(server):
        for path in (Path(f.path) for f in proc.open_files()):
            if path.name == f"counter_{proc.pid}.db":
                out[proc.pid] = path
    return out


def decisions_by_process(server: Server) -> dict[int, float]:
    """The layer's decision counter per process, read from the process's own metric file.

    Only the layer inside an API-server process counts decisions, so a pid
    with decisions is a frontend that served chat requests.
    """
    out: dict[int, float] = {}
    for pid, path in metric_files(server).items():
        total = sum(
            s.value
            for family in MultiProcessCollector.merge([str(path)], accumulate=True)
            for s in family.samples
            if s.name == COUNTER and s.labels.get("model") == server.model
        )
        if total:
            out[pid] = total
    return out


def test_counters_add_up_across_frontend_processes(two_frontends):
    # Two frontend processes, each with its own counter file from the start (the layer
    # creates its series when vLLM builds the app).
    frontends = api_servers(two_frontends)
    assert len(frontends) == 2, ("--api-server-count 2 must run two API servers", frontends)
    assert len(metric_files(two_frontends)) == 2, metric_files(two_frontends)
    sent = {"safety": 0, "humanizing": 0}
    deadline = time.monotonic() + HANG_S
    with httpx.Client(base_url=two_frontends.api_url, timeout=120) as client:
        # New connections spread the requests over both frontend processes (the kernel
        # hands each accepted connection to one of them); send until both have counted
        # some, at least 10 requests.
        i = 0
        while i < 10 or len(decisions_by_process(two_frontends)) < 2:
            assert time.monotonic() < deadline, ("one frontend served everything", decisions_by_process(two_frontends))
            category = "safety" if i % 5 < 3 else "humanizing"
            response = client.post(
                "/chat/completions", headers={"Connection": "close"},
                json={"model": two_frontends.model, "max_tokens": 2,
                      "messages": [{"role": "user", "content": f"hello {i}"}],
                      "refusal_bias": {category: 100.0}},
            )  # fmt: skip
            assert response.status_code == 200
            assert response.json()["choices"][0]["refusal_decision"]["category"] == category
            sent[category] += 1
            i += 1
    by_process = decisions_by_process(two_frontends)
    # Both frontends (two distinct processes of this replica) served requests ...
    assert len(by_process) == 2, by_process
    assert sum(by_process.values()) == sum(sent.values()), (by_process, sent)
    for _ in range(4):  # ... and whichever process answers, the totals are the same
        counts = decisions(two_frontends)
        assert {k: counts.get(k, 0.0) for k in sent} == {k: float(v) for k, v in sent.items()}
