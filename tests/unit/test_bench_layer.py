"""``python -m bench layer`` runs the real layer in front of a stand-in engine, and checks its work."""

from __future__ import annotations

import asyncio
import json

import pytest
from refusal_gateway.middleware import Gateway, RefusalGatewayMiddleware
from refusal_gateway.settings import GatewaySettings
from refusal_plugins.vocab import RefusalManifest

from bench import layer_cpu


def test_every_case_is_measured_and_reported(demo_model_dir):
    report = layer_cpu.measure(demo_model_dir, tokens=4, requests=8, rounds=1, concurrency=4,
                               prompt_words=(50,), n_values=(2,))  # fmt: skip
    names = {c.name for c in layer_cpu.cases((50,), (2,))}
    assert set(report["cases"]) == names
    for row in report["cases"].values():
        assert row["median_us"] > 0 and len(row["rounds_us"]) == 1
        assert row["plain"] in report["cases"]
    md = layer_cpu.markdown(report)
    assert md.count("\n| ") == len(names) + 1  # header + one row per case


def _layered(model_dir, tokens: int):
    """The real middleware in front of the stand-in engine, as the benchmark builds it."""
    from prometheus_client import CollectorRegistry

    manifest = RefusalManifest.load(model_dir)
    gateway = Gateway(GatewaySettings(model=str(model_dir)), manifest,
                      model_dir=model_dir, registry=CollectorRegistry())  # fmt: skip
    engine = layer_cpu.StandInEngine(layer_cpu.control_texts(manifest), tokens=tokens, width=len(manifest.tokens))
    return manifest, gateway, engine, RefusalGatewayMiddleware(engine, gateway=gateway)


def test_the_stand_in_behind_the_layer_gets_a_decided_answer(demo_model_dir):
    """What is measured is the layer's real work: the report read, the token hidden."""
    manifest, gateway, engine, layered = _layered(demo_model_dir, tokens=5)
    case = layer_cpu.Case("x", stream=False, fields=layer_cpu.FIELDS)
    body = layer_cpu._body(case, gateway.model_name, 5)
    answer = json.loads(asyncio.run(layer_cpu._one(layered, body)))
    choice = answer["choices"][0]
    assert choice["refusal_decision"]["token"] == manifest.tokens[0].text
    # The stand-in sent the engine's report: the decision carries the model's probabilities.
    assert choice["refusal_decision"]["probabilities"][manifest.tokens[0].key] == pytest.approx(0.9)
    assert manifest.tokens[0].text not in choice["message"]["content"]
    plain = json.loads(asyncio.run(layer_cpu._one(engine, body)))
    assert "refusal_decision" not in plain["choices"][0]


def test_a_refused_case_is_refused_and_its_text_moves_to_refusal(demo_model_dir):
    manifest, _, _, layered = _layered(demo_model_dir, tokens=4)
    case = layer_cpu.Case("r", stream=False, refused=True)
    message = json.loads(asyncio.run(layer_cpu._one(layered, layer_cpu._body(case, "m", 4))))
    choice = message["choices"][0]
    assert choice["refusal_decision"]["refused"] is True
    assert choice["message"]["content"] is None and choice["message"]["refusal"]


def test_a_layer_that_did_not_decide_fails_the_check(demo_model_dir):
    manifest = RefusalManifest.load(demo_model_dir)
    engine = layer_cpu.StandInEngine(layer_cpu.control_texts(manifest), tokens=3, width=len(manifest.tokens))
    case = layer_cpu.Case("layer, but the layer is missing", stream=True)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="0 decisions"):
            layer_cpu.check_work(loop, {True: engine, False: engine},
                                 {case.name: layer_cpu._body(case, "m", 3)}, [case], ("x",))  # fmt: skip
    finally:
        loop.close()
