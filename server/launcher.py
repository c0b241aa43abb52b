"""``refusal-gateway serve``: settings -> one ``vllm serve`` command, supervised.

The launcher adds nothing to the request path: it resolves the model (building
the demo model on first use), import-checks the layer and the processor (a
wrong dotted path would otherwise fail only after the engine has loaded),
starts vLLM's OpenAI server with ``--middleware`` and ``--logits-processors``,
forwards every unrecognised argument to vLLM untouched, and restarts the
server with back-off if it dies. It owns the listening socket (handed to each
vLLM process), so clients get 503 + Retry-After rather than a refused
connection while vLLM loads or restarts, and it runs the over-refusal canary
against the server once it is healthy.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from refusal_plugins.vocab import RefusalManifest

from .canary import CANARY_SECRET_ENV, CanaryProber, load_canary_prompts
from .settings import DEMO_MODEL, GatewaySettings
from .standby import Standby, listening_socket
from .vllm_entry import LISTEN_FD_ENV

logger = logging.getLogger(__name__)

MIDDLEWARE = "refusal_gateway.middleware.RefusalGatewayMiddleware"
PROCESSORS = {
    "v1": "refusal_plugins.v1:RefusalLogitsProcessor",
    "v2": "refusal_plugins.v2:RefusalLogitsProcessorV2",
}
VLLM_SERVER = "vllm.entrypoints.openai.api_server"
#: vLLM's server, on the launcher's listening socket.
ENTRY = "refusal_gateway.vllm_entry"
MAX_BACKOFF_S = 60.0


def resolve_runner(settings: GatewaySettings, environ: dict[str, str]) -> str:
    """Which model runner vLLM will use; the launcher pins it so the processor matches."""
    if settings.model_runner != "auto":
        return settings.model_runner
    explicit = environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if explicit is not None:
        return "v2" if explicit.strip().lower() in ("1", "true") else "v1"
    import torch

    return "v2" if torch.cuda.is_available() else "v1"


def resolve_model(settings: GatewaySettings) -> Path:
    """The model directory, building the demo model if it is asked for and missing."""
    if settings.model == DEMO_MODEL:
        from .tools.demo_model import build_demo_model, demo_model_dir, is_built

        model_dir = demo_model_dir(settings.cache_dir)
        if not is_built(model_dir):
            logger.info("building the embedded demo model (first run only) in %s", model_dir)
        return build_demo_model(model_dir)
    model_dir = settings.model_dir()
    RefusalManifest.load(model_dir)  # a clear error now rather than after loading
    return model_dir


def check_imports(runner: str) -> None:
    """Fail fast on a broken middleware or processor path."""
    module, _, name = MIDDLEWARE.rpartition(".")
    getattr(importlib.import_module(module), name)
    module, _, name = PROCESSORS[runner].partition(":")
    getattr(importlib.import_module(module), name)


def build_command(
    settings: GatewaySettings, model_dir: Path, runner: str, vllm_args: Sequence[str]
) -> list[str]:
    cmd = [
        sys.executable, "-m", ENTRY,
        "--model", str(model_dir),
        "--served-model-name", settings.model_name(),
        "--host", settings.host,
        "--port", str(settings.port),
        "--middleware", MIDDLEWARE,
        "--logits-processors", PROCESSORS[runner],
    ]  # fmt: skip
    dtype = settings.dtype or ("float32" if settings.model == DEMO_MODEL else None)
    if dtype and "--dtype" not in vllm_args:
        cmd += ["--dtype", dtype]
    return cmd + list(vllm_args)


def build_env(
    settings: GatewaySettings, model_dir: Path, runner: str, environ: dict[str, str]
) -> dict[str, str]:
    env = dict(environ)
    env.update(settings.to_env())
    env["REFUSAL_GATEWAY_MODEL"] = str(model_dir)  # the middleware reads the resolved path
    env["REFUSAL_GATEWAY_SERVED_MODEL_NAME"] = settings.model_name()
    env["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_gib))
    cores = os.cpu_count() or 1
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def base_url(settings: GatewaySettings) -> str:
    host = "localhost" if settings.host in ("0.0.0.0", "127.0.0.1", "::") else settings.host
    return f"http://{host}:{settings.port}"


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 900.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False


def make_canary(settings: GatewaySettings, url: str, secret: str) -> CanaryProber | None:
    """The over-refusal canary of this replica, or None when turned off."""
    if settings.canary_interval_s <= 0:
        return None
    rows = load_canary_prompts(settings.canary_file)
    return CanaryProber(
        url, settings.model_name(), secret, rows, settings.canary_interval_s,
        profile=settings.canary_profile,
    )  # fmt: skip


def serve(
    settings: GatewaySettings,
    vllm_args: Sequence[str] = (),
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Run vLLM with the gateway layer until it is stopped; return its exit code."""
    sock = listening_socket(settings.host, settings.port)  # fails fast if the port is taken
    standby = Standby(sock, settings.retry_after_s)
    canary = None
    try:
        standby.resume("The model server is starting; retry shortly.")
        runner = resolve_runner(settings, dict(os.environ))
        check_imports(runner)
        model_dir = resolve_model(settings)
        cmd = build_command(settings, model_dir, runner, vllm_args)
        env = build_env(settings, model_dir, runner, dict(os.environ))
        env[LISTEN_FD_ENV] = str(sock.fileno())
        # A secret given in the environment lets an external prober (a CronJob,
        # a test) send canaries too; otherwise each launch makes its own.
        secret = os.environ.get(CANARY_SECRET_ENV) or secrets.token_urlsafe(24)
        env[CANARY_SECRET_ENV] = secret
        url = base_url(settings)
        canary = make_canary(settings, url, secret)
        stopping = threading.Event()
        procs: list[subprocess.Popen] = []

        def stop(signum, _frame):
            stopping.set()
            if procs and procs[-1].poll() is None:
                procs[-1].send_signal(signum)

        def ready(url: str) -> None:
            standby.pause()
            if canary is not None:
                canary.start()
            if on_ready is not None:
                on_ready(url)

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return _supervise(settings, cmd, env, url, stopping, ready, procs.append, standby)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if canary is not None:
            canary.stop()
        standby.close()
        sock.close()


def _supervise(
    settings: GatewaySettings,
    cmd: list[str],
    env: dict[str, str],
    url: str,
    stopping: threading.Event,
    on_ready: Callable[[str], None],
    started_proc: Callable[[subprocess.Popen], None],
    standby: Standby,
) -> int:
    """Run ``cmd``; restart it with back-off while it keeps dying after having served."""
    restarts, backoff = 0, settings.restart_backoff_s
    fds = (int(env[LISTEN_FD_ENV]),) if LISTEN_FD_ENV in env else ()
    while True:
        logger.info("starting vLLM: %s", " ".join(cmd))
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, pass_fds=fds)
        started_proc(proc)
        healthy = threading.Event()

        def watch(p: subprocess.Popen = proc, ready: threading.Event = healthy) -> None:
            if wait_healthy(url, p):
                ready.set()
                on_ready(url)

        threading.Thread(target=watch, daemon=True).start()
        code = proc.wait()
        if stopping.is_set():
            return 0
        standby.resume(f"The model server stopped (exit {code}) and is restarting; retry shortly.")
        if not healthy.is_set():
            # It never served: a configuration error, which a restart only repeats.
            logger.error("vLLM exited with %s before it became healthy; not restarting", code)
            return code or 1
        if time.monotonic() - started > 600:
            restarts, backoff = 0, settings.restart_backoff_s  # it had been healthy a while
        if restarts >= settings.max_restarts:
            logger.error("vLLM exited with %s; giving up after %d restarts", code, restarts)
            return code or 1
        restarts += 1
        logger.warning("vLLM exited with %s; restart %d in %.0fs", code, restarts, backoff)
        if stopping.wait(backoff):
            return 0
        backoff = min(backoff * 2, MAX_BACKOFF_S)
