"""Start plain vLLM (no refusal layer, no processor) on the demo model, for comparison.

The same model, dtype and limits as the stack's session server (server.py), so a
test that runs against both sees the same engine; only the layer differs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from refusal_gateway.launcher import wait_healthy

from .server import MODEL_NAME, Server, _tail, free_port, stop_process


def plain_command(model_dir: Path, port: int, args: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--enforce-eager", "--max-model-len", "512", *args,
    ]  # fmt: skip


def plain_env(env: dict[str, str] | None = None) -> dict[str, str]:
    cores = os.cpu_count() or 1
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{min(cores, 2) - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        **(env or {}),
    }


@contextmanager
def running_plain_vllm(
    model_dir: Path,
    log: Path,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
) -> Iterator[Server]:
    """``python -m vllm.entrypoints.openai.api_server`` on ``model_dir``, stopped on exit."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            plain_command(model_dir, port, args), stdout=out, stderr=subprocess.STDOUT,
            env=plain_env(env),
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", MODEL_NAME, model_dir, log, proc.pid)
    try:
        if not wait_healthy(server.base_url, proc, timeout_s):
            state = f"exited with {proc.returncode}" if proc.poll() is not None else "not healthy"
            raise RuntimeError(f"plain vLLM {state} after up to {timeout_s}s:\n{_tail(log)}")
        yield server
    finally:
        stop_process(proc, timeout_s=60)
