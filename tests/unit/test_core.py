"""The vectorised tensor core against the row-by-row reference of the paper's rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from refusal_plugins.core import RefusalTable, apply_rows, bias_and_ban, decide
from refusal_plugins.params import RefusalParams
from refusal_plugins.vocab import ControlToken, RefusalManifest, scheme_keys

from .reference import reference_row

NAN = math.nan


def manifest(scheme: str, ids: list[int]) -> RefusalManifest:
    keys = scheme_keys(scheme)  # type: ignore[arg-type]
    return RefusalManifest(
        scheme=scheme,  # type: ignore[arg-type]
        tokens=tuple(ControlToken(k, f"[{k}]", i, None) for k, i in zip(keys, ids, strict=True)),
    )


def run_core(logits, ctrl_ids, bias, threshold, temps, states):
    """Drive the core the way the adapters do: masks, then decision rows."""
    out = torch.tensor(logits, dtype=torch.float32)
    decide_mask = torch.tensor([s == "decide" for s in states])
    ban_mask = torch.tensor([s == "ban" for s in states])
    ids = torch.tensor(ctrl_ids)
    bias_and_ban(out, ids, torch.tensor(bias, dtype=torch.float32), decide_mask, ban_mask)
    rows = torch.nonzero(decide_mask).squeeze(1)
    if rows.numel():
        thresholds = torch.tensor(threshold, dtype=torch.float32)[rows]
        decide(
            out,
            rows,
            ids,
            thresholds,
            1.0 / torch.tensor(temps, dtype=torch.float32)[rows],
            # As the adapters do: the softmax stage only when some row has a threshold.
            with_threshold=bool((~torch.isnan(thresholds)).any()),
        )
    return out.numpy()


@st.composite
def batches(draw, k: int):
    vocab = draw(st.integers(k + 1, 24))
    rows = draw(st.integers(1, 6))
    ctrl_ids = draw(st.permutations(range(vocab)))[:k]
    finite = st.floats(-30, 30, allow_nan=False, width=32)
    logit = st.one_of(finite, finite, finite, st.just(-math.inf))  # some masked tokens
    logits = [draw(st.lists(logit, min_size=vocab, max_size=vocab)) for _ in range(rows)]
    states = draw(st.lists(st.sampled_from(["off", "ban", "decide"]), min_size=rows, max_size=rows))
    bias = [
        [0.0] + draw(st.lists(st.floats(-100, 100, width=32), min_size=k - 1, max_size=k - 1))
        if s == "decide"
        else [0.0] * k
        for s in states
    ]
    threshold = [
        [NAN]
        + draw(
            st.lists(st.one_of(st.just(NAN), st.floats(0, 1)), min_size=k - 1, max_size=k - 1)
        )
        for _ in states
    ]
    if draw(st.booleans()):  # half the batches have no threshold at all
        threshold = [[NAN] * k for _ in states]
    temps = draw(st.lists(st.floats(0.05, 10), min_size=rows, max_size=rows))
    return logits, ctrl_ids, bias, threshold, temps, states


@pytest.mark.parametrize("k", [2, 6], ids=["binary", "categorical"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_core_matches_reference(k, data):
    logits, ctrl_ids, bias, threshold, temps, states = data.draw(batches(k))
    got = run_core(logits, ctrl_ids, bias, threshold, temps, states)
    for r, state in enumerate(states):
        want, margin = reference_row(
            np.array(logits[r]), ctrl_ids, bias[r], threshold[r], temps[r], state
        )
        # float32 vs float64 softmax: skip draws sitting on the threshold itself.
        assume(margin is None or margin > 1e-4)
        np.testing.assert_allclose(got[r], want, rtol=0, atol=0, err_msg=f"row {r} ({state})")


def test_untouched_rows_are_bit_identical():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[1, 3] = -0.0
    logits[2, 7] = math.nan
    before = logits.clone()
    ids = torch.tensor([3, 7, 9])
    none = torch.zeros(4, dtype=torch.bool)
    bias_and_ban(logits, ids, torch.zeros(4, 3), none, none)
    assert torch.equal(logits.view(torch.int32), before.view(torch.int32))


def test_forced_decision_survives_sampling_settings():
    """A threshold forces one finite logit: any temperature/top-p leaves it certain."""
    table = RefusalTable(manifest("categorical", [10, 11, 12, 13, 14, 15]), 2, "cpu")
    # safety is made the most likely category, and every category is controlled.
    table.write(0, RefusalParams(bias={"safety": 60.0}, threshold={"refuse": 0.0}))
    logits = torch.randn(1, 20)
    rows = torch.tensor([0])
    apply_rows(table, logits, None, torch.tensor([True]), torch.tensor([False]), rows)
    safety_col = 1 + ["humanizing", "incomplete", "indeterminate", "safety", "unsupported"].index(
        "safety"
    )
    for temperature in (0.01, 1.0, 100.0):
        probs = torch.softmax(logits[0] / temperature, dim=0)
        assert probs[10 + safety_col] == 1.0
    # The same row without a threshold samples among control tokens only.
    table.write(1, RefusalParams(bias={"safety": -60.0}))
    logits = torch.randn(2, 20)
    apply_rows(table, logits, None, torch.tensor([False, True]), torch.tensor([False, False]),
               torch.tensor([1]))
    assert torch.isinf(logits[1, :10]).all() and torch.isfinite(logits[1, 10:16]).all()


def test_masked_tokens_are_never_forced_or_revived():
    ids = torch.tensor([0, 1])
    # Grammar masked every control token: the row is left to the mask.
    logits = torch.tensor([[-math.inf, -math.inf, 2.0, 1.0]])
    decide(logits, torch.tensor([0]), ids, torch.tensor([[NAN, 0.0]]), torch.tensor([1.0]))
    assert logits.tolist() == [[-math.inf, -math.inf, 2.0, 1.0]]
    # The threshold picks [refuse] but it is masked: no force, respond stays open.
    logits = torch.tensor([[1.0, -math.inf, 2.0, 1.0]])
    decide(logits, torch.tensor([0]), ids, torch.tensor([[NAN, 0.0]]), torch.tensor([1.0]))
    assert logits.tolist() == [[1.0, -math.inf, -math.inf, -math.inf]]


def test_table_composes_general_and_category_keys():
    m = manifest("categorical", [10, 11, 12, 13, 14, 15])
    table = RefusalTable(m, 4, "cpu")
    params = RefusalParams(
        bias={"refuse": 1.0, "safety": 2.0},
        threshold={"refuse": 0.5, "humanizing": 0.9},
        temperature=2.0,
    )
    assert table.write(2, params)
    t = table.tensors()
    cols = {tok.key: i for i, tok in enumerate(m.tokens)}
    assert t["bias"][2, cols["safety"]] == 3.0  # general + category add up
    assert t["bias"][2, cols["incomplete"]] == 1.0
    assert t["bias"][2, cols["respond"]] == 0.0
    assert t["threshold"][2, cols["humanizing"]].item() == pytest.approx(0.9)  # category wins
    assert t["threshold"][2, cols["safety"]] == 0.5
    assert math.isnan(t["threshold"][2, cols["respond"]])
    assert t["inv_temp"][2] == 0.5
    assert table.num_active == 1 and table.num_thresholds == 1
    assert not table.write(3, RefusalParams())
    assert table.num_active == 1
    table.write(3, RefusalParams(bias={"safety": 1.0}))
    assert (table.num_active, table.num_thresholds) == (2, 1)
    table.clear(2)
    assert (table.num_active, table.num_thresholds) == (1, 0)


def test_table_moves_and_swaps_rows():
    table = RefusalTable(manifest("binary", [5, 6]), 4, "cpu")
    table.write(0, RefusalParams(bias={"refuse": 7.0}))
    table.write(1, RefusalParams(bias={"refuse": -7.0}))
    table.swap(0, 1)
    assert table.tensors()["bias"][:2, 1].tolist() == [-7.0, 7.0]
    table.move(1, 3)
    t = table.tensors()
    assert t["bias"][3, 1] == 7.0 and not t["active"][1] and t["active"][3]
    assert table.num_active == 2
    table.move(3, 0)  # overwrites the active row 0
    assert table.num_active == 1
    table.clear(0)
    assert table.num_active == 0 and not table.tensors()["active"].any()
