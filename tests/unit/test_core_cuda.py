"""The tensor core on a GPU gives the CPU's decisions (skipped without CUDA).

The processors run the same core on whatever device vLLM's logits live on;
on a GPU the batch is a CUDA tensor, the refusal table is a CUDA tensor and
decision reports leave the device asynchronously. Same random batches on both
devices: identical decisions (the argmax of every decision row, and which
tokens are left finite), logits within float tolerance, reports sent.
"""

from __future__ import annotations

import random

import pytest
import torch
from refusal_plugins.core import RefusalTable, apply_rows
from refusal_plugins.params import RefusalParams
from refusal_plugins.vocab import ControlToken, RefusalManifest, scheme_keys

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

VOCAB = 49158
CTRL = list(range(VOCAB - 6, VOCAB))


def categorical() -> RefusalManifest:
    keys = scheme_keys("categorical")
    return RefusalManifest(
        "categorical", tuple(ControlToken(k, f"[{k}]", i, None) for k, i in zip(keys, CTRL, strict=True))
    )


def random_params(rng: random.Random) -> RefusalParams:
    keys = ["refuse", "humanizing", "incomplete", "indeterminate", "safety", "unsupported"]
    bias = {k: rng.uniform(-100, 100) for k in rng.sample(keys, rng.randint(0, 3))}
    threshold = {k: rng.random() for k in rng.sample(keys, rng.randint(0, 2))}
    temperature = rng.choice([None, 0.01, 0.5, 1.0, 7.0, 100.0])
    return RefusalParams(bias=bias, threshold=threshold, temperature=temperature, decide=True)


def run(device: str, logits: torch.Tensor, params: list[RefusalParams], decide_rows: list[int]):
    table = RefusalTable(categorical(), len(params), torch.device(device))
    for slot, p in enumerate(params):
        table.write(slot, p)
    out = logits.to(device).clone()
    decide = torch.zeros(len(params), dtype=torch.bool)
    decide[decide_rows] = True
    ban = ~decide
    rows = torch.tensor(decide_rows, dtype=torch.long)
    apply_rows(table, out, None, decide.to(device), ban.to(device), rows.to(device))
    return out.cpu()


@pytest.mark.parametrize("seed", range(20))
def test_cuda_core_decides_as_the_cpu_core(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 7, 64, 256])
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, VOCAB, generator=gen) * rng.choice([1.0, 5.0, 30.0])
    logits[:, CTRL] += rng.uniform(-5, 25)  # control tokens anywhere from buried to dominant
    params = [random_params(rng) for _ in range(n)]
    decide_rows = sorted(rng.sample(range(n), rng.randint(1, n)))
    cpu, gpu = run("cpu", logits, params, decide_rows), run("cuda", logits, params, decide_rows)
    assert torch.equal(torch.isfinite(cpu), torch.isfinite(gpu))
    assert torch.equal(cpu[decide_rows].argmax(dim=1), gpu[decide_rows].argmax(dim=1))
    finite = torch.isfinite(cpu)
    assert torch.allclose(cpu[finite], gpu[finite], rtol=1e-5, atol=1e-4)


def test_cuda_core_banned_rows_never_emit_control_tokens():
    logits = torch.zeros(4, VOCAB)
    logits[:, CTRL] = 1e4
    params = [RefusalParams(bias={"safety": 5.0}, decide=True)] * 4
    out = run("cuda", logits, params, [0])
    assert torch.isinf(out[1:, CTRL]).all()
    assert out[0].argmax().item() in CTRL
