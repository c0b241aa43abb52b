"""Supervision of vLLM: health, restarts with back-off, drain on shutdown, process groups.

Split from :mod:`.launcher` (which wires settings, socket, standby and
metrics together) because these are the rules a running server lives by:
when a dead server is restarted and when the launcher gives up, how a
shutdown drains in-flight requests, and that no process of vLLM outlives it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable

from .settings import GatewaySettings
from .standby import Standby
from .vllm_entry import LISTEN_FD_ENV

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


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


#: How long past ``shutdown_grace_s`` vLLM may take to tear down before it is killed.
KILL_MARGIN_S = 30.0
#: While draining, the engine counts are polled this often, and must read idle this
#: many times in a row (a request between the layer and the engine is not counted).
DRAIN_POLL_S = 0.5
IDLE_CHECKS = 3
#: How long the launcher waits, once vLLM has exited, for its health watcher to finish.
WATCH_JOIN_S = 10.0


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in ``proc``'s process group (vLLM's, see :func:`supervise`)."""
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


def drain_then_stop(proc: subprocess.Popen, url: str, grace_s: float) -> None:
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


def supervise(
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
