"""Streaming throughput and TTFT of the full stack against plain ``vllm serve``, in one run.

    python -m bench.gateway_overhead [--model DIR] [--requests 256] [--concurrency 32]

Servers, one at a time, in the order plain, stack, plain, stack:
  plain: vLLM's OpenAI server on the model, nothing of ours loaded;
  stack: ``refusal-gateway serve`` (gateway layer + refusal processor), every
         request carrying ``refusal_bias``.
Each round streams the same requests (``max_tokens`` fixed, ``ignore_eos``) at
a fixed concurrency and reports tokens/s and TTFT percentiles; the summary is
the ratio stack / plain over the medians. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from refusal_gateway import launcher
from refusal_gateway.settings import GatewaySettings

MODEL_NAME = "bench"


def start(kind: str, model: str, port: int, log: Path) -> subprocess.Popen:
    settings = GatewaySettings(model=model, served_model_name=MODEL_NAME, port=port, dtype="float32")
    env = launcher.build_env(settings, Path(model), "v1", dict(os.environ))
    extra = ["--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "64"]
    if kind == "stack":
        cmd = launcher.build_command(settings, Path(model), "v1", extra)
    else:
        cmd = [sys.executable, "-m", launcher.VLLM_SERVER, "--model", model, "--port", str(port),
               "--served-model-name", MODEL_NAME, "--dtype", "float32", *extra]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if not launcher.wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s=300):
        proc.kill()
        raise RuntimeError(f"{kind} server did not start; see {log}")
    return proc


async def one(client: httpx.AsyncClient, body: dict) -> tuple[float, int]:
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("content") or delta.get("refusal"):
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
    return ttft or 0.0, tokens


async def load(port: int, kind: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    body = {
        "model": MODEL_NAME, "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": "Tell me about the history of the bicycle."}],
    }
    if kind == "stack":
        body["refusal_bias"] = {"safety": -100.0, "humanizing": -100.0, "incomplete": -100.0,
                                "indeterminate": -100.0, "unsupported": -100.0}
    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=2.0)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=300) as client:
        async def run():
            async with gate:
                return await one(client, body)

        await asyncio.gather(*(run() for _ in range(min(8, requests))))  # warm-up
        started = time.perf_counter()
        results = await asyncio.gather(*(run() for _ in range(requests)))
        elapsed = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    return {
        "tokens_per_s": sum(r[1] for r in results) / elapsed,
        "ttft_p50_ms": 1e3 * ttfts[len(ttfts) // 2],
        "ttft_p90_ms": 1e3 * ttfts[int(len(ttfts) * 0.9)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="refusal-token model dir (default: the demo model)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.model is None:
        from refusal_gateway.tools.demo_model import build_demo_model

        args.model = str(build_demo_model())
    runs: dict[str, list[dict]] = {"plain": [], "stack": []}
    for _ in range(args.rounds):
        for kind in ("plain", "stack"):
            proc = start(kind, args.model, args.port, Path(f"/tmp/bench-{kind}.log"))
            try:
                runs[kind].append(asyncio.run(
                    load(args.port, kind, args.requests, args.concurrency, args.max_tokens)))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    summary = {
        kind: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
        for kind, rs in runs.items()
    }
    report = {
        "runs": runs,
        "median": summary,
        "ratio_stack_over_plain": {
            k: round(summary["stack"][k] / summary["plain"][k], 3) for k in summary["plain"]
        },
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
