"""One real server on the demo model for the whole e2e session (V1 runner, CPU)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from .server import Server, running_server


@pytest.fixture(scope="session")
def server(demo_model_dir, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    with running_server(demo_model_dir, log, ["--enable-prefix-caching"]) as s:
        yield s


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
