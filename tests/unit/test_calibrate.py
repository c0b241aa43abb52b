"""``refusal-gateway calibrate``: fitted thresholds are optimal, match the processor, load as a policy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from refusal_gateway import cli
from refusal_gateway.policy import Policy
from refusal_plugins.core import decide
from refusal_plugins.params import RefusalParams
from refusal_training import calibrate as cal
from refusal_training.scoring import Labelled

from .helpers import categorical_manifest

KEYS = [t.key for t in categorical_manifest().tokens]
NAMES = [t.category for t in categorical_manifest().tokens]  # None for respond


def random_scores(seed: int, n: int) -> cal.Scores:
    """Probabilities on a 1e-3 grid (exact ties happen; near-ties do not), both labels present."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, len(KEYS))) * rng.uniform(0.5, 4)
    if seed % 3 == 0:
        logits = np.round(logits)  # many exact ties
    # Reported probabilities sum to at most 1 (the rest is the vocabulary's): scaled to at
    # most 0.99, the grid's rounding and the 1e-3 floor (≤ 0.009 over six tokens) keep it so.
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True) * rng.uniform(0.1, 0.99)
    probs = np.round(probs, 3) + 1e-3
    assert (probs.sum(1) < 1.0).all()
    labels = ["refuse", "respond"] + [
        "refuse" if rng.random() < 0.5 else "respond" for _ in range(n - 2)
    ]
    rows = [Labelled("p", label, NAMES[int(rng.integers(0, len(NAMES)))]) for label in labels]
    return cal.Scores.of(KEYS, probs, rows)


def objective(f: dict[str, float], target: float | None) -> float:
    tpr, fpr = f["refusal_rate_on_refuse"], f["over_refusal_on_respond"]
    if target is None:
        return tpr - fpr
    return tpr if fpr <= target + 1e-12 else -1.0


def brute_force_global(scores: cal.Scores, target: float | None) -> float:
    candidates = [*scores.p_star, 1.0 + 1e-9]
    return max(
        objective(cal.figures(scores, cal.decisions(scores, {"refuse": t})), target)
        for t in candidates
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(4, 60), st.sampled_from([None, 0.0, 0.1, 0.3]))
def test_global_threshold_is_optimal_and_within_target(seed, n, target):
    scores = random_scores(seed, n)
    fitted = cal.fit(scores, target)
    got = objective(fitted.calibration, target)
    assert got == pytest.approx(brute_force_global(scores, target))
    if target is not None:
        assert fitted.calibration["over_refusal_on_respond"] <= target + 1e-12
    # The reported figures are those of the thresholds written out.
    again = cal.figures(scores, cal.decisions(scores, fitted.thresholds))
    assert json.dumps(fitted.calibration) == json.dumps(again)  # NaN-safe equality


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(4, 60), st.sampled_from([None, 0.0, 0.1, 0.3]))
def test_per_category_thresholds_are_never_worse_than_one(seed, n, target):
    scores = random_scores(seed, n)
    one = cal.fit(scores, target)
    per = cal.fit(scores, target, per_category=True)
    assert objective(per.calibration, target) >= objective(one.calibration, target) - 1e-12
    if target is not None:
        assert per.calibration["over_refusal_on_respond"] <= target + 1e-12
    assert set(per.thresholds) <= {"refuse", *KEYS[1:]}
    assert all(0.0 < t <= 1.0 for t in per.thresholds.values())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.booleans())
def test_decisions_are_the_processors_own(seed, per_category):
    """The offline rule equals the tensor core's decision on logits with these probabilities."""
    scores = random_scores(seed, 30)
    thresholds = cal.fit(scores, 0.2, per_category).thresholds
    # Vocabulary: the K control tokens plus one token holding the remaining mass.
    rest = np.clip(1.0 - scores.probs.sum(1, keepdims=True), 1e-6, None)
    logits = torch.tensor(np.log(np.hstack([scores.probs, rest])), dtype=torch.float64)
    params = RefusalParams(threshold=thresholds)
    row = [math.nan] + [
        params.threshold.get(k, params.threshold.get("refuse", math.nan)) for k in KEYS[1:]
    ]
    n = len(logits)
    decide(
        logits,
        torch.arange(n),
        torch.arange(len(KEYS)),
        torch.tensor([row] * n, dtype=torch.float64),
        torch.ones(n, dtype=torch.float64),
    )
    served = logits.argmax(dim=1).numpy()
    near = np.abs(scores.p_star - np.array([row[c] for c in scores.c_star])) < 1e-9
    offline = cal.decisions(scores, thresholds)
    assert (served[~near] == offline[~near]).all()


def test_without_thresholds_the_model_chooses():
    scores = random_scores(1, 20)
    assert (cal.decisions(scores, None) == scores.probs.argmax(1)).all()
    only_safety = cal.decisions(scores, {"safety": 0.5})
    safety = KEYS.index("safety")
    others = scores.c_star != safety
    assert (only_safety[others] == scores.probs.argmax(1)[others]).all()


def test_fit_needs_both_labels_and_a_valid_target():
    scores = random_scores(2, 10)
    with pytest.raises(ValueError, match="target"):
        cal.fit(scores, 1.5)
    one_label = cal.Scores.of(KEYS, scores.probs, [Labelled("p", "refuse", None)] * 10)
    with pytest.raises(ValueError, match="refuse and rows labelled respond"):
        cal.fit(one_label, None)


def test_cli_writes_a_policy_the_server_loads(tmp_path, monkeypatch):
    """calibrate -> policy.yaml -> the server's own policy resolves to exactly those thresholds."""
    model = tmp_path / "model"
    model.mkdir()
    categorical_manifest().save(model)
    scores = random_scores(3, 40)
    rows = [
        {
            "prompt": f"prompt {i}",
            "label": "refuse" if r else "respond",
            "category": NAMES[1 + i % 5],
        }
        for i, r in enumerate(scores.should_refuse)
    ]
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    def fake_probabilities(model_dir, prompts, batch_size=32):
        seen.append(list(prompts))
        return scores.probs

    monkeypatch.setattr(cal, "control_probabilities", fake_probabilities)
    out = tmp_path / "calib"
    argv = [
        "calibrate",
        "--model",
        str(model),
        str(data),
        "--out",
        str(out),
        "--target-over-refusal",
        "0.25",
    ]
    assert cli.main(argv) == 0
    assert seen == [[r["prompt"] for r in rows]]
    result = json.loads((out / "calibration.json").read_text())
    assert result["calibrated"]["over_refusal_on_respond"] <= 0.25
    assert result["rows"] == {
        "refuse": int(scores.should_refuse.sum()),
        "respond": int((~scores.should_refuse).sum()),
    }
    for plot in result["plots"]:
        assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    policy = Policy.load(out / "policy.yaml")
    params, profile = policy.resolve(None, RefusalParams(), None)
    assert profile == "calibrated"
    assert params.threshold == result["thresholds"]


def test_cli_rejects_one_label_data(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    categorical_manifest().save(model)
    data = tmp_path / "cal.jsonl"
    data.write_text(json.dumps({"prompt": "x", "label": "refuse", "category": NAMES[1]}) + "\n")
    monkeypatch.setattr(cal, "control_probabilities", lambda *a, **k: np.full((1, len(KEYS)), 0.1))
    with pytest.raises(SystemExit, match="refuse and rows labelled respond"):
        cli.main(["calibrate", "--model", str(model), str(data), "--out", str(tmp_path / "o")])
