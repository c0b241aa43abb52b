"""One real server on the demo model for the whole e2e session (V1 runner, CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from .plain import running_plain_vllm
from .server import Server, running_server

#: Profiles of the session server's policy file. ``answer`` pins the refusal
#: decision to ``respond`` (the ported vLLM API tests need the model's plain
#: answer, not a refusal of a harmless prompt) and allows vLLM's assistant
#: prefill and custom roles, as plain vLLM does; ``prefill`` allows it alone, ``locked`` rejects
#: system messages and raw prompts (request rules, test_hostile.py). No
#: ``default_profile``: the other tests rely on requests without a profile
#: getting none, and the server-wide request rules are the defaults.
SESSION_POLICY = """\
profiles:
  answer:
    refusal_bias: {refuse: -100.0}
    request_rules: {assistant_prefill: allow, custom_roles: allow}
  prefill:
    request_rules: {assistant_prefill: allow}
  locked:
    request_rules: {system_messages: reject, raw_prompts: reject}
"""


def write_session_policy(directory: Path) -> Path:
    path = directory / "policy.yaml"
    path.write_text(SESSION_POLICY)
    return path


@pytest.fixture(scope="session")
def server(demo_model_dir, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    policy = write_session_policy(tmp)
    args = ["--enable-prefix-caching", "--policy-file", str(policy)]
    with running_server(demo_model_dir, tmp / "vllm.log", args) as s:
        yield s


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def plain_server(demo_model_dir, tmp_path_factory) -> Iterator[Server]:
    """Plain vLLM (no layer, no processor) on the demo model, for side-by-side checks.

    It lives until the session ends; ``vllm_api/`` starts its own plain server
    (``target[plain]``), stopped as soon as its plain cases are done.
    """
    log = tmp_path_factory.mktemp("plain") / "vllm.log"
    with running_plain_vllm(demo_model_dir, log) as s:
        yield s
