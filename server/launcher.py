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

This module wires those parts together; the command is built in
:mod:`.vllm_command`, and the restart and shutdown rules live in
:mod:`.supervision`.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .canary import CANARY_SECRET_ENV, CanaryProber, load_canary_prompts
from .launcher_metrics import STATE_FILE_ENV, LauncherMetrics
from .settings import DRAIN_FILE_ENV, SERVING_FILE_ENV, GatewaySettings
from .standby import Standby, listening_socket
from .supervision import (
    KILL_MARGIN_S,
    MAX_BACKOFF_S,
    drain_then_stop,
    kill_group,
    supervise,
    wait_healthy,
)
from .vllm_command import (
    BUILD_ENTRY,
    ENTRY,
    MIDDLEWARE,
    PROCESSORS,
    base_url,
    build_command,
    build_env,
    check_imports,
    resolve_model,
    resolve_runner,
)
from .vllm_entry import LISTEN_FD_ENV

logger = logging.getLogger(__name__)

# The command (vllm_command) and the supervision (supervision) are re-exported:
# launcher.X is where callers and tests find them.
__all__ = [
    "BUILD_ENTRY", "ENTRY", "KILL_MARGIN_S", "MAX_BACKOFF_S", "MIDDLEWARE", "PROCESSORS",
    "base_url", "build_command", "build_env", "check_imports", "kill_group", "make_canary",
    "resolve_model", "resolve_runner", "serve", "supervise", "wait_healthy",
]  # fmt: skip

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
    """Run vLLM with the gateway layer until it is stopped; return its exit code.

    SIGTERM or SIGINT drains: the launcher creates the drain file (path in
    :data:`DRAIN_FILE_ENV`; the layer then refuses new generation requests
    with 503 + Retry-After), waits until vLLM's engine has nothing running or
    waiting, at most ``shutdown_grace_s``, then sends SIGTERM to vLLM's API
    server, whose engine (started with ``--shutdown-timeout``) still finishes
    whatever is left before it exits. Whatever of vLLM is still running
    ``shutdown_grace_s`` + :data:`KILL_MARGIN_S` after the signal, or after a
    second signal, is killed; vLLM runs in a process group of its own, which
    is killed whole after every exit, so no process (EngineCore included)
    outlives it.
    """
    sock = listening_socket(settings.host, settings.port)  # fails fast if the port is taken
    # The launcher's own series: served by the standby while vLLM is down, and
    # re-exported by vLLM's /metrics from this file while it serves.
    state_dir = Path(tempfile.mkdtemp(prefix="refusal-gateway-launcher-"))
    metrics = LauncherMetrics(settings.model_name(), state_file=state_dir / "metrics.prom")
    serving_file = state_dir / "serving"
    standby = Standby(sock, settings.retry_after_s, metrics, serving_file=serving_file)
    canary = None
    try:
        standby.resume("The model server is starting; retry shortly.", reason="starting")
        runner = resolve_runner(settings, dict(os.environ))
        check_imports(runner)
        model_dir = resolve_model(settings)
        cmd = build_command(settings, model_dir, runner, vllm_args)
        env = build_env(settings, model_dir, runner, dict(os.environ))
        env[LISTEN_FD_ENV] = str(sock.fileno())
        env[STATE_FILE_ENV] = str(metrics.state_file)
        drain_file = state_dir / "draining"
        env[DRAIN_FILE_ENV] = str(drain_file)
        env[SERVING_FILE_ENV] = str(serving_file)
        # A secret given in the environment lets an external prober (a CronJob,
        # a test) send canaries too; otherwise each launch makes its own.
        secret = os.environ.get(CANARY_SECRET_ENV) or secrets.token_urlsafe(24)
        env[CANARY_SECRET_ENV] = secret
        url = base_url(settings)
        canary = make_canary(settings, url, secret)
        stopping = threading.Event()
        procs: list[subprocess.Popen] = []

        def stop(signum, _frame):
            proc = procs[-1] if procs else None
            if stopping.is_set():  # a second signal: no more waiting
                logger.warning("second signal %d: killing vLLM now", signum)
                if proc is not None:
                    kill_group(proc)
                return
            stopping.set()
            drain_file.touch()
            metrics.set_state("stopping")
            if proc is not None and proc.poll() is None:
                logger.info(
                    "signal %d: draining in-flight requests for up to %.0fs, then stopping vLLM",
                    signum, settings.shutdown_grace_s,
                )  # fmt: skip
                threading.Thread(
                    target=drain_then_stop, args=(proc, url, settings.shutdown_grace_s),
                    name="shutdown-drain", daemon=True,
                ).start()  # fmt: skip

        def ready(url: str) -> None:
            if stopping.is_set():
                return
            metrics.set_state("serving")
            standby.pause()
            if canary is not None:
                canary.start()
            if on_ready is not None:
                on_ready(url)

        def started(proc: subprocess.Popen) -> None:
            procs.append(proc)
            if len(procs) > 1:
                metrics.restarted()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return supervise(settings, cmd, env, url, stopping, ready, started, standby)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if canary is not None:
            canary.stop()
        standby.close()
        sock.close()
        shutil.rmtree(state_dir, ignore_errors=True)
