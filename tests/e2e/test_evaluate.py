"""``refusal-gateway eval`` against the real stack: its figures are what the server answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from refusal_gateway.canary import canary_prompts_path
from refusal_training.scoring import auroc

from ..conftest import SHARED_DATA
from . import checks

pytestmark = pytest.mark.e2e

BIAS_SWEEP = "--bias-sweep=-4,0,4"
THRESHOLD_SWEEP = "--threshold-sweep=0.3,0.6"


def run_eval(server, files: list[Path], out: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "refusal_gateway.cli", "eval", "--url", server.base_url,
         *map(str, files), "--out", str(out), "--concurrency", "8", "--limit", "24", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| **all** |" in proc.stdout  # the Markdown, printed
    return json.loads((out / "eval.json").read_text())


def decisions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """The packaged canary prompts (40, labelled, with categories) as our own small file, plus a
    seeded sample (``--limit``) of CoCoNot's should-refuse and contrast sets when present."""
    tmp = tmp_path_factory.mktemp("eval-data")
    small = tmp / "canary.jsonl"
    small.write_text(canary_prompts_path().read_text())
    coconot = SHARED_DATA / "coconot"
    shared = [
        coconot / "coconot_original_test.norm.jsonl",
        coconot / "coconot_contrast_test.norm.jsonl",
    ]
    return [small] + [f for f in shared if f.is_file()]


@pytest.fixture(scope="module")
def swept(server, files, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval") / "auto"
    return run_eval(server, files, out, BIAS_SWEEP, THRESHOLD_SWEEP), out


async def test_figures_are_the_servers_decisions(server, files, swept):
    report, out = swept
    rows = decisions(out)
    n_files = len(files)
    assert report["results"]["all"]["n"] == len(rows) == 24 * n_files
    # The rule on the reported probabilities reproduces every decision (no default profile).
    assert report["offline_rule_check"]["mismatches"] == 0
    assert report["offline_rule_check"]["checked"] >= len(rows) - 2
    assert report["results"]["all"]["rows_without_probabilities"] == 0
    for name in [n for n in report["results"] if n != "all"]:
        mine = [r for r in rows if r["file"] == name]
        refused = [r["decision"] != "respond" for r in mine]
        labels = np.array([r["label"] == "refuse" for r in mine])
        figures = report["results"][name]
        if labels.any():
            assert figures["refusal_rate"] == pytest.approx(np.mean(np.array(refused)[labels]))
        if (~labels).any():
            assert figures["over_refusal"] == pytest.approx(np.mean(np.array(refused)[~labels]))
        if labels.any() and (~labels).any():
            assert figures["auroc"] == pytest.approx(
                auroc(np.array([r["p_refuse"] for r in mine]), labels)
            )
    # The same prompts again through the openai client: the same decisions and probabilities.
    client = checks.client_for(server)
    sample = rows[:: max(1, len(rows) // 12)]
    replies = await checks.gather_limited(
        [checks.decide(client, server, r["prompt"]) for r in sample]
    )
    for row, reply in zip(sample, replies, strict=True):
        decision = reply[0]["refusal_decision"]
        assert (decision["category"] or "respond") == row["decision"], (row, decision)
        p = decision["probabilities"]
        assert sum(v for k, v in p.items() if k != "respond") == pytest.approx(
            row["p_refuse"], rel=1e-4
        )
    md = (out / "eval.md").read_text()
    assert "Bias sweep" in md and "Threshold sweep" in md and "| canary |" in md
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    print(md)  # shown with -s: a sample for the README


def test_offline_sweeps_equal_sent_sweeps(server, files, swept, tmp_path):
    """The sweeps computed from the first pass's probabilities are what real requests get."""
    report, _ = swept
    assert report["sweeps"]["bias"]["mode"] in ("offline", "offline+requests")
    assert report["requests_sent"] < 2 * report["results"]["all"]["n"]  # not a pass per point
    sent = run_eval(
        server, files, tmp_path, BIAS_SWEEP, THRESHOLD_SWEEP, "--sweep-mode", "requests"
    )
    assert sent["sweeps"]["bias"]["mode"] == "requests"
    for kind in ("bias", "threshold"):
        assert report["sweeps"][kind]["points"] == sent["sweeps"][kind]["points"], kind
    rates = [p["all"]["refusal_rate"] for p in sent["sweeps"]["bias"]["points"]]
    over = [p["all"]["over_refusal"] for p in sent["sweeps"]["bias"]["points"]]
    assert rates == sorted(rates) and over == sorted(over)  # the bias moves both monotonically


def test_fixed_fields_and_profiles(server, files, tmp_path):
    small = files[:1]
    forced = run_eval(server, small, tmp_path / "safety", "--bias", "safety=100", "--no-progress")
    figures = forced["results"]["all"]
    assert figures["refusal_rate"] == 1.0 and figures["over_refusal"] == 1.0
    assert {r["decision"] for r in decisions(tmp_path / "safety")} == {"safety"}
    assert forced["settings"] == {"refusal_bias": {"safety": 100.0}}
    # A profile's settings live on the server: its sweep is sent, not computed.
    answer = run_eval(
        server, small, tmp_path / "answer", "--profile", "answer", "--bias-sweep", "0"
    )
    assert answer["results"]["all"]["refusal_rate"] == 0.0
    assert answer["sweeps"]["bias"]["mode"] == "requests"
    assert answer["sweeps"]["bias"]["points"][0]["all"]["refusal_rate"] == 0.0
