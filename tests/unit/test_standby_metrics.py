"""The launcher answers /metrics with its own series while vLLM is down or loading.

Against the real standby on a real listening socket (the one the launcher
hands to vLLM), and through ``launcher.serve`` with a stand-in for vLLM that
serves, dies and is restarted. Prometheus' own parser reads every answer.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from refusal_gateway import launcher
from refusal_gateway.launcher_metrics import (
    STATE_FILE_ENV,
    LauncherMetrics,
    register_launcher_series,
)
from refusal_gateway.metrics import get_metrics
from refusal_gateway.settings import GatewaySettings
from refusal_gateway.standby import Standby, listening_socket

from .helpers import categorical_manifest


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of an exposition, via Prometheus' parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[name, tuple(sorted(labels.items()))]


def test_standby_answers_metrics_with_200_and_everything_else_with_503(tmp_path: Path) -> None:
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    metrics = LauncherMetrics("demo", state_file=tmp_path / "metrics.prom")
    standby = Standby(sock, retry_after_s=3, metrics=metrics)
    url = f"http://127.0.0.1:{port}"
    try:
        standby.resume("loading", reason="starting")
        scrape = httpx.get(url + "/metrics", timeout=10)
        assert scrape.status_code == 200
        assert scrape.headers["content-type"].startswith("text/plain")
        assert value(scrape.text, "refusal_gateway_engine_up", model="demo") == 0.0
        assert (
            value(scrape.text, "refusal_gateway_engine_state", model="demo", state="starting")
            == 1.0
        )
        assert value(scrape.text, "refusal_gateway_engine_restarts_total", model="demo") == 0.0
        for reason in ("starting", "restarting", "stopping"):  # every series exists at 0
            assert (
                value(
                    scrape.text,
                    "refusal_gateway_standby_responses_total",
                    model="demo",
                    reason=reason,
                )
                == 0.0
            )

        for path in ("/v1/chat/completions", "/health", "/metrics/extra"):
            response = (
                httpx.post(url + path, json={}) if path.startswith("/v1") else httpx.get(url + path)
            )
            assert response.status_code == 503, path
            assert response.headers["retry-after"] == "3"
        scrape = httpx.get(
            url + "/metrics?name[]=x", timeout=10
        )  # a query string is still /metrics
        assert (
            value(
                scrape.text,
                "refusal_gateway_standby_responses_total",
                model="demo",
                reason="starting",
            )
            == 3.0
        )

        # The engine served, died and is reloading: the 503s now count as restarting.
        metrics.set_state("serving")
        metrics.restarted()
        standby.resume("restarting")
        assert httpx.get(url + "/health").status_code == 503
        scrape = httpx.get(url + "/metrics", timeout=10).text
        assert (
            value(scrape, "refusal_gateway_engine_state", model="demo", state="restarting") == 1.0
        )
        assert value(scrape, "refusal_gateway_engine_state", model="demo", state="serving") == 0.0
        assert value(scrape, "refusal_gateway_engine_restarts_total", model="demo") == 1.0
        assert (
            value(
                scrape, "refusal_gateway_standby_responses_total", model="demo", reason="restarting"
            )
            == 1.0
        )
        assert (
            value(
                scrape, "refusal_gateway_standby_responses_total", model="demo", reason="starting"
            )
            == 3.0
        )
    finally:
        standby.close()
        sock.close()


def test_vllm_side_collector_re_exports_the_state_file(tmp_path: Path) -> None:
    """While vLLM serves, its /metrics carries the launcher's series, values continuing."""
    state = tmp_path / "metrics.prom"
    metrics = LauncherMetrics("demo", state_file=state)
    registry = CollectorRegistry()
    assert register_launcher_series(registry, {STATE_FILE_ENV: str(state)}) is not None
    metrics.restarted()
    metrics.standby_answered()  # counted in memory; written with the next state change
    metrics.set_state("serving")
    text = generate_latest(registry).decode()
    assert value(text, "refusal_gateway_engine_up", model="demo") == 1.0
    assert value(text, "refusal_gateway_engine_restarts_total", model="demo") == 1.0
    assert (
        value(text, "refusal_gateway_standby_responses_total", model="demo", reason="starting")
        == 1.0
    )
    # The gateway's registry picks the file up from the environment the launcher sets.
    os.environ[STATE_FILE_ENV] = str(state)
    try:
        gateway_registry = CollectorRegistry()
        get_metrics(gateway_registry)
        text = generate_latest(gateway_registry).decode()
    finally:
        del os.environ[STATE_FILE_ENV]
    assert value(text, "refusal_gateway_engine_up", model="demo") == 1.0
    assert "refusal_gateway_control_tokens" in text


def test_without_a_state_file_nothing_is_added(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    assert register_launcher_series(registry, {}) is None
    collector = register_launcher_series(registry, {STATE_FILE_ENV: str(tmp_path / "absent")})
    assert collector is not None and list(collector.collect()) == []


FAKE_VLLM = textwrap.dedent(
    """
    import http.server, os, socket, sys, threading, time, pathlib
    port, runs, serve_s = int(sys.argv[1]), pathlib.Path(sys.argv[2]), float(sys.argv[3])
    runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
    if len(runs.read_text()) > 2:
        sys.exit(3)  # the third run never comes up: the launcher gives up

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            # /health 200; /metrics: the launcher's series as vLLM re-exports them.
            body = b""
            if self.path == "/metrics":
                body = pathlib.Path(os.environ["REFUSAL_GATEWAY_LAUNCHER_METRICS_FILE"]).read_bytes()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Handler, bind_and_activate=False)
    server.socket = socket.socket(fileno=int(os.environ["REFUSAL_GATEWAY_LISTEN_FD"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    time.sleep(serve_s)
    sys.exit(3)
    """
)


def test_launcher_exports_restarts_and_engine_state_across_a_crash(
    monkeypatch, tmp_path: Path
) -> None:
    from tests.e2e.server import free_port

    port = free_port()
    script, runs = tmp_path / "fake.py", tmp_path / "runs"
    script.write_text(FAKE_VLLM)
    categorical_manifest().save(tmp_path)
    monkeypatch.setattr(
        launcher,
        "build_command",
        lambda *a: [sys.executable, str(script), str(port), str(runs), "2.0"],
    )
    monkeypatch.setattr(launcher, "check_imports", lambda runner: None)
    scrapes: list[str] = []
    done = threading.Event()

    def scraper() -> None:
        while not done.is_set():
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                if response.status_code == 200 and response.text:
                    scrapes.append(response.text)
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    try:
        # Serves 2 s, dies, 1.5 s back-off, serves again, dies, 3 s back-off,
        # a third run that never gets healthy: the launcher gives up.
        settings = GatewaySettings(
            model=str(tmp_path), port=port, canary_interval_s=0, max_restarts=1,
            restart_backoff_s=1.5, served_model_name="demo",
        )  # fmt: skip
        code = launcher.serve(settings)
    finally:
        done.set()
        thread.join(timeout=10)
    assert code == 3 and runs.read_text() == "xxx"
    states = [
        next(s for s in ("starting", "serving", "restarting", "stopping")
             if value(t, "refusal_gateway_engine_state", model="demo", state=s) == 1.0)
        for t in scrapes
    ]  # fmt: skip
    # Every scrape got an answer with the launcher's series: standby or (fake) vLLM.
    assert states, "no /metrics answer at all"
    assert "serving" in states and "restarting" in states, states
    # Scraped while serving, engine_up is 1; while restarting, 0, with one restart counted.
    serving = [t for t, s in zip(scrapes, states, strict=True) if s == "serving"]
    assert all(value(t, "refusal_gateway_engine_up", model="demo") == 1.0 for t in serving)
    last_serving = serving[-1]
    assert value(last_serving, "refusal_gateway_engine_restarts_total", model="demo") == 1.0
    # The last answers came from the standby after the third run: two restarts counted.
    assert value(scrapes[-1], "refusal_gateway_engine_restarts_total", model="demo") == 2.0
    restarting = [t for t, s in zip(scrapes, states, strict=True) if s == "restarting"]
    assert all(value(t, "refusal_gateway_engine_up", model="demo") == 0.0 for t in restarting)
