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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from refusal_plugins.vocab import RefusalManifest

from .canary import CANARY_SECRET_ENV, CanaryProber, load_canary_prompts
from .launcher_metrics import STATE_FILE_ENV, LauncherMetrics
from .settings import BUILT_MODELS, DRAIN_FILE_ENV, GatewaySettings
from .standby import Standby, listening_socket
from .vllm_entry import LISTEN_FD_ENV

logger = logging.getLogger(__name__)

MIDDLEWARE = "refusal_gateway.middleware.RefusalGatewayMiddleware"
PROCESSORS = {
    "v1": "refusal_plugins.v1:RefusalLogitsProcessor",
    "v2": "refusal_plugins.v2:RefusalLogitsProcessorV2",
}
#: vLLM's server, on the launcher's listening socket.
ENTRY = "refusal_gateway.vllm_entry"
#: The training kit's builder of named models (run as a child process, see resolve_model).
BUILD_ENTRY = "refusal_training.build"
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
    """The model directory; a named model is built (first run only) by the training kit.

    The kit runs in a child process: serving imports none of it, and its
    progress shows on stderr while the standby answers 503 on the port.
    """
    if settings.model in BUILT_MODELS:
        logger.info("resolving model %r (built on first use, then cached)", settings.model)
        cmd = [sys.executable, "-m", BUILD_ENTRY, settings.model,
               "--cache-dir", str(settings.cache_dir)]  # fmt: skip
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"building model {settings.model!r} failed (exit {done.returncode})")
        model_dir = Path(done.stdout.strip().splitlines()[-1])
    else:
        model_dir = settings.model_dir()
    RefusalManifest.load(model_dir)  # a clear error now rather than after loading
    return model_dir


def check_imports(runner: str) -> None:
    """Fail fast on a broken middleware or processor path."""
    module, _, name = MIDDLEWARE.rpartition(".")
    getattr(importlib.import_module(module), name)
    module, _, name = PROCESSORS[runner].partition(":")
    getattr(importlib.import_module(module), name)


def cpu_engine() -> bool:
    """Whether vLLM will run on its CPU platform (the launcher loads vLLM anyway)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


#: vLLM's flags that decide chunked prefill; a user who sets one keeps it.
CHUNKED_PREFILL_FLAGS = ("--enable-chunked-prefill", "--no-enable-chunked-prefill")


def build_command(
    settings: GatewaySettings,
    model_dir: Path,
    runner: str,
    vllm_args: Sequence[str],
    cpu: bool | None = None,
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
    dtype = settings.dtype or ("float32" if settings.model in BUILT_MODELS else None)
    if dtype and "--dtype" not in vllm_args:
        cmd += ["--dtype", dtype]
    if not any(a.split("=")[0] == "--shutdown-timeout" for a in vllm_args):
        # On SIGTERM vLLM's engine then admits nothing new and finishes what it
        # has for up to this long ("drain") instead of aborting it at once.
        cmd += ["--shutdown-timeout", str(max(0, round(settings.shutdown_grace_s)))]
    given = {a.split("=")[0] for a in vllm_args}
    if (cpu_engine() if cpu is None else cpu) and not given & set(CHUNKED_PREFILL_FLAGS):
        # vLLM 0.32's CPU worker dies on any seeded request whose prompt is prefilled in
        # chunks (it rewinds the request's torch.Generator with set_offset, which CPU
        # generators lack): one client could take the engine down. Unchunked prefill
        # never discards a sampled token, so the rewind never happens.
        cmd += ["--no-enable-chunked-prefill"]
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
    standby = Standby(sock, settings.retry_after_s, metrics)
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
                    target=_drain_then_stop, args=(proc, url, settings.shutdown_grace_s),
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
            return _supervise(settings, cmd, env, url, stopping, ready, started, standby)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if canary is not None:
            canary.stop()
        standby.close()
        sock.close()
        shutil.rmtree(state_dir, ignore_errors=True)


#: How long past ``shutdown_grace_s`` vLLM may take to tear down before it is killed.
KILL_MARGIN_S = 30.0
#: While draining, the engine counts are polled this often, and must read idle this
#: many times in a row (a request between the layer and the engine is not counted).
DRAIN_POLL_S = 0.5
IDLE_CHECKS = 3
#: How long the launcher waits, once vLLM has exited, for its health watcher to finish.
WATCH_JOIN_S = 10.0


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in ``proc``'s process group (vLLM's, see :func:`_supervise`)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left


def engine_busy(url: str) -> bool:
    """Whether vLLM's engine has requests running or waiting (False when it cannot tell)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            text = response.read().decode(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            try:
                if float(line.rsplit(" ", 1)[1]) > 0:
                    return True
            except ValueError:
                continue
    return False


def _drain_then_stop(proc: subprocess.Popen, url: str, grace_s: float) -> None:
    """Stop vLLM once nothing is in flight (or ``grace_s`` is up); kill it if it hangs.

    The drain file is already there: the layer refuses new generation requests
    with 503 + Retry-After from now on, and the requests in flight finish. Then
    vLLM gets SIGTERM; its engine (``--shutdown-timeout``) still drains what
    is left before it exits. Whatever of it runs :data:`KILL_MARGIN_S` past the
    grace period is killed.
    """
    deadline = time.monotonic() + grace_s
    idle = 0
    while proc.poll() is None and time.monotonic() < deadline and idle < IDLE_CHECKS:
        idle = 0 if engine_busy(url) else idle + 1
        time.sleep(DRAIN_POLL_S)
    if proc.poll() is None:
        logger.info("in-flight requests done (or grace period over); stopping vLLM")
        proc.send_signal(signal.SIGTERM)
    timeout_s = max(0.0, deadline - time.monotonic()) + KILL_MARGIN_S
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.error("vLLM did not stop within the grace period and %.0fs more; killing it", KILL_MARGIN_S)
        kill_group(proc)


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
    """Run ``cmd``; restart it with back-off whenever it dies after having served.

    A server that was healthy is always restarted when it dies (a client may
    have caused the crash, and must not be able to use up a budget); the
    budget, ``max_restarts``, bounds only restarts in a row that fail to come
    back healthy (a crash loop of a broken setup). A server that never became
    healthy on its first start is not restarted: a restart only repeats a
    configuration error.
    """
    failed_restarts, restarts, backoff = 0, 0, settings.restart_backoff_s
    fds = (int(env[LISTEN_FD_ENV]),) if LISTEN_FD_ENV in env else ()
    while True:
        logger.info("starting vLLM: %s", " ".join(cmd))
        started = time.monotonic()
        # A process group of its own: the launcher forwards signals itself and
        # kills the whole group (EngineCore included) once the server is gone.
        proc = subprocess.Popen(cmd, env=env, pass_fds=fds, start_new_session=True)
        started_proc(proc)
        if stopping.is_set():  # stopped between two runs
            proc.send_signal(signal.SIGTERM)
        healthy = threading.Event()

        def watch(p: subprocess.Popen = proc, ready: threading.Event = healthy) -> None:
            if wait_healthy(url, p):
                ready.set()
                on_ready(url)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        code = proc.wait()
        kill_group(proc)  # whatever it left behind
        # A server that answered /health just before dying counts as having served.
        watcher.join(timeout=WATCH_JOIN_S)
        if stopping.is_set():
            logger.info("vLLM stopped (exit %s)", code)
            return 0
        standby.resume(f"The model server stopped (exit {code}) and is restarting; retry shortly.")
        if healthy.is_set():
            failed_restarts = 0  # it came back: a crash of a healthy server is always restarted
        elif restarts == 0:
            # It never served: a configuration error, which a restart only repeats.
            logger.error("vLLM exited with %s before it became healthy; not restarting", code)
            return code or 1
        else:
            failed_restarts += 1
            if failed_restarts >= settings.max_restarts:
                logger.error(
                    "vLLM exited with %s; giving up after %d restarts in a row that did not "
                    "come back healthy", code, failed_restarts,
                )  # fmt: skip
                return code or 1
        if time.monotonic() - started > 600:
            backoff = settings.restart_backoff_s  # it had been up a while
        restarts += 1
        logger.warning("vLLM exited with %s; restart %d in %.0fs", code, restarts, backoff)
        if stopping.wait(backoff):
            return 0
        backoff = min(backoff * 2, MAX_BACKOFF_S)
