"""Start the real stack (``refusal-gateway serve`` -> vLLM CPU + layer + processor)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from refusal_gateway.launcher import wait_healthy

MODEL_NAME = "refusal-demo"
#: The canary secret of every e2e server: tests send canary rounds themselves
#: (the launcher's own timed prober is off, so it never adds traffic mid-test).
CANARY_SECRET = "e2e-canary-secret"


@dataclass(frozen=True)
class Server:
    base_url: str
    model: str
    model_dir: Path
    log: Path
    pid: int = 0  # the launcher's

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def metrics_text(self) -> str:
        return httpx.get(self.base_url + "/metrics", timeout=10).text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    model_dir: Path,
    log: Path,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
    dtype: str | None = "float32",
) -> Iterator[Server]:
    """``dtype=None`` leaves it to the launcher (the model's manifest, else vLLM)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "refusal_gateway.cli", "serve",
        "--model", str(model_dir), "--served-model-name", MODEL_NAME, "--port", str(port),
        *(["--dtype", dtype] if dtype else []),
        "--enforce-eager", "--max-model-len", "512", "--canary-interval-s", "0", *args,
    ]  # fmt: skip
    full_env = {
        **os.environ, "PYTHONUNBUFFERED": "1", "REFUSAL_GATEWAY_CANARY_SECRET": CANARY_SECRET,
        **(env or {}),
    }  # fmt: skip
    with serving(cmd, full_env, model_dir, log, port, "server", timeout_s) as server:
        yield server


@contextmanager
def serving(
    cmd: Sequence[str], env: dict[str, str], model_dir: Path, log: Path, port: int, what: str,
    timeout_s: float,
) -> Iterator[Server]:
    """Run ``cmd`` (a server on ``port``) with its output in ``log``, healthy until exit."""
    with log.open("w") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", MODEL_NAME, model_dir, log, proc.pid)
    try:
        if not wait_healthy(server.base_url, proc, timeout_s):
            state = f"exited with {proc.returncode}" if proc.poll() is not None else "not healthy"
            raise RuntimeError(f"{what} {state} after up to {timeout_s}s:\n{_tail(log)}")
        yield server
    finally:
        stop_process(proc, timeout_s=60)


def stop_process(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """Terminate ``proc``, killing it if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
