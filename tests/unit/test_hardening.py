"""The layer's defences in-process: routes, field decisions, limits, engine death.

The e2e twin (tests/e2e/test_hostile.py) sends the same kinds of requests to a
real server; these pin the logic fast and without a model.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client import CollectorRegistry
from refusal_gateway.fields import DECIDED, OWN, field_rules
from refusal_gateway.middleware import Gateway, RefusalGatewayMiddleware
from refusal_gateway.policy import Policy, PolicyFile
from refusal_gateway.routes import CLOSED, LAYER_PATHS, OPEN_PATHS, decide, route_report
from refusal_gateway.settings import GatewaySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .helpers import categorical_manifest
from .test_middleware import MODEL, build
from .test_policy import POLICY

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_every_field_of_vllms_request_models_was_decided(kind):
    """A vLLM upgrade that adds a request field fails here until someone decides about it."""
    undecided = set(field_rules(kind)) - DECIDED
    assert not undecided, f"decide about these {kind} fields in refusal_gateway.fields: {undecided}"
    assert not OWN & set(field_rules(kind))


def test_route_decisions_are_disjoint_and_reported():
    assert not (LAYER_PATHS & OPEN_PATHS) and not (set(CLOSED) & (LAYER_PATHS | OPEN_PATHS))
    assert decide("/v1/responses") == decide("/anything/new") == "closed"
    app = Starlette(routes=[Route(p, lambda r: None) for p in
                            ("/v1/completions", "/health", "/v1/responses", "/v1/brand_new")])
    assert route_report(app) == {"layer": ["/v1/completions"], "open": ["/health"],
                                 "closed": ["/v1/brand_new", "/v1/responses"],
                                 "undecided": ["/v1/brand_new"]}


async def test_closed_routes_get_a_404_that_says_why_and_count():
    _, http, fake, registry = build("[respond] hi")
    for path in ("/v1/responses", "/v1/messages", "/inference/v1/generate", "/new/route"):
        response = await http.post(path, json=CHAT | {"input": "x"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "route_not_served"
    assert fake.bodies == []
    assert registry.get_sample_value(
        "refusal_gateway_rejected_requests_total", {"model": MODEL, "reason": "route"}) == 4


async def test_invocations_apply_the_policy_like_chat():
    _, http, fake, _ = build("[Requests with safety concerns] No.",
                             policy=Policy(PolicyFile.model_validate(POLICY)))
    key_a = {"Authorization": "Bearer key-a"}
    loose = CHAT | {"vllm_xargs": {"refusal_bias.safety": -100}}
    assert (await http.post("/invocations", json=loose, headers=key_a)).status_code == 403
    engine_only = CHAT | {"vllm_xargs": {"refusal_report_to": "@x", "refusal_report_id": "1"}}
    assert (await http.post("/invocations", json=engine_only, headers=key_a)).status_code == 400
    assert fake.bodies == []
    latin1 = {"Authorization": "Bearer caf\xe9".encode("latin-1")}
    assert (await http.post("/invocations", json=CHAT, headers=latin1)).status_code == 401


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 4.0}, "n"), ({"n": "2"}, "n"), ({"n": 0}, "n"), ({"max_tokens": 1.0}, "max_tokens"),
     ({"stream": "true"}, "stream"), ({"temperature": "hot"}, "temperature"),
     ({"bogus": 1}, "bogus"), ({"chat_template": "{{x}}"}, "chat_template"),
     ({"use_beam_search": True}, "use_beam_search"), ({"refusal_profile": ""}, "refusal_profile"),
     ({"logit_bias": {"104": 5}}, "logit_bias"), ({"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
     ({"logprob_token_ids": [100]}, "logprob_token_ids"),
     ({"response_format": {"type": "json_object"}, "refusal_bias": {"safety": 1}}, "response_format")],
)
async def test_fields_are_strict_and_decided(extra, param):
    _, http, fake, _ = build("[respond] hi")
    response = await http.post("/v1/chat/completions", json=CHAT | extra)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert fake.bodies == []


async def test_harmless_use_of_the_same_fields_passes():
    _, http, fake, _ = build("[respond] hi")
    ok = CHAT | {"n": 1, "use_beam_search": False, "allowed_token_ids": list(range(100, 106)),
                 "response_format": {"type": "json_object"}, "logit_bias": {"7": 1}}
    assert (await http.post("/v1/chat/completions", json=ok)).status_code == 200
    assert fake.bodies[-1]["allowed_token_ids"] == list(range(100, 106))


@pytest.mark.parametrize(
    "prompt", [[3, 300, 104.0], [3, 300, "104"], [3, True], [[3], "x"], {"a": 1}, [3, -1]])
async def test_completion_prompts_take_only_strict_shapes(prompt):
    _, http, fake, _ = build("[respond] hi")
    response = await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert fake.bodies == []


async def test_body_limits_request_ids_and_deep_json():
    _, http, fake, _ = build("[respond] hi")
    huge = CHAT | {"user": "x" * (16 * 1024 * 1024)}
    assert (await http.post("/v1/chat/completions", json=huge)).status_code == 413
    deep = b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert (await http.post("/v1/chat/completions", content=deep)).status_code == 400
    nested = CHAT | {"tools": json.loads("[" * 80 + "]" * 80)}
    assert (await http.post("/v1/chat/completions", json=nested)).status_code == 400
    for bad in ("x" * 300, "a b", "caf\xe9".encode("latin-1")):
        response = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": bad})
        assert response.json()["error"]["param"] == "X-Request-Id"
    assert fake.bodies == []


def _gateway(app, **settings) -> httpx.AsyncClient:
    config = GatewaySettings(model="unused", served_model_name=MODEL, decision_report_wait_s=0.01,
                             **settings)
    gateway = Gateway(config, categorical_manifest(), registry=CollectorRegistry())
    layered = RefusalGatewayMiddleware(app, gateway=gateway)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=layered), base_url="http://test")


async def test_beyond_the_inflight_bound_requests_get_503_with_retry_after():
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: Request):
        await request.body()
        entered.set()
        await release.wait()
        return JSONResponse({"choices": [{"index": 0, "message": {"content": "[respond] ok"}}]})

    http = _gateway(Starlette(routes=[Route("/v1/chat/completions", slow, methods=["POST"])]),
                    max_inflight_requests=1, retry_after_s=7)
    first = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))
    await entered.wait()
    busy = await http.post("/v1/chat/completions", json=CHAT)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "7"
    assert busy.json()["error"]["code"] == "server_overloaded"
    release.set()
    assert (await first).status_code == 200
    assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_an_engine_that_dies_under_a_request_gives_503_not_500():
    async def dead(request: Request):
        await request.body()
        message = "EngineCore encountered an issue. See stack trace (above) for the root cause."
        return JSONResponse({"error": {"message": message, "type": "InternalServerError",
                                       "code": 500}}, status_code=500)

    async def other(request: Request):
        await request.body()
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)

    app = Starlette(routes=[Route("/v1/chat/completions", dead, methods=["POST"]),
                            Route("/v1/completions", other, methods=["POST"])])
    http = _gateway(app, retry_after_s=3)
    response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and response.headers["retry-after"] == "3"
    assert response.json()["error"]["code"] == "engine_unavailable"
    other_500 = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert other_500.status_code == 500  # another 500 stays one, in OpenAI's shape
    assert other_500.json() == {"error": {"message": "boom", "type": "server_error", "param": None,
                                          "code": None}}  # fmt: skip


async def test_vllms_own_errors_get_openais_values():
    """vLLM answers a validation error with ``"type": "Bad Request", "code": 400`` and
    ``"param": "body.stop"``; a client sees OpenAI's values whoever answered."""
    vllm_400 = {"error": {"message": "List should have at most 4 items", "type": "Bad Request",
                          "param": "body.stop", "code": 400}}  # fmt: skip

    async def validation(request: Request):
        await request.body()
        return JSONResponse(vllm_400, status_code=400)

    async def not_found(request: Request):
        await request.body()
        return JSONResponse({"error": {"message": "no such model", "type": "NotFoundError",
                                       "param": "model", "code": "model_not_found"}}, 404)  # fmt: skip

    app = Starlette(routes=[Route("/v1/chat/completions", validation, methods=["POST"]),
                            Route("/v1/completions", not_found, methods=["POST"])])
    http = _gateway(app)
    response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": "List should have at most 4 items",
                                         "type": "invalid_request_error", "param": "stop", "code": None}}
    assert int(response.headers["content-length"]) == len(response.content)
    missing = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert missing.status_code == 404 and missing.json()["error"] == {
        "message": "no such model", "type": "not_found_error", "param": "model", "code": "model_not_found"}


async def test_while_the_launcher_drains_new_requests_get_503(tmp_path, monkeypatch):
    drain = tmp_path / "draining"
    monkeypatch.setenv("REFUSAL_GATEWAY_DRAIN_FILE", str(drain))
    _, http, fake, _ = build("[respond] hi")
    assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    drain.touch()
    for path in ("/v1/chat/completions", "/invocations"):
        response = await http.post(path, json=CHAT)
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["error"]["code"] == "shutting_down"
    assert (await http.get("/health")).status_code == 503
    assert len(fake.bodies) == 1


@pytest.mark.parametrize("field", ["top_k", "max_tokens", "temperature", "n"])
async def test_integers_beyond_64_bits_are_a_400(field):
    _, http, fake, _ = build("[respond] hi")
    response = await http.post("/v1/chat/completions", content=json.dumps(CHAT)[:-1]
                               + f', "{field}": 1' + "0" * 400 + "}")
    assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert fake.bodies == []


async def test_a_number_vllm_bounds_itself_gets_vllms_own_400():
    """``seed`` has ge/le in vLLM's model: its 400 names the bound, so the layer lets it through."""
    _, http, fake, _ = build("[respond] hi")
    await http.post("/v1/chat/completions", json=CHAT | {"seed": 2**64})
    assert fake.bodies[-1]["seed"] == 2**64
