"""The peer: the LiteLLM proxy, in a venv of its own, in front of the same plain vLLM.

LiteLLM is pinned by version *and* hash (:data:`LITELLM_REQUIREMENT`), and the
venv (``.venv-bench`` by default, never the project's ``.venv``) is checked for
the start-up hooks the compromised releases planted before it is used.

Why this version: two LiteLLM supply-chain compromises are on record — 1.82.7
and 1.82.8 (24 March 2026, PYSEC-2026-2: a ``litellm_init.pth`` credential
stealer) and 1.107.0 (October 2026: every wheel dropped ``cook.pth`` and
``sitecustomize.py``). PyPI has removed all three. 1.105.1 (14 October 2026)
predates the second incident and is the version a Homebrew formula kept,
pinned by hash, through it; its wheel's sha256 is the one PyPI lists for it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LITELLM_VERSION = "1.105.1"
#: Both files PyPI lists for the release (manylinux wheel, sdist), by sha256.
LITELLM_HASHES = (
    "f3d743c2d274c6537f7341213607c927c486676012a9d94412a8a8ccbe2f51f1",
    "f1a274db0b2bcc78c34ed34c06df2c1dcd0dc038469193684927f6bb2cab2d97",
)
LITELLM_REQUIREMENT = f"litellm=={LITELLM_VERSION} " + " ".join(f"--hash=sha256:{h}" for h in LITELLM_HASHES)
#: Start-up hooks of the known compromised releases; none may exist in the venv.
PLANTED = ("litellm_init.pth", "cook.pth", "sitecustomize.py")
HOOK_DIR = Path(__file__).parent / "litellm_hook"
DEFAULT_VENV = Path(".venv-bench")


class PeerUnavailable(RuntimeError):
    pass


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path = DEFAULT_VENV, install: bool = True) -> Path:
    """The LiteLLM venv's python, creating and installing it on first use."""
    python = venv_python(venv)
    if not python.exists():
        if not install:
            raise PeerUnavailable(f"{venv} does not exist (run `make bench-venv`)")
        subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True)
        (venv / ".gitignore").write_text("*\n")
    if installed_version(python) != LITELLM_VERSION:
        if not install:
            raise PeerUnavailable(f"litellm {LITELLM_VERSION} is not installed in {venv}")
        req = venv / "litellm-requirement.txt"
        req.write_text(LITELLM_REQUIREMENT + "\n")
        pip = [str(python), "-m", "pip", "install", "-q"]
        try:
            subprocess.run([*pip, "--upgrade", "pip"], check=True)
            # The release itself by hash; then its proxy dependencies, resolved normally.
            subprocess.run([*pip, "--no-deps", "--require-hashes", "-r", str(req)], check=True)
            subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
        except subprocess.CalledProcessError as exc:
            raise PeerUnavailable(f"installing litellm {LITELLM_VERSION} failed: {exc}") from exc
    check_clean(venv)
    return python


def _base_python() -> str:
    """The interpreter the project's venv was made from (a venv of a venv would chain them)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base if base.exists() else sys.executable)


def installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 else None


def check_clean(venv: Path) -> None:
    found = [str(p) for name in PLANTED for p in venv.rglob(name)]
    if found:
        raise PeerUnavailable(f"refusing to run LiteLLM: compromise markers in {venv}: {found}")


def write_config(directory: Path, upstream: str, served: str) -> Path:
    config = directory / "litellm.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model_list": [{
            "model_name": served,
            "litellm_params": {"model": f"hosted_vllm/{served}", "api_base": upstream + "/v1",
                               "api_key": "none"},
        }],
        "litellm_settings": {"callbacks": "refusal_hook.handler", "drop_params": False,
                             "telemetry": False, "request_timeout": 600},
        "general_settings": {"disable_spend_logs": True},
    }, indent=1))  # fmt: skip
    return config


def hook_env(model_dir: str, policy_profiles: dict) -> dict[str, str]:
    """What the hook reads: the model's control tokens and categories, the policy's profiles."""
    manifest = json.loads((Path(model_dir) / "refusal_manifest.json").read_text())
    tokens = [t["text"] for t in manifest["tokens"]]
    categories = [t["key"] for t in manifest["tokens"] if t.get("category")]
    return {
        "BENCH_CONTROL_TOKENS": json.dumps(tokens),
        "BENCH_CATEGORIES": json.dumps(categories),
        "BENCH_PROFILES": json.dumps(policy_profiles),
    }
