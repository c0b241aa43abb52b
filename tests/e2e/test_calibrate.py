"""``refusal-gateway calibrate`` on the demo model: the served model decides as the calibration said."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from refusal_gateway.policy import Policy
from refusal_plugins.params import RefusalParams
from refusal_plugins.vocab import RefusalManifest
from refusal_training.calibrate import Scores, decisions, figures
from refusal_training.scoring import Labelled, control_probabilities, read_jsonl

from . import checks

pytestmark = pytest.mark.e2e


def labelled_rows(n_each: int) -> list[dict]:
    """Should-refuse and benign look-alike prompts (CoCoNot; without ../shared, the demo corpus)."""
    files = [
        checks.SHARED / "coconot_original_test.norm.jsonl",
        checks.SHARED / "coconot_contrast_test.norm.jsonl",
    ]
    if all(f.is_file() for f in files):
        rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line]
    else:
        from refusal_training.demo_model import corpus_path

        rows = [json.loads(line) for line in corpus_path().read_text().splitlines() if line]
    rng = random.Random(7)
    by_label = {label: [r for r in rows if r["label"] == label] for label in ("refuse", "respond")}
    return [r for label in ("refuse", "respond") for r in rng.sample(by_label[label], n_each)]


async def test_calibrated_thresholds_decide_as_calibrated(server, tmp_path):
    rows = labelled_rows(40)
    data = tmp_path / "calibration.jsonl"
    data.write_text(
        "".join(json.dumps({k: r[k] for k in ("prompt", "label", "category")}) + "\n" for r in rows)
    )
    out = tmp_path / "calib"
    subprocess.run(
        [sys.executable, "-m", "refusal_gateway.cli", "calibrate", "--model", str(server.model_dir),
         str(data), "--out", str(out), "--per-category", "--target-over-refusal", "0.2"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    result = json.loads((out / "calibration.json").read_text())
    assert result["calibrated"]["over_refusal_on_respond"] <= 0.2
    assert (out / "roc.png").is_file() and (out / "rates.png").is_file()
    # The policy file is what `serve --policy-file` loads: its default profile is the thresholds.
    params, _ = Policy.load(out / "policy.yaml").resolve(None, RefusalParams(), None)
    thresholds = dict(params.threshold)
    assert thresholds == result["thresholds"]

    labelled: list[Labelled] = read_jsonl([data])
    keys = [t.key for t in RefusalManifest.load(server.model_dir).tokens]
    scores = Scores.of(
        keys, control_probabilities(server.model_dir, [r.prompt for r in labelled]), labelled
    )
    offline = decisions(scores, thresholds)
    assert json.dumps(figures(scores, offline)) == json.dumps(result["calibrated"])

    client = checks.client_for(server)
    served = await checks.gather_limited(
        [checks.decide(client, server, r.prompt, refusal_threshold=thresholds) for r in labelled]
    )
    limit = np.array([thresholds.get(keys[c], thresholds.get("refuse")) for c in scores.c_star])
    near = np.abs(scores.p_star - limit) <= 1e-3 * limit  # float32 noise may tip these
    checked = 0
    for i, reply in enumerate(served):
        if near[i]:
            continue
        want = None if offline[i] == 0 else keys[offline[i]]
        assert reply[0]["refusal_decision"]["category"] == want, (
            labelled[i],
            reply[0]["refusal_decision"],
        )
        checked += 1
    assert checked >= 70
