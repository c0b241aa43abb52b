"""The engine never raises on a request: every float edge through parse, table and apply.

One request with ``refusal_temperature: 1e-300`` once overflowed the float32
table and killed the EngineCore (and every request in flight). These tests
drive the real parser and the real tensor core with the edges a client can
send — subnormals, ±0, the largest double, values beyond float32, huge
integers, NaN/inf, strings and booleans — and require that parsing either
accepts (and then the tensors stay finite and the decision row keeps a
finite control logit) or raises :class:`RefusalParamError`, nothing else.
"""

from __future__ import annotations

import math
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from refusal_plugins.core import RefusalTable, apply_rows
from refusal_plugins.params import (
    MIN_TEMPERATURE,
    RefusalParamError,
    RefusalParams,
    engine_params,
    parse_refusal_params,
)

from .helpers import categorical_manifest

EDGE_FLOATS = [
    0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1e-300, 1e-45, 1.4e-45, 2.9e-39,
    1e-38, MIN_TEMPERATURE, math.nextafter(MIN_TEMPERATURE, 0), 0.5, 1.0, 99.999, 100.0,
    math.nextafter(100.0, math.inf), 3.4028235e38, 3.5e38, 1e308, sys.float_info.max,
    -sys.float_info.max, math.inf, -math.inf, math.nan,
]  # fmt: skip
EDGE_OTHER = [10**400, -(10**400), 2**64, True, False, None, "1", "nan", [], {}, [1.0]]
EDGES = EDGE_FLOATS + EDGE_OTHER

anything = st.one_of(
    st.sampled_from(EDGES),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True, width=32),
    st.integers(),
)
KEYS = ["refuse", "safety", "humanizing", "respond"]


@st.composite
def raw_settings(draw) -> dict:
    """A client's ``vllm_xargs`` refusal entries, flat or nested, any values."""
    args: dict = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        args[f"refusal_bias.{key}"] = draw(anything)
    if draw(st.booleans()):
        args["refusal_threshold"] = draw(
            st.one_of(anything, st.dictionaries(st.sampled_from(KEYS), anything, max_size=3))
        )
    if draw(st.booleans()):
        args["refusal_temperature"] = draw(anything)
    if draw(st.booleans()):
        args["refusal_decide"] = draw(st.one_of(anything, st.sampled_from([0, 1])))
    return args


def _apply(params: RefusalParams, logits: torch.Tensor) -> torch.Tensor:
    manifest = categorical_manifest(first_id=10)
    table = RefusalTable(manifest, max_rows=2, device=torch.device("cpu"))
    table.write(0, params)
    out = logits.clone()
    rows = torch.tensor([0])
    apply_rows(
        table, out, None, torch.tensor([True, False]), torch.tensor([False, True]), rows, [0]
    )
    return out


LOGITS = st.lists(
    st.one_of(
        st.floats(-1e4, 1e4, width=32),
        st.sampled_from([-math.inf, 0.0, -0.0, 3.0e38, -3.0e38, 1e-45]),
    ),
    min_size=20,
    max_size=20,
)


@settings(max_examples=400, deadline=None)
@given(raw_settings(), LOGITS)
def test_parse_accepts_or_names_the_field_and_the_engine_never_raises(args, row):
    try:
        params = parse_refusal_params(args)
    except RefusalParamError as e:
        assert e.param.startswith("refusal_")
        params = engine_params(args)  # what the engine does if validation was skipped
        assert params == RefusalParams(decide=True)
    params = RefusalParams(params.bias, params.threshold, params.temperature, decide=True)
    logits = torch.tensor([row, row], dtype=torch.float32)
    out = _apply(params, logits)
    ctrl = out[0, 10:16]
    assert not torch.isnan(out).any()
    if torch.isfinite(logits[0, 10:16]).any():
        # The decision row keeps at least one finite control logit and nothing else.
        assert torch.isfinite(ctrl).any()
        assert torch.isneginf(out[0, :10]).all() and torch.isneginf(out[0, 16:]).all()
    assert torch.isneginf(out[1, 10:16]).all()  # banned after the decision


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(EDGE_FLOATS + [MIN_TEMPERATURE]),
    st.sampled_from(EDGE_FLOATS),
    st.sampled_from(EDGE_FLOATS),
)
def test_table_clamps_whatever_reaches_it(temperature, bias, threshold):
    """Even params that never passed validation (an offline caller) leave finite tensors."""
    params = RefusalParams(
        bias={"safety": bias}, threshold={"safety": threshold}, temperature=temperature, decide=True
    )
    manifest = categorical_manifest(first_id=10)
    table = RefusalTable(manifest, max_rows=1, device=torch.device("cpu"))
    table.write(0, params)
    t = table.tensors()
    assert torch.isfinite(t["bias"]).all() and torch.isfinite(t["inv_temp"]).all()
    assert (t["inv_temp"] <= 1 / MIN_TEMPERATURE).all()
    thresholds = t["threshold"][~torch.isnan(t["threshold"])]
    assert ((thresholds >= 0) & (thresholds <= 1)).all()


def test_the_temperature_that_killed_the_engine_is_a_400():
    for value in (1e-300, 2.9e-39, 5e-324, 0.0, -0.0, MIN_TEMPERATURE / 2):
        try:
            parse_refusal_params({"refusal_temperature": value})
        except RefusalParamError as e:
            assert e.param == "refusal_temperature"
        else:
            raise AssertionError(f"{value!r} was accepted")
    assert parse_refusal_params({"refusal_temperature": MIN_TEMPERATURE}).temperature == MIN_TEMPERATURE


def test_huge_integers_are_a_param_error_not_an_overflow():
    for field in ("refusal_bias.safety", "refusal_threshold", "refusal_temperature"):
        try:
            parse_refusal_params({field: 10**400})
        except RefusalParamError as e:
            assert e.param.startswith(field.partition(".")[0])
        else:
            raise AssertionError(field)
