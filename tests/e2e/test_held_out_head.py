"""Leave one source out, through the server: a head fitted without a source, served, measured.

The README's leave-one-source-out figures are computed offline from the features vLLM
sees. ``head_recipe --hold-out`` fits the head a sweep would fit without a family, as
a servable artefact; ``build-model smollm2 --artefact`` assembles it; ``refusal-gateway
eval`` measures the held-out sources through the full stack. This runs that path on a
seeded sample of the real sets (``../shared/data``; 12 rows a source, real SmolLM2
weights) with two families held out, and checks that the server's decisions on them are
the ones the recipe reported, prompt count for prompt count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .server import running_server

pytestmark = pytest.mark.e2e

HELD_OUT = {"phtest": "refused_benign", "catqa": "refused_harmful"}
PER_SOURCE = 12
#: Decisions whose two most likely control tokens are this close may flip between
#: transformers' float32 and vLLM's (as in test_smollm2_recipe).
TIE = 1e-3


@pytest.fixture(scope="module")
def recipe_run(shared_data, tmp_path_factory) -> Path:
    from refusal_training.head_recipe import main
    from refusal_training.smollm2_model import artefact_path

    out = tmp_path_factory.mktemp("held-out-head")
    assert main(["--data-dir", str(shared_data), "--out", str(out),
                 "--max-rows-per-source", str(PER_SOURCE), "--system-augment", "0",
                 "--turn-augment", "0", "--no-client-systems", "--hold-out", ",".join(HELD_OUT),
                 "--soft-tokens-from", str(artefact_path())]) == 0  # fmt: skip
    return out


def test_the_server_decides_the_held_out_sources_as_the_recipe_reported(recipe_run, shared_data, tmp_path):
    from refusal_training.build import build
    from refusal_training.sources import load_all, sample

    info = json.loads((recipe_run / "smollm2_refusal.json").read_text())
    assert info["head"]["held_out"] == sorted(HELD_OUT) and not info["leave_one_source_out"]
    assert not set(HELD_OUT) & set(info["head"]["trained_on"])
    data = sample(load_all(shared_data, 0), PER_SOURCE, 0)
    files = []
    for name in HELD_OUT:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": r.prompt, "label": "refuse" if r.refuse else "respond"}) + "\n"
                                for r in data[name]))  # fmt: skip
        files.append(path)
    model = build("smollm2", artefact=recipe_run / "smollm2_refusal.safetensors")
    assert model != build("smollm2")  # its own directory, beside the default model's
    # No --dtype: the built model's manifest asks the launcher for float32, the precision
    # of the recipe's figures (vLLM's own default on CPU is bfloat16).
    log = tmp_path / "vllm.log"
    with running_server(model, log, ["--max-model-len", "1024"], dtype=None) as server:
        assert "dtype=torch.float32" in log.read_text()
        proc = subprocess.run(
            [sys.executable, "-m", "refusal_gateway.cli", "eval", "--url", server.base_url,
             *map(str, files), "--out", str(tmp_path / "eval"), "--no-progress", "--no-plot"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / "eval" / "decisions.jsonl").read_text().splitlines()]
    for name, rate in HELD_OUT.items():
        served = [r for r in rows if Path(r["file"]).stem == name]
        reported = info["shipped_head_on_yardsticks"][name]
        assert len(served) == reported["n"] == len(data[name])
        refused = sum(r["decision"] != "respond" for r in served)
        ties = sum(_margin(r["probabilities"]) < TIE for r in served)
        assert abs(refused - round(reported[rate] * reported["n"])) <= ties, (name, refused, reported)


def _margin(probabilities: dict[str, float]) -> float:
    """How far respond is from the refusal decision (its gap to the likeliest refusal)."""
    refuse = max(v for k, v in probabilities.items() if k != "respond")
    return abs(probabilities["respond"] - refuse)
