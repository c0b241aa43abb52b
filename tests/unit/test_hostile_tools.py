"""The hostile-input tools aim at the model the server serves, and fail when nothing reached it.

A fuzz or soak run whose requests name a model the server does not serve gets
vLLM's 404 for every request meant for the engine, and would pass as "no 5xx":
a run against ``make serve`` (the default model, served as ``refusal-smollm2``)
did exactly that before the tools read the served name from ``/v1/models``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.hostile import client, soak
from tests.hostile.client import Outcome, Tally
from tests.hostile.schema import CHAT_PATH, COMPLETIONS_PATH, fuzz_openapi


def _vllm_like_doc() -> dict:
    """The parts of vLLM's OpenAPI document that :func:`fuzz_openapi` rewrites."""
    request = {"properties": {"model": {"type": "string"}, "temperature": {"type": "number"}}}
    post = {"post": {"requestBody": {}, "responses": {}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "vLLM", "version": "0"},
        "paths": {CHAT_PATH: post, COMPLETIONS_PATH: json.loads(json.dumps(post)), "/health": {}},
        "components": {"schemas": {"ChatCompletionRequest": request, "CompletionRequest": request}},
    }


def test_generated_requests_name_the_given_model() -> None:
    doc = fuzz_openapi(_vllm_like_doc(), "refusal-smollm2")
    for name in ("FuzzChatCompletionRequest", "FuzzCompletionRequest"):
        assert doc["components"]["schemas"][name]["properties"]["model"] == {"const": "refusal-smollm2"}
    assert set(doc["paths"]) == {CHAT_PATH, COMPLETIONS_PATH}


def test_every_soak_request_names_the_given_model() -> None:
    jobs = soak.plan(400, seed=3, model="served-elsewhere")
    named = [re.findall(rb'"model": "([^"]*)"', content) for _, content, *_ in jobs]
    assert sum(bool(n) for n in named) > 300  # all but the raw hostile bodies name one
    assert {m for n in named for m in n} == {b"served-elsewhere"}


def test_a_run_in_which_nothing_was_answered_fails() -> None:
    tally = Tally()
    for _ in range(5):
        tally.add(CHAT_PATH, b"{}", Outcome("4xx", 404))
    assert tally.failed(restarts=0) == 1
    assert "nothing reached the engine" in tally.report(0, "fuzz")
    tally.add(CHAT_PATH, b"{}", Outcome("ok", 200))
    assert tally.failed(restarts=0) == 0
    tally.add(CHAT_PATH, b"{}", Outcome("5xx", 500))
    assert tally.failed(restarts=2) == 3


class _Models(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def models_server() -> Iterator[tuple[str, type[_Models]]]:
    handler = type("Handler", (_Models,), {})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_served_model_is_read_from_the_server(models_server) -> None:
    url, handler = models_server
    handler.body = json.dumps({"object": "list", "data": [{"id": "refusal-smollm2"}]}).encode()
    assert client.served_model(url + "/") == "refusal-smollm2"


def test_a_server_listing_no_model_is_an_error(models_server) -> None:
    url, handler = models_server
    handler.body = json.dumps({"object": "list", "data": []}).encode()
    with pytest.raises(RuntimeError, match="lists no model"):
        client.served_model(url)
