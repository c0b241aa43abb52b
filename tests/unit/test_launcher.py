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


def test_a_model_served_by_its_directory_gets_the_dtype_its_manifest_declares(tmp_path):
    """A kit-built head served by path (``build-model --artefact``) runs in float32 as the
    named models do; a manifest that declares nothing leaves vLLM its own choice."""
    declaring, silent = tmp_path / "kit", tmp_path / "other"
    for model_dir, extra in ((declaring, {"dtype": "float32"}), (silent, {})):
        model_dir.mkdir()
        manifest = categorical_manifest()
        manifest.extra.update(extra)
        manifest.save(model_dir)

    def dtype(model_dir, vllm_args=(), **settings):
        cmd = launcher.build_command(
            GatewaySettings(model=str(model_dir), **settings), model_dir, "v1", list(vllm_args)
        )
        assert cmd.count("--dtype") <= 1
        return cmd[cmd.index("--dtype") + 1] if "--dtype" in cmd else None

    assert dtype(declaring) == "float32"
    assert dtype(silent) is None
    assert dtype(declaring, dtype="bfloat16") == "bfloat16"  # the operator's setting wins
    assert dtype(declaring, ["--dtype", "half"]) == "half"  # and so does a vLLM flag
    assert dtype(declaring, ["--dtype=half"]) is None  # in either spelling, given once


def test_environment_carries_the_resolved_settings(tmp_path, monkeypatch):
    settings = GatewaySettings(refusal_content="copy")
    env = launcher.build_env(settings, tmp_path, "v1", {"VLLM_CPU_KVCACHE_SPACE": "3"})
    assert env["REFUSAL_GATEWAY_MODEL"] == str(tmp_path)
    assert env["REFUSAL_GATEWAY_SERVED_MODEL_NAME"] == "refusal-smollm2"  # the default model
    assert env["REFUSAL_GATEWAY_REFUSAL_CONTENT"] == "copy"
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"  # the user's value is kept
    # The middleware, built by vLLM with no arguments, reads the same settings back.
    for key, value in env.items():
        if key.startswith("REFUSAL_GATEWAY_"):
            monkeypatch.setenv(key, value)
    inside = GatewaySettings()
    assert inside.model_dir() == tmp_path and inside.model_name() == "refusal-smollm2"
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
    port, runs, healthy_runs, serve_s = (
        int(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
    answered = threading.Event()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
            answered.set()
        def log_message(self, *a):
            pass

    if len(runs.read_text()) <= healthy_runs:
        # Serve on the launcher's socket, as refusal_gateway.vllm_entry makes vLLM do,
        # until the launcher has seen it healthy (and serve_s more), then crash.
        server = http.server.HTTPServer(("127.0.0.1", port), Health, bind_and_activate=False)
        server.socket = socket.socket(fileno=int(os.environ["REFUSAL_GATEWAY_LISTEN_FD"]))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        answered.wait()
        time.sleep(serve_s)
    sys.exit(3)
    """
)


def supervise(
    monkeypatch, tmp_path: Path, healthy_runs: int, serve_s: float = 0.1, port: int | None = None,
    **settings,
) -> tuple[int, int]:
    """Run the launcher on a fake server whose first ``healthy_runs`` runs serve, then crash.

    Later runs crash before they become healthy. Returns the launcher's exit
    code and how many times the fake server was started.
    """
    from tests.e2e.server import free_port

    port = port or free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    script, runs = tmp_path / "fake.py", tmp_path / "runs"
    script.write_text(FAKE_SERVER)
    categorical_manifest().save(tmp_path)
    cmd = [sys.executable, str(script), str(port), str(runs), str(healthy_runs), str(serve_s)]
    monkeypatch.setattr(launcher, "build_command", lambda *a: cmd)
    monkeypatch.setattr(launcher, "check_imports", lambda runner: None)
    ready: list[str] = []
    settings = {"restart_backoff_s": 0.05, "canary_interval_s": 0} | settings
    code = launcher.serve(GatewaySettings(model=str(tmp_path), port=port, **settings), on_ready=ready.append)
    assert len(ready) == min(len(runs.read_text()), healthy_runs)
    return code, len(runs.read_text())


def test_a_healthy_server_that_dies_is_always_restarted(monkeypatch, tmp_path):
    # Four crashes of a healthy server (as a client might cause) with a budget of
    # 2: each is restarted; then two restarts in a row that never come back
    # healthy use the budget up.
    code, runs = supervise(monkeypatch, tmp_path, healthy_runs=4, max_restarts=2)
    assert (code, runs) == (3, 4 + 2)


def test_the_budget_counts_only_restarts_in_a_row_that_fail(monkeypatch, tmp_path):
    code, runs = supervise(monkeypatch, tmp_path, healthy_runs=1, max_restarts=3)
    assert (code, runs) == (3, 1 + 3)
    code, runs = supervise(monkeypatch, tmp_path / "zero", healthy_runs=2, max_restarts=0)
    assert (code, runs) == (3, 2 + 1)  # a budget of 0 still restarts a server that had served


def test_a_server_that_never_starts_is_not_restarted(monkeypatch, tmp_path):
    code, runs = supervise(monkeypatch, tmp_path, healthy_runs=0, max_restarts=5)
    assert (code, runs) == (3, 1)


def test_the_vllm_command_drains_for_the_grace_period(tmp_path):
    cmd = launcher.build_command(GatewaySettings(shutdown_grace_s=12), tmp_path, "v1", [])
    assert cmd[cmd.index("--shutdown-timeout") + 1] == "12"
    mine = launcher.build_command(GatewaySettings(), tmp_path, "v1", ["--shutdown-timeout=3"])
    assert mine.count("--shutdown-timeout") == 0 and mine[-1] == "--shutdown-timeout=3"


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
        # Serves (2 s once healthy), dies, 1.5 s back-off, fails to come back, gives up.
        code, runs = supervise(monkeypatch, tmp_path, healthy_runs=1, serve_s=2.0, port=port,
                               max_restarts=1, restart_backoff_s=1.5, retry_after_s=7)
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


DRAINING_SERVER = textwrap.dedent(
    """
    import http.server, os, signal, socket, subprocess, sys, threading, time, pathlib
    port, out = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    # A child that ignores SIGTERM, as a stuck EngineCore would.
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    (out / "child").write_text(str(child.pid))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Health, bind_and_activate=False)
    server.socket = socket.socket(fileno=int(os.environ["REFUSAL_GATEWAY_LISTEN_FD"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop.wait()
    # The launcher asked the layer to admit nothing new before it stopped the server.
    (out / "drained").write_text(str(os.path.exists(os.environ["REFUSAL_GATEWAY_DRAIN_FILE"])))
    sys.exit(0)
    """
)


def test_sigterm_drains_vllm_and_leaves_no_process_behind(monkeypatch, tmp_path):
    import os
    import signal
    import threading

    import psutil

    from tests.e2e.server import free_port

    port = free_port()
    script = tmp_path / "fake.py"
    script.write_text(DRAINING_SERVER)
    categorical_manifest().save(tmp_path)
    cmd = [sys.executable, str(script), str(port), str(tmp_path)]
    monkeypatch.setattr(launcher, "build_command", lambda *a: cmd)
    monkeypatch.setattr(launcher, "check_imports", lambda runner: None)

    def terminate(_url: str) -> None:
        threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM), daemon=True).start()

    settings = GatewaySettings(model=str(tmp_path), port=port, canary_interval_s=0, max_restarts=0)
    assert launcher.serve(settings, on_ready=terminate) == 0
    assert (tmp_path / "drained").read_text() == "True"  # signalled after the drain began
    child = int((tmp_path / "child").read_text())
    try:
        psutil.Process(child).wait(timeout=30)  # a hang guard, not a timing check
    except psutil.NoSuchProcess:
        pass
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_cpu_engines_prefill_unchunked_unless_the_user_decides(tmp_path):
    """vLLM 0.32's CPU worker dies on seeded requests prefilled in chunks (no set_offset)."""
    settings = GatewaySettings()
    assert "--no-enable-chunked-prefill" in launcher.build_command(settings, tmp_path, "v1", [], cpu=True)
    assert "--no-enable-chunked-prefill" not in launcher.build_command(
        settings, tmp_path, "v1", [], cpu=False
    )
    mine = launcher.build_command(settings, tmp_path, "v1", ["--enable-chunked-prefill"], cpu=True)
    assert "--no-enable-chunked-prefill" not in mine
