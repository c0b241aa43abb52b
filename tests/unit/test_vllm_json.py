"""vLLM's response JSON through the fast codec: the same documents out, the odd ones too."""

from __future__ import annotations

import json
import math

import pytest
from refusal_gateway.vllm_json import decode


@pytest.mark.parametrize("doc", [
    {"id": "c", "choices": [{"index": 0, "delta": {"content": " é\u2028<\"\\"}, "logprobs": None}]},
    {"logprob": -9999.0, "tiny": 5e-324, "big": 1.7976931348623157e308, "neg0": -0.0, "int": 2**70},
    [],
])  # fmt: skip
def test_documents_come_out_equal(doc):
    raw = json.dumps(doc).encode()
    document = decode(raw)
    assert document.fast
    assert json.loads(document.encode()) == doc


def test_nonfinite_literals_take_the_standard_path_both_ways():
    document = decode(b'{"logprob": -Infinity, "p": NaN}')
    assert not document.fast
    assert math.isinf(document.value["logprob"])
    assert document.encode() == b'{"logprob": -Infinity, "p": NaN}'  # as vLLM wrote it


def test_a_lone_surrogate_comes_out_escaped_not_as_invalid_utf8():
    document = decode(b'{"content": "a\\ud800b"}')
    out = document.encode()
    out.decode("utf-8")  # valid UTF-8
    assert json.loads(out) == {"content": "a\ud800b"}


def test_what_the_layer_adds_is_written_too():
    document = decode(b'{"choices": [{"index": 0}]}')
    document.value["choices"][0]["refusal_decision"] = {"token": "[respond]", "probabilities": {"respond": 0.5}}
    assert json.loads(document.encode())["choices"][0]["refusal_decision"]["probabilities"] == {"respond": 0.5}


@pytest.mark.parametrize("raw", [b"data", b"{", b"\xff\xfe", b"[" * 100000])
def test_what_is_not_json_raises_like_json_loads(raw):
    with pytest.raises((ValueError, RecursionError)):
        decode(raw)
