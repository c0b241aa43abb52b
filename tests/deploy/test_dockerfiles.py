"""Static checks of the two Dockerfiles (no Docker engine here to build them).

They pin what matters for a reproducible, safe image: an exact base tag (the
GPU image's vLLM matching the vllm-cpu pin the project is tested with), the
project installed with or without the `cpu` extra, a non-root user, a
healthcheck and the launcher as entrypoint.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from . import observability as obs

GPU = obs.ROOT / "Dockerfile"
CPU = obs.DEPLOY / "Dockerfile.cpu"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _args(path: Path, instruction: str) -> list[str]:
    return [rest for word, rest in _instructions(path) if word == instruction]


def _vllm_cpu_version() -> str:
    project = tomllib.loads((obs.ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (pin,) = [d for d in project["project"]["optional-dependencies"]["cpu"] if d.startswith("vllm")]
    return pin.partition("==")[2]


def test_gpu_image_is_vllms_official_image_at_the_tested_version() -> None:
    (arg,) = [a for a in _args(GPU, "ARG") if a.startswith("VLLM_IMAGE=")]
    image = arg.partition("=")[2]
    match = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", image)
    assert match, f"{image} is not an exact vllm/vllm-openai tag"
    assert match.group(1) == _vllm_cpu_version(), "bump the GPU image with the vllm-cpu pin"
    assert _args(GPU, "FROM") == ["${VLLM_IMAGE}"]


def test_cpu_image_base_is_pinned() -> None:
    base, *stages = _args(CPU, "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)? AS base", base), base
    assert all(s.startswith("base") for s in stages), stages


def test_gpu_image_installs_the_project_without_the_cpu_extra() -> None:
    runs = " ".join(_args(GPU, "RUN"))
    assert re.search(r"pip install --no-cache-dir --no-deps \.(\s|$)", runs)
    assert "['project']['dependencies']" in runs
    assert "[cpu]" not in runs and "optional-dependencies" not in runs


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (split at FROM)."""
    stages: list[list[tuple[str, str]]] = []
    for word, rest in _instructions(path):
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, rest))
    return stages


@pytest.mark.parametrize("path", [GPU, CPU], ids=["gpu", "cpu"])
def test_dependencies_are_installed_before_the_sources_are_copied(path: Path) -> None:
    """A code edit must not invalidate the layer with vLLM/torch (~1 GB for the CPU image)."""
    instructions = _instructions(path)
    copies = [i for i, (w, _) in enumerate(instructions) if w == "COPY"]
    (deps,) = [i for i, (w, r) in enumerate(instructions) if w == "RUN" and "-r /tmp/requirements.txt" in r]
    assert [instructions[i][1] for i in copies if i < deps] == ["pyproject.toml ./"]
    sources = [i for i in copies if re.search(r"\b(server|plugins)\b", instructions[i][1])]
    assert sources and min(sources) > deps


def test_cpu_image_builds_the_demo_from_the_training_kit_only() -> None:
    """Editing the gateway (middleware, metrics, ...) must not retrain the demo model."""
    base, demo, final = _stages(CPU)
    assert base[0][1].endswith(" AS base") and demo[0][1] == "base AS demo" and final[0][1] == "base"
    runs = " ".join(r for w, r in base if w == "RUN")
    assert "['optional-dependencies']['cpu']" in runs
    assert "pip uninstall -y torchvision torchaudio torchcodec" in runs
    demo_copies = [r for w, r in demo if w == "COPY"]
    assert not [c for c in demo_copies if c.startswith("server ") or "middleware" in c]
    assert any("training/refusal_training" in c for c in demo_copies)
    assert "build_demo_model" in " ".join(r for w, r in demo if w == "RUN")
    final_runs = " ".join(r for w, r in final if w == "RUN")
    assert "pip install --no-cache-dir --no-deps ." in final_runs
    assert any(r.startswith("--from=demo") for w, r in final if w == "COPY")
    env = " ".join(_args(CPU, "ENV"))
    assert "VLLM_CPU_KVCACHE_SPACE=1" in env
    assert "REFUSAL_GATEWAY_CACHE_DIR=" in env
    assert "REFUSAL_GATEWAY_MODEL=demo" in env


@pytest.mark.parametrize("path", [GPU, CPU], ids=["gpu", "cpu"])
def test_image_runs_the_launcher_as_a_non_root_user(path: Path) -> None:
    users = _args(path, "USER")
    assert users and users[-1] not in ("root", "0"), "the last USER must not be root"
    (entrypoint,) = _args(path, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["refusal-gateway", "serve"]
    assert "REFUSAL_GATEWAY_HOST=0.0.0.0" in " ".join(_args(path, "ENV"))
    (healthcheck,) = _args(path, "HEALTHCHECK")
    assert "/health" in healthcheck


@pytest.mark.parametrize("path", [GPU, CPU], ids=["gpu", "cpu"])
def test_copied_sources_exist(path: Path) -> None:
    """A COPY of a missing file fails the build; catch it without an engine."""
    for copy in _args(path, "COPY"):
        if "--from=" in copy:  # from another build stage, not the context
            continue
        *sources, _dest = [a for a in copy.split() if not a.startswith("--")]
        for source in sources:
            assert (obs.ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"


def test_gpu_image_takes_the_model_from_a_volume() -> None:
    env = " ".join(_args(GPU, "ENV"))
    assert "REFUSAL_GATEWAY_MODEL=/models/model" in env
    assert _args(GPU, "VOLUME") == ['["/models"]']
