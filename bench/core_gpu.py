"""The processor's tensor core on a GPU, as a ratio to work the sampler does anyway.

    python -m bench.core_gpu [--out results.json]

For batch sizes 1..256 and vocabularies of 49k (SmolLM2) and 152k (Qwen-size),
times ``apply_rows`` (every row active; decision rows with and without a
threshold) with CUDA events, next to one ``torch.softmax`` over the same
logits — the least the sampler itself spends per step — and reports the
ratio. Repeated timings give the noise floor (the spread of the baseline
against itself). Needs CUDA; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from refusal_plugins.core import RefusalTable, apply_rows
from refusal_plugins.params import RefusalParams
from refusal_plugins.vocab import ControlToken, RefusalManifest, scheme_keys


def _time(fn, repeats: int = 50) -> list[float]:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def case(batch: int, vocab: int, threshold: bool, decide_share: float) -> dict:
    keys = scheme_keys("categorical")
    ids = list(range(vocab - len(keys), vocab))
    manifest = RefusalManifest(
        "categorical", tuple(ControlToken(k, f"[{k}]", i, None) for k, i in zip(keys, ids, strict=True))
    )
    table = RefusalTable(manifest, batch, torch.device("cuda"))
    params = RefusalParams(bias={"safety": 2.0}, threshold={"refuse": 0.4} if threshold else {},
                           decide=True)  # fmt: skip
    for slot in range(batch):
        table.write(slot, params)
    logits = torch.randn(batch, vocab, device="cuda")
    n_decide = max(1, round(batch * decide_share))
    decide = torch.zeros(batch, dtype=torch.bool, device="cuda")
    decide[:n_decide] = True
    ban = ~decide
    rows = torch.arange(n_decide, device="cuda")
    work = logits.clone()

    def core():
        work.copy_(logits)
        apply_rows(table, work, None, decide, ban, rows)

    def baseline():
        work.copy_(logits)
        torch.softmax(work, dim=-1)

    base_a, base_b, core_t = _time(baseline), _time(baseline), _time(core)
    med = statistics.median
    return {
        "batch": batch, "vocab": vocab, "threshold": threshold, "decision_rows": n_decide,
        "core_ms": round(med(core_t), 4), "softmax_ms": round(med(base_a), 4),
        "ratio_core_to_softmax": round(med(core_t) / med(base_a), 3),
        "noise_floor_ratio": round(med(base_b) / med(base_a), 3),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    for vocab in (49158, 151936):
        for batch in (1, 16, 64, 256):
            for threshold in (False, True):
                for share in (1.0, 0.1):
                    results["cases"].append(case(batch, vocab, threshold, share))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
