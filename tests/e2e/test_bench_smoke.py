"""``python -m bench run --smoke``: the benchmark command works end to end.

One round, a handful of requests per case, no LiteLLM peer and no second plain
server: it starts plain vLLM and the stack (one at a time) on the demo model,
drives both with vLLM's own ``vllm bench serve`` (streamed and not), and
writes the JSON and Markdown report. Nothing here is timed or compared: the
figures of so short a run mean nothing; only that every request was answered,
that both sides generated the same number of tokens, and that the report is
complete are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_runs_and_reports(demo_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--smoke", "--model", str(demo_model_dir), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [result] = out.glob("smoke-*.json")
    report = json.loads(result.read_text())
    records = report["records"]
    sides = {r["side"] for r in records}
    assert sides == {"plain_a", "stack", "stack_fields"}, sides
    assert {r["mode"] for r in records} == {"stream", "nostream"}
    for r in records + report["scaling_records"]:
        assert r["completed"] == r["prompts"] and not r["failed"], r
        assert r["output_tokens"] > 0, r
        assert r["api_cpu_ms_per_request"] > 0, r  # the API-server pid was found
    # Every side generated as many tokens as plain vLLM for the same case.
    tokens = {(r["side"], r["concurrency"], r["mode"]): r["output_tokens"] for r in records}
    for (side, c, mode), n in tokens.items():
        assert n == tokens[("plain_a", c, mode)], (side, c, mode)
    check = report["work_check"]
    for side in ("stack", "stack_fields"):
        assert check[side]["errors"] == 0, check[side]
        assert check[side]["same_completion_tokens"] == check[side]["prompts"], check[side]
    md = result.with_suffix(".md").read_text()
    assert "| c=1 stream | plain_a |" in md and "stack_fields" in md
