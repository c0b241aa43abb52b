"""Several API-server processes in one replica (``--api-server-count 2``).

vLLM then serves ``/metrics`` through prometheus-client's multiprocess
collector; the layer's counters are created in each frontend process and must
add up across them, whichever process answers the scrape.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .server import Server, running_server

pytestmark = pytest.mark.e2e


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
            if s.name == "refusal_gateway_control_tokens_total" and s.labels.get("model") == server.model:
                out[s.labels["category"]] = out.get(s.labels["category"], 0.0) + s.value
    return out


def test_counters_add_up_across_frontend_processes(two_frontends):
    sent = {"safety": 6, "humanizing": 4}
    with httpx.Client(base_url=two_frontends.api_url, timeout=120) as client:
        for category, n in sent.items():
            for i in range(n):
                # New connections spread the requests over both frontend processes.
                response = client.post(
                    "/chat/completions", headers={"Connection": "close"},
                    json={"model": two_frontends.model, "max_tokens": 2,
                          "messages": [{"role": "user", "content": f"hello {i}"}],
                          "refusal_bias": {category: 100.0}},
                )
                assert response.status_code == 200
                assert response.json()["choices"][0]["refusal_decision"]["category"] == category
    for _ in range(4):  # whichever process answers, the totals are the same
        counts = decisions(two_frontends)
        assert {k: counts.get(k, 0.0) for k in sent} == {k: float(v) for k, v in sent.items()}
