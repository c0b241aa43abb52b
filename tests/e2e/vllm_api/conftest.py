"""vLLM's own OpenAI API tests, run against a URL: plain vLLM and the stack, side by side.

Every case takes a :class:`Target` (a base URL, the served model name, HTTP
clients) and is collected twice: ``[plain]`` against plain vLLM on the demo model
(``python -m vllm.entrypoints.openai.api_server``, started here for the plain
cases only, then stopped) and ``[stack]`` against the session server of
``tests/e2e/conftest.py`` (``refusal-gateway serve``).

Refusal semantics are pinned by profile: every JSON POST body the stack's
clients send carries ``"refusal_profile": "answer"`` (``refusal_bias.refuse =
-100``, always respond), so a ported case sees the model's plain answer, never a
refusal of a harmless prompt moved to ``message.refusal``.

Acceptance rule: the stack passes every case plain vLLM passes. At the end of the
run a table lists each case on both; a case plain passes and the stack does not
is listed as a violation. Cases plain vLLM itself fails on this CPU build are
``xfail(strict=False)`` on both, with the reason.

``VLLM_API_PLAIN_URL`` points the plain cases at an already running plain vLLM
(a development shortcut); ``VLLM_API_RESULTS`` names a JSON file for the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from ..plain import running_plain_vllm
from ..server import MODEL_NAME, Server

PROFILE = "answer"
TARGETS = ("plain", "stack")


def _with_profile(request: httpx.Request) -> httpx.Request:
    """``request`` with ``refusal_profile`` added to a JSON object body (POST only)."""
    if request.method != "POST" or "json" not in request.headers.get("content-type", ""):
        return request
    try:
        body = json.loads(request.read() or b"null")
    except ValueError:
        return request  # not JSON: sent as is (a validation case)
    if not isinstance(body, dict) or "refusal_profile" in body:
        return request
    body["refusal_profile"] = PROFILE
    headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"]
    return httpx.Request(
        request.method, request.url, headers=headers, content=json.dumps(body).encode(),
        extensions=request.extensions,
    )  # fmt: skip


class ProfileTransport(httpx.BaseTransport):
    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._inner.handle_request(_with_profile(request))

    def close(self) -> None:
        self._inner.close()


class AsyncProfileTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(_with_profile(request))

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Target:
    """One server under test, reachable only by URL."""

    name: str  # "plain" or "stack"
    base_url: str  # http://host:port
    model: str
    model_dir: Path  # for the tokenizer only
    pin_profile: bool
    _closers: list = field(default_factory=list)

    def url_for(self, *parts: str) -> str:
        return "/".join([self.base_url, *parts])

    def http(self, timeout: float = 120) -> httpx.Client:
        """A raw HTTP client (profile pinned on the stack)."""
        transport = ProfileTransport() if self.pin_profile else httpx.HTTPTransport()
        client = httpx.Client(transport=transport, timeout=timeout)
        self._closers.append(client.close)
        return client

    def client(self, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url_for("v1"), api_key="unused", max_retries=0,
            http_client=self.http(timeout),
        )  # fmt: skip

    def async_client(self, timeout: float = 120) -> openai.AsyncOpenAI:
        transport = AsyncProfileTransport() if self.pin_profile else httpx.AsyncHTTPTransport()
        return openai.AsyncOpenAI(
            base_url=self.url_for("v1"), api_key="unused", max_retries=0,
            http_client=httpx.AsyncClient(transport=transport, timeout=timeout),
        )  # fmt: skip

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()


def _target(name: str, server: Server) -> Target:
    return Target(
        name, server.base_url, server.model, server.model_dir, pin_profile=name == "stack"
    )


@pytest.fixture(scope="session", params=TARGETS)
def target(request, demo_model_dir, tmp_path_factory) -> Iterator[Target]:
    """Plain vLLM (started for the plain cases, stopped after them) or the stack."""
    if request.param == "plain" and os.environ.get("VLLM_API_PLAIN_URL"):
        # development shortcut: an already running plain vLLM on the demo model
        t = Target("plain", os.environ["VLLM_API_PLAIN_URL"].rstrip("/"), MODEL_NAME,
                   demo_model_dir, pin_profile=False)  # fmt: skip
        yield t
        t.close()
    elif request.param == "plain":
        log = tmp_path_factory.mktemp("plain") / "vllm.log"
        with running_plain_vllm(demo_model_dir, log) as server:
            t = _target("plain", server)
            yield t
            t.close()
    else:
        t = _target("stack", request.getfixturevalue("server"))
        yield t
        t.close()


@pytest.fixture(scope="session")
def tokenizer(demo_model_dir):
    """The demo model's tokenizer (what upstream gets from ``get_tokenizer(MODEL_NAME)``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_model_dir))


@pytest.fixture
def client(target: Target) -> Iterator[openai.OpenAI]:
    c = target.client()
    yield c
    c.close()


# ---------------------------------------------------------------------------
# The plain-vs-stack table.

_RESULTS: dict[str, dict[str, str]] = {}
_KEY = "vllm_api_case"


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("target") if callspec else None
        if name not in TARGETS or "vllm_api" not in item.nodeid:
            continue
        parts = callspec.id.split("-")
        parts.remove(name)
        case = f"{item.path.stem}::{item.originalname}" + (f"[{'-'.join(parts)}]" if parts else "")
        item.user_properties.append((_KEY, (case, name)))


def _outcome(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xpass" if report.passed else "xfail"
    if report.when != "call" and report.passed:
        return ""
    if report.failed:
        return "FAIL" if report.when == "call" else "ERROR"
    return report.outcome  # passed / skipped


def pytest_runtest_logreport(report):
    props = dict(report.user_properties)
    if _KEY not in props:
        return
    case, name = props[_KEY]
    outcome = _outcome(report)
    if outcome:
        row = _RESULTS.setdefault(case, {})
        if row.get(name) in (None, "passed", "xfail", "xpass"):
            row[name] = outcome  # a teardown error overrides a pass


def acceptance_violations(results: dict[str, dict[str, str]]) -> list[str]:
    """Cases plain vLLM passes and the stack does not (it must pass them all).

    A case the run left out on the stack (``-k plain``) is not counted.
    """
    return sorted(
        case for case, row in results.items()
        if row.get("plain") in ("passed", "xpass") and row.get("stack") not in (None, "passed", "xpass")
    )  # fmt: skip


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("vLLM API tests: plain vLLM vs the stack")
    width = max(len(c) for c in _RESULTS)
    tr.write_line(f"{'case':<{width}}  {'plain':<8} {'stack':<8}")
    for case in sorted(_RESULTS):
        row = _RESULTS[case]
        tr.write_line(f"{case:<{width}}  {row.get('plain', '-'):<8} {row.get('stack', '-'):<8}")
    plain_ok = sum(r.get("plain") == "passed" for r in _RESULTS.values())
    stack_ok = sum(r.get("stack") == "passed" for r in _RESULTS.values())
    tr.write_line(
        f"{len(_RESULTS)} cases: plain vLLM passes {plain_ok}, the stack passes {stack_ok}"
    )
    bad = acceptance_violations(_RESULTS)
    if bad:
        tr.write_line(
            f"ACCEPTANCE: {len(bad)} case(s) pass on plain vLLM but not on the stack:", red=True
        )
        for case in bad:
            tr.write_line(f"  {case}: stack {_RESULTS[case]['stack']}", red=True)
    elif any("plain" in r and "stack" in r for r in _RESULTS.values()):
        tr.write_line("ACCEPTANCE: the stack passes every case plain vLLM passes", green=True)
    out = os.environ.get("VLLM_API_RESULTS")
    if out:
        Path(out).write_text(json.dumps({"cases": _RESULTS, "violations": bad}, indent=1))
