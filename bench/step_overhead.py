"""Engine step overhead of the refusal processor, side by side with plain vLLM.

    python -m bench.step_overhead [--model DIR] [--batches 1 32 256] [--rounds 3]

Two engines on the same model in one run: plain vLLM, and vLLM with the
refusal processor loaded where every request carries refusal fields (bias and
threshold, so both stages run). Each round runs every batch size on both
engines in alternating order, and the report gives the median ratio of the
time per engine step (processor / plain). It is a benchmark, not a test: the
numbers go into the notes, nothing asserts on them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

STEPS = 64  # decode steps per request (ignore_eos keeps them all alive)


def _engine_worker(model: str, with_processor: bool, batches: list[int], rounds: int, out) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    kwargs = {}
    if with_processor:
        kwargs["logits_processors"] = ["refusal_plugins.v1:RefusalLogitsProcessor"]
    llm = LLM(model=model, enforce_eager=True, dtype="float32", max_num_seqs=max(batches),
              max_model_len=512, seed=0, **kwargs)
    extra = {"refusal_bias.safety": 2.0, "refusal_threshold.refuse": 0.5} if with_processor else None
    timings: dict[int, list[float]] = {b: [] for b in batches}
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(max(batches))]
    llm.generate(prompts[:8], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    for _ in range(rounds):
        for b in batches:
            params = SamplingParams(max_tokens=STEPS, ignore_eos=True, temperature=0.0, extra_args=extra)
            started = time.perf_counter()
            llm.generate(prompts[:b], params, use_tqdm=False)
            timings[b].append((time.perf_counter() - started) / STEPS)
    out.put(timings)


def run_engine(model: str, with_processor: bool, batches: list[int], rounds: int) -> dict[int, list[float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_engine_worker, args=(model, with_processor, batches, rounds, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="refusal-token model dir (default: the demo model)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if args.model is None:
        from refusal_gateway.tools.demo_model import build_demo_model

        args.model = str(build_demo_model())
    plain_a = run_engine(args.model, False, args.batches, args.rounds)
    refusal = run_engine(args.model, True, args.batches, args.rounds)
    plain_b = run_engine(args.model, False, args.batches, args.rounds)
    report = {"model": args.model, "steps_per_request": STEPS, "batches": {}}
    for b in args.batches:
        plain = statistics.median(plain_a[b] + plain_b[b])
        with_proc = statistics.median(refusal[b])
        report["batches"][b] = {
            "plain_ms_per_step": round(plain * 1e3, 3),
            "refusal_ms_per_step": round(with_proc * 1e3, 3),
            "ratio": round(with_proc / plain, 4),
            "plain_a_vs_b": round(statistics.median(plain_b[b]) / statistics.median(plain_a[b]), 4),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
