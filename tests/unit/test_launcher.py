"""The launcher: settings -> vLLM command and environment, and supervision of the process."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
from refusal_gateway import launcher
from refusal_gateway.settings import GatewaySettings

from .helpers import categorical_manifest


def test_command_loads_layer_and_processor_and_passes_vllm_args_through(tmp_path):
    settings = GatewaySettings(model=str(tmp_path), port=9001, host="0.0.0.0")
    cmd = launcher.build_command(settings, tmp_path, "v1", ["--max-num-seqs", "8", "--dtype", "half"])
    joined = " ".join(cmd)
    assert "--middleware refusal_gateway.middleware.RefusalGatewayMiddleware" in joined
    assert "--logits-processors refusal_plugins.v1:RefusalLogitsProcessor" in joined
    assert "--port 9001" in joined and "--served-model-name " + tmp_path.name in joined
    assert cmd[-4:] == ["--max-num-seqs", "8", "--dtype", "half"]
    assert cmd.count("--dtype") == 1  # the user's dtype wins
    demo = launcher.build_command(GatewaySettings(), tmp_path, "v2", [])
    assert "refusal_plugins.v2:RefusalLogitsProcessorV2" in demo and "float32" in demo


def test_environment_carries_the_resolved_settings(tmp_path, monkeypatch):
    settings = GatewaySettings(refusal_content="copy")
    env = launcher.build_env(settings, tmp_path, "v1", {"VLLM_CPU_KVCACHE_SPACE": "3"})
    assert env["REFUSAL_GATEWAY_MODEL"] == str(tmp_path)
    assert env["REFUSAL_GATEWAY_SERVED_MODEL_NAME"] == "refusal-demo"
    assert env["REFUSAL_GATEWAY_REFUSAL_CONTENT"] == "copy"
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"  # the user's value is kept
    # The middleware, built by vLLM with no arguments, reads the same settings back.
    for key, value in env.items():
        if key.startswith("REFUSAL_GATEWAY_"):
            monkeypatch.setenv(key, value)
    inside = GatewaySettings()
    assert inside.model_dir() == tmp_path and inside.model_name() == "refusal-demo"
    assert inside.refusal_content == "copy"
    assert GatewaySettings.model_validate({"model": env["REFUSAL_GATEWAY_MODEL"]}).model_dir() == tmp_path


@pytest.mark.parametrize(
    ("setting", "env", "want"),
    [("v1", {}, "v1"), ("v2", {}, "v2"), ("auto", {"VLLM_USE_V2_MODEL_RUNNER": "1"}, "v2"),
     ("auto", {"VLLM_USE_V2_MODEL_RUNNER": "0"}, "v1")],
)
def test_runner_choice(setting, env, want):
    assert launcher.resolve_runner(GatewaySettings(model_runner=setting), env) == want


def test_runner_auto_without_cuda_is_v1():
    assert launcher.resolve_runner(GatewaySettings(), {}) == "v1"  # this machine has no GPU


def test_a_model_without_manifest_is_refused_before_vllm_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a refusal-token model"):
        launcher.resolve_model(GatewaySettings(model=str(tmp_path)))
    categorical_manifest().save(tmp_path)
    assert launcher.resolve_model(GatewaySettings(model=str(tmp_path))) == tmp_path


FAKE_SERVER = textwrap.dedent(
    """
    import http.server, os, socket, sys, threading, time, pathlib
    port, runs, serve_s = int(sys.argv[1]), pathlib.Path(sys.argv[2]), float(sys.argv[3])
    runs.write_text(runs.read_text() + "x" if runs.exists() else "x")

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
        def log_message(self, *a):
            pass

    if serve_s > 0:
        # Serve on the launcher's socket, as refusal_gateway.vllm_entry makes vLLM do.
        server = http.server.HTTPServer(("127.0.0.1", port), Health, bind_and_activate=False)
        server.socket = socket.socket(fileno=int(os.environ["REFUSAL_GATEWAY_LISTEN_FD"]))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        time.sleep(serve_s)
    sys.exit(3)
    """
)


def supervise(monkeypatch, tmp_path: Path, serve_s: float, port: int | None = None, **settings) -> tuple[int, int]:
    from tests.e2e.server import free_port

    port = port or free_port()
    script, runs = tmp_path / "fake.py", tmp_path / "runs"
    script.write_text(FAKE_SERVER)
    categorical_manifest().save(tmp_path)
    monkeypatch.setattr(launcher, "build_command", lambda *a: [sys.executable, str(script), str(port), str(runs), str(serve_s)])
    monkeypatch.setattr(launcher, "check_imports", lambda runner: None)
    ready: list[str] = []
    started = time.monotonic()
    settings = {"restart_backoff_s": 0.1, "canary_interval_s": 0} | settings
    code = launcher.serve(GatewaySettings(model=str(tmp_path), port=port, **settings), on_ready=ready.append)
    assert time.monotonic() - started < 60
    return code, len(runs.read_text())


def test_a_server_that_dies_after_serving_is_restarted_with_backoff(monkeypatch, tmp_path):
    code, runs = supervise(monkeypatch, tmp_path, serve_s=2.5, max_restarts=2)
    assert (code, runs) == (3, 3)  # first run + 2 restarts, then it gives up


def test_a_server_that_never_starts_is_not_restarted(monkeypatch, tmp_path):
    code, runs = supervise(monkeypatch, tmp_path, serve_s=0, max_restarts=5)
    assert (code, runs) == (3, 1)


def test_clients_get_503_with_retry_after_while_the_server_is_down(monkeypatch, tmp_path):
    import threading

    import httpx

    from tests.e2e.server import free_port

    port = free_port()
    seen: list[httpx.Response] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            try:
                seen.append(httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"x": 1}, timeout=5))
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    threading.Thread(target=client, daemon=True).start()
    try:
        # Serves 2 s, dies, 1.5 s back-off, serves again, dies, gives up.
        code, runs = supervise(monkeypatch, tmp_path, serve_s=2.0, port=port, max_restarts=1,
                               restart_backoff_s=1.5, retry_after_s=7)
    finally:
        done.set()
    assert (code, runs) == (3, 2)
    statuses = [r.status_code for r in seen]
    assert 501 in statuses  # the fake server answered (it has no POST handler)
    down = [r for r in seen if r.status_code == 503]
    assert down, statuses
    # Down between the two runs too, not only before the first one.
    first_up = statuses.index(501)
    assert 503 in statuses[first_up:]
    for response in down:
        assert response.headers["retry-after"] == "7"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "engine_unavailable"
