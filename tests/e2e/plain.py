"""Start plain vLLM (no refusal layer, no processor) on the demo model, for comparison.

The same model, dtype and limits as the stack's session server (server.py), so a
test that runs against both sees the same engine; only the layer differs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .server import MODEL_NAME, Server, free_port, serving


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
    command = plain_command(model_dir, port, args)
    with serving(command, plain_env(env), model_dir, log, port, "plain vLLM", timeout_s) as server:
        yield server
