"""Parsing and validation of per-request refusal arguments (one parser for frontend and engine)."""

from __future__ import annotations

import math

import pytest
from refusal_plugins.params import (
    RefusalParamError,
    RefusalParams,
    flatten_refusal_params,
    parse_refusal_params,
)


def test_flat_and_nested_forms_agree():
    flat = parse_refusal_params(
        {"refusal_bias.safety": 3, "refusal_bias.refuse": -1.5, "refusal_threshold.humanizing": 0.4,
         "refusal_temperature": 2.0, "other_plugin": "kept out"}
    )
    nested = parse_refusal_params(
        {"refusal_bias": {"safety": 3, "refuse": -1.5}, "refusal_threshold": {"humanizing": 0.4},
         "refusal_temperature": 2}
    )
    assert flat == nested
    assert flat.bias == {"safety": 3.0, "refuse": -1.5} and flat.active


def test_single_threshold_means_every_category():
    assert parse_refusal_params({"refusal_threshold": 0.3}).threshold == {"refuse": 0.3}


def test_no_refusal_args_is_inactive():
    assert not parse_refusal_params(None).active
    assert not parse_refusal_params({"something_else": 1}).active
    assert parse_refusal_params({"refusal_decide": 1}).active


@pytest.mark.parametrize(
    ("args", "param"),
    [
        ({"refusal_bias.bogus": 1}, "refusal_bias.bogus"),
        ({"refusal_bias": {"safety": "3"}}, "refusal_bias.safety"),
        ({"refusal_bias": {"safety": math.nan}}, "refusal_bias.safety"),
        ({"refusal_bias": {"safety": math.inf}}, "refusal_bias.safety"),
        ({"refusal_bias": {"safety": 100.5}}, "refusal_bias.safety"),
        ({"refusal_bias": {"safety": True}}, "refusal_bias.safety"),
        ({"refusal_bias": {"safety": {"nested": 1}}}, "refusal_bias.safety"),
        ({"refusal_bias": {"safety": [1]}}, "refusal_bias.safety"),
        ({"refusal_bias": 3}, "refusal_bias"),
        ({"refusal_bias": "safety"}, "refusal_bias"),
        ({"refusal_threshold": 1.5}, "refusal_threshold.refuse"),
        ({"refusal_threshold": {"safety": -0.1}}, "refusal_threshold.safety"),
        ({"refusal_temperature": 0}, "refusal_temperature"),
        ({"refusal_temperature": "hot"}, "refusal_temperature"),
        ({"refusal_temperature.x": 1}, "refusal_temperature.x"),
        ({"refusal_biass": {"safety": 1}}, "refusal_biass"),
        ({"refusal_bias.safety": 1, "refusal_bias": {"safety": 2}}, "refusal_bias.safety"),
        ({"refusal_decide": 2}, "refusal_decide"),
    ],
)
def test_bad_values_name_the_field(args, param):
    with pytest.raises(RefusalParamError) as info:
        parse_refusal_params(args)
    assert info.value.param == param
    assert param.split(".")[0] in str(info.value)


def test_flatten_round_trips():
    params = RefusalParams(bias={"safety": 2.0}, threshold={"refuse": 0.5}, temperature=1.5, decide=True)
    flat = flatten_refusal_params(params)
    assert all(isinstance(v, (int, float)) for v in flat.values())  # vllm_xargs takes scalars
    assert parse_refusal_params(flat) == params
