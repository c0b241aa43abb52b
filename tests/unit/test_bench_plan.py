"""``python -m bench run``: both sides get the same engine arguments, and a growth plan that cannot fit is refused."""

from __future__ import annotations

import pytest

from bench import __main__ as bench_cli
from bench import servers


def test_both_sides_prefill_unchunked_with_the_context_asked_for() -> None:
    """The launcher prefills unchunked on CPU; plain vLLM is told the same, or the engine work differs."""
    args = servers.engine_args(4200)
    assert "--no-enable-chunked-prefill" in args
    assert args[args.index("--max-model-len") + 1] == "4200"
    assert servers.ENGINE_ARGS == servers.engine_args(servers.MAX_MODEL_LEN)


def test_prompt_lengths_beyond_the_context_are_refused_before_any_server_starts(tmp_path) -> None:
    with pytest.raises(SystemExit, match="--max-model-len >= 4016"):
        bench_cli.main(["run", "--model", str(tmp_path), "--out", str(tmp_path), "--output-len", "16",
                        "--prompt-lengths", "100", "4000"])  # fmt: skip


def test_growth_options_reach_the_plan(tmp_path, monkeypatch) -> None:
    seen = {}

    class Runner:
        def __init__(self, plan):
            seen["plan"] = plan
            raise SystemExit(0)

    monkeypatch.setattr("bench.run.Runner", Runner)
    with pytest.raises(SystemExit):
        bench_cli.main(["run", "--model", str(tmp_path), "--out", str(tmp_path), "--prompt-lengths", "100", "4000",
                        "--n-values", "1", "8", "--scaling-concurrency", "4", "--max-model-len", "4200"])  # fmt: skip
    plan = seen["plan"]
    assert (plan.prompt_lengths, plan.n_values, plan.scaling_concurrency, plan.max_model_len) == (
        [100, 4000], [1, 8], 4, 4200)
