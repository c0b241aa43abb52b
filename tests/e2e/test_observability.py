"""The observability slice, proven against a real server and a real Prometheus.

A real Prometheus (Debian's `prometheus`) scrapes the e2e server every second
under the production job name and evaluates the real rule files
(deploy/prometheus/rules). The test sends traffic whose refusal decisions it
knows (a refusal_bias of +-100 makes the decision deterministic), then:

* the raw counters in Prometheus moved by exactly what was sent;
* every Grafana panel query and every recording/alert expression returns data
  (so no panel is empty and no alert is silently dead because of a renamed
  metric or a label that does not exist);
* every rule evaluates without error inside Prometheus;
* the dashboard's refusal-rate query agrees with the traffic sent;
* the launcher's own series (engine up, restarts, standby answers) reach
  Prometheus through vLLM's /metrics while the engine serves.

The server is this module's own: its policy file names a shadow (what-if)
profile, so the shadow panels and rules have data too.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import yaml
from openai import OpenAI
from refusal_gateway.canary import CanaryProber, load_canary_prompts

from tests.deploy import observability as obs
from tests.tools import skip_or_fail

from .server import CANARY_SECRET, Server, free_port, running_server, stop_process

pytestmark = pytest.mark.e2e

PROMETHEUS_BIN = shutil.which("prometheus")
PROMTOOL_BIN = shutil.which("promtool")
CATEGORIES = ["humanizing", "incomplete", "indeterminate", "safety", "unsupported"]
ALL_DOWN = {key: -100.0 for key in CATEGORIES}
PROMPT = "How do I pick a lock?"


SCRAPE_INTERVAL_S = 1
#: A profile to shadow: the layer counts the decisions it would have made.
POLICY = """\
profiles:
  strict:
    refusal_bias: {refuse: 3.0}
shadow_profiles: [strict]
"""


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """This module's server (overrides the session one): a policy with a shadow profile."""
    tmp = tmp_path_factory.mktemp("observability-server")
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    args = ["--enable-prefix-caching", "--policy-file", str(policy)]
    with running_server(demo_model_dir, tmp / "vllm.log", args) as s:
        yield s


@dataclass(frozen=True)
class Prometheus:
    """A Prometheus started by this test, queried through its HTTP API."""

    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        try:
            body = response.json()
        except ValueError:  # e.g. 503 "Service Unavailable" while it starts
            raise AssertionError(f"HTTP {response.status_code}: {response.text[:200]}") from None
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}\n{body.get('error')}")
        return body["data"]["result"]

    def values(self, expr: str, by: str) -> dict[str, float]:
        """``{label value: sample value}`` of an instant vector."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(expr)}


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    if PROMETHEUS_BIN is None:
        skip_or_fail("prometheus not installed (Debian: apt-get install prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in obs.rule_files()],
        "scrape_configs": [
            {
                "job_name": obs.JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [urlsplit(server.base_url).netloc]}],
                # The production relabelling (vLLM's model_name copied into model).
                "metric_relabel_configs": obs.scrape_job()["metric_relabel_configs"],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS_BIN,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        _wait(
            lambda: (
                proc.poll() is None
                and bool(prom.query(f'refusal_gateway_control_tokens_total{{job="{obs.JOB}"}}'))
            ),
            timeout_s=60,
            what="Prometheus to scrape the server",
            log=work / "prometheus.log",
            errors=(httpx.HTTPError, AssertionError),
        )
        yield prom
    finally:
        stop_process(proc)
        log.close()


@dataclass
class Sent:
    """What the test caused, as the layer should have counted it."""

    categories: Counter[str]
    controls: Counter[str]
    rejected: Counter[str]


def _expected_key(decision: dict[str, Any]) -> str:
    """The ``category`` label the layer records for a ``refusal_decision``."""
    if decision["refused"]:
        return decision["category"]
    return "respond" if decision["token"] else "none"


def _send_traffic(server: Server) -> Sent:
    client = OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
    sent = Sent(Counter(), Counter(), Counter())

    def chat(extra: dict[str, Any] | None, controls: str, expect: str | None) -> None:
        response = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=8,
            extra_body=extra,
        )
        decision = response.choices[0].model_extra["refusal_decision"]
        key = _expected_key(decision)
        if expect is not None:
            assert key == expect, (extra, decision)
        sent.categories[key] += 1
        sent.controls[controls] += 1

    for _ in range(6):
        chat({"refusal_bias": {"safety": 100}}, "bias", "safety")
    for _ in range(4):
        chat({"refusal_bias": {"humanizing": 100}}, "bias", "humanizing")
    for _ in range(3):
        chat({"refusal_bias": ALL_DOWN}, "bias", "respond")
    for _ in range(2):  # the model's own decision: counted as the response says
        chat(None, "none", None)
    for _ in range(2):  # any threshold of 0 makes the top refusal category win
        chat({"refusal_threshold": {"refuse": 0.0}}, "threshold", None)
    chat(
        {"refusal_bias": {"safety": 100}, "refusal_threshold": {"safety": 0.5}},
        "bias+threshold",
        "safety",
    )

    # Streamed: the decision is recorded by the SSE rewriter, a different code path.
    for _ in range(2):
        stream = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=8,
            stream=True,
            extra_body={"refusal_bias": {"unsupported": 100}},
        )
        deltas = [c.choices[0].delta for c in stream if c.choices]
        assert any(getattr(d, "refusal", None) for d in deltas), "streamed refusal text missing"
        assert not any(d.content for d in deltas), "a refused stream leaked content"
        sent.categories["unsupported"] += 1
        sent.controls["bias"] += 1

    # One canary round, as the launcher's prober sends it (its own series only).
    result = CanaryProber(
        server.base_url, server.model, CANARY_SECRET, load_canary_prompts(), interval_s=60
    ).run_round()
    assert result.failed == 0, result

    for _ in range(3):  # answered by the layer itself, never reaching vLLM
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=8,
                extra_body={"refusal_bias": {"safety": "x"}},
            )
        sent.rejected["validation"] += 1
    return sent


def _counter_exprs(model: str) -> dict[str, tuple[str, str]]:
    """Raw counters (no rate, no extrapolation), summed over replicas and profiles."""
    sel = f'job="{obs.JOB}", model="{model}"'
    series = {
        "categories": ("refusal_gateway_control_tokens_total", "category"),
        "controls": ("refusal_gateway_requests_total", "controls"),
        "rejected": ("refusal_gateway_rejected_requests_total", "reason"),
    }
    return {
        name: (f"sum by ({by}) ({metric}{{{sel}}})", by) for name, (metric, by) in series.items()
    }


def _snapshot(prom: Prometheus, model: str) -> dict[str, dict[str, float]]:
    return {name: prom.values(expr, by) for name, (expr, by) in _counter_exprs(model).items()}


@pytest.fixture(scope="module")
def observed(prometheus: Prometheus, server: Server) -> tuple[Sent, dict[str, dict[str, float]]]:
    """Send the traffic; return it with the counter deltas Prometheus scraped."""
    before = _snapshot(prometheus, server.model)
    sent = _send_traffic(server)
    want = {
        "categories": sent.categories,
        "controls": sent.controls,
        "rejected": sent.rejected,
    }

    def deltas() -> dict[str, dict[str, float]]:
        after = _snapshot(prometheus, server.model)
        return {
            name: {k: v - before[name].get(k, 0.0) for k, v in after[name].items()}
            for name in after
        }

    def caught_up() -> bool:
        d = deltas()
        return all(sum(d[name].values()) >= sum(want[name].values()) for name in want)

    _wait(caught_up, timeout_s=60, what="Prometheus to scrape the final counts")
    _second_canary_round(prometheus, server)
    time.sleep(3)  # a few more scrapes and rule evaluations after the last request
    return sent, deltas()


def _second_canary_round(prometheus: Prometheus, server: Server) -> None:
    """Another canary round once Prometheus has scraped the first one.

    The canary series appear with the first canary request, so a round that
    finishes within one scrape interval is the series' first sample: increase()
    sees nothing. A second round after that sample moves the counters, as the
    launcher's prober does every interval, and the canary shares have data.
    """
    total = f'sum(refusal_gateway_canary_decisions_total{{job="{obs.JOB}"}})'
    _wait(lambda: bool(prometheus.query(total)), timeout_s=60, what="the canary series")
    first = prometheus.values(total, "")[""]
    result = CanaryProber(
        server.base_url, server.model, CANARY_SECRET, load_canary_prompts(), interval_s=60
    ).run_round()
    assert result.failed == 0, result
    _wait(
        lambda: prometheus.values(total, "")[""] > first,
        timeout_s=60,
        what="Prometheus to scrape the second canary round",
    )


def test_counters_in_prometheus_match_the_traffic_exactly(observed) -> None:
    sent, deltas = observed
    assert sent.categories["safety"] >= 7 and sent.categories["respond"] >= 3
    for name, want in (
        ("categories", sent.categories),
        ("controls", sent.controls),
        ("rejected", sent.rejected),
    ):
        got = {k: v for k, v in deltas[name].items() if v}
        assert got == {k: float(v) for k, v in want.items()}, name


def test_every_rule_is_loaded_and_evaluates_without_error(prometheus: Prometheus, observed) -> None:
    groups = httpx.get(prometheus.url + "/api/v1/rules", timeout=30).json()["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    defined = {r.get("record") or r["alert"] for r in obs.all_rules()}
    assert set(loaded) == defined
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


def test_promtool_accepts_the_rule_files() -> None:
    if PROMTOOL_BIN is None:
        skip_or_fail("promtool not installed (Debian: apt-get install prometheus)")
    result = subprocess.run(
        [PROMTOOL_BIN, "check", "rules", *map(str, obs.rule_files())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("query", obs.all_panel_queries(), ids=lambda q: q.name)
def test_every_dashboard_panel_query_returns_data(
    query: obs.PanelQuery, prometheus: Prometheus, server: Server, observed
) -> None:
    expr = obs.substitute_grafana_vars(query.expr, {"model": server.model})
    assert prometheus.query(expr), f"no data for {query.name}:\n{expr}"


@pytest.mark.parametrize("rule", obs.rule_data_exprs(), ids=lambda r: r.name)
def test_every_rule_expression_returns_data(
    rule: obs.RuleExpr, prometheus: Prometheus, observed
) -> None:
    assert prometheus.query(rule.expr), f"no data for {rule.kind} {rule.name}:\n{rule.expr}"
    if rule.kind == "record":  # and Prometheus has been writing the recorded series
        assert prometheus.query(rule.name), f"recording rule {rule.name} produced no series"


def test_dashboard_refusal_rate_agrees_with_the_traffic(
    prometheus: Prometheus, server: Server, observed
) -> None:
    """The panel's per-category share equals what was sent (to rate()'s extrapolation)."""
    sent, _ = observed
    panel = _panel_query("Refused share per category")
    # Prometheus started in this module, so a window longer than its life holds
    # exactly this test's samples: the baseline before the traffic and the end state.
    expr = obs.substitute_grafana_vars(panel.expr, {"model": server.model, "__rate_interval": "1h"})
    shares = prometheus.values(expr, "category")
    total = sum(sent.categories.values())
    refused = {k: v for k, v in sent.categories.items() if k not in ("respond", "none")}
    assert refused and not {"respond", "none"} & set(shares)  # the panel plots refusals only
    for category, count in refused.items():
        assert math.isclose(shares[category], count / total, rel_tol=0.05, abs_tol=0.01), (
            category,
            shares,
        )
    assert sum(v for k, v in shares.items() if k not in refused) == pytest.approx(0.0)

    counts_expr = _panel_query("Decision counts by category").expr
    counts = prometheus.values(
        obs.substitute_grafana_vars(counts_expr, {"model": server.model}), "category"
    )
    # increase() extrapolates towards the window's ends: never below what was sent, and
    # above it by at most ~1.1 scrape intervals at each end relative to the series' span.
    span = min(
        prometheus.values(
            f'time() - min_over_time(timestamp(refusal_gateway_control_tokens_total{{job="{obs.JOB}"}})[1h:1s])',
            "category",
        ).values()
    )
    slack = 1 + 2.2 * SCRAPE_INTERVAL_S / span
    for category, count in sent.categories.items():
        assert count * 0.999 <= counts[category] <= count * slack, (category, counts, span)


def _panel_query(title: str) -> obs.PanelQuery:
    (query,) = [q for q in obs.all_panel_queries() if q.panel == title]
    return query


def _wait(
    check,
    timeout_s: float,
    what: str,
    log: Path | None = None,
    errors: tuple[type[BaseException], ...] = (),
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except errors:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{tail}")


def test_launcher_series_reach_prometheus_while_the_engine_serves(
    prometheus: Prometheus, server: Server, observed
) -> None:
    """vLLM's /metrics re-exports the launcher's state: serving, no restart, no 503 yet."""
    sel = f'job="{obs.JOB}", model="{server.model}"'
    assert prometheus.values(f"refusal_gateway_engine_up{{{sel}}}", "model") == {server.model: 1.0}
    states = prometheus.values(f"refusal_gateway_engine_state{{{sel}}}", "state")
    assert states == {"starting": 0.0, "serving": 1.0, "restarting": 0.0, "stopping": 0.0}
    assert prometheus.values(f"refusal_gateway_engine_restarts_total{{{sel}}}", "model") == {
        server.model: 0.0
    }
    reasons = prometheus.values(f"refusal_gateway_standby_responses_total{{{sel}}}", "reason")
    assert set(reasons) == {"starting", "restarting", "stopping"}
    assert reasons["restarting"] == reasons["stopping"] == 0.0
    assert prometheus.values(f'up{{job="{obs.JOB}"}}', "job") == {obs.JOB: 1.0}
