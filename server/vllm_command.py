"""What the launcher runs: settings -> one ``vllm serve`` command and its environment.

Pure functions of the settings (plus two facts of this machine: the model
runner and whether the engine is on CPU), split from the supervision so the
command is tested without starting anything. The model is resolved here too:
a named model is built by the training kit in a child process
(``python -m refusal_training.build``), so serving imports none of the kit.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from refusal_plugins.vocab import MANIFEST_FILE, RefusalManifest

from .settings import BUILT_MODELS, GatewaySettings

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


def declared_dtype(model_dir: Path) -> str | None:
    """The dtype the model's manifest asks for (``RefusalManifest.dtype``), if any.

    So a kit-built model served by its directory (``serve --model DIR``, e.g. a
    ``build-model --artefact`` head) gets the precision its figures were measured
    in, as the named models do, without the user knowing to pass ``--dtype``.
    """
    if not (model_dir / MANIFEST_FILE).is_file():
        return None
    return RefusalManifest.load(model_dir).dtype


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
    given = {a.split("=")[0] for a in vllm_args}  # the user's flags, "--flag=value" too
    dtype = settings.dtype or declared_dtype(model_dir)
    if dtype is None and settings.model in BUILT_MODELS:
        dtype = "float32"  # named models built before their manifests declared it
    if dtype and "--dtype" not in given:
        cmd += ["--dtype", dtype]
    if "--shutdown-timeout" not in given:
        # On SIGTERM vLLM's engine then admits nothing new and finishes what it
        # has for up to this long ("drain") instead of aborting it at once.
        cmd += ["--shutdown-timeout", str(max(0, round(settings.shutdown_grace_s)))]
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
