"""Why an outside measurement found the stack "faster" than plain vLLM.

    python -m bench explain [--model DIR] [--requests 64] [--concurrency 16] [--rounds 2]

The outside run compared ``make serve`` (the launcher's defaults) with a plain
vLLM server started the usual way, ``python -m vllm.entrypoints.openai.api_server
--model DIR``. Those are not the same engine. This command starts, one at a
time and alternating:

  plain-default  plain vLLM as usually started (no ``--dtype``, no VLLM_CPU_* env
                 but a 1 GiB KV cache, without which it does not start here);
  stack-default  ``refusal-gateway serve`` as ``make serve`` starts it;
  plain-matched  plain vLLM with the launcher's engine settings (float32, both
                 cores for OpenMP, none reserved, 1 GiB KV cache);

reads from each server's own log what vLLM resolved (dtype, OpenMP cores,
reserved cores, compile mode, KV cache), checks the generated work (greedy,
same prompts: token counts, texts, control tokens inside plain's output), and
runs the same ``vllm bench serve`` load on each (streamed, ``ignore_eos``).
The report goes to ``bench/results/explain-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
from pathlib import Path

from . import loadgen, servers, work
from .run import idle_rate

RESULTS = Path(__file__).parent / "results"
PATTERNS = {
    "dtype": r"dtype=torch\.(\w+)",
    "omp_cores": r"local_rank=0, core ids=(\[[^\]]*\])",
    "reserved_cpus": r"reserved_cpus=(\[[^\]]*\])",
    "omp_bind_env": r"VLLM_CPU_OMP_THREADS_BIND='([^']*)'",
    "compile_mode": r"'mode': <CompilationMode\.(\w+)",
    "enforce_eager": r"enforce_eager=(\w+)",
    "kv_cache_tokens": r"GPU KV cache size: ([\d,]+) tokens",
    "max_num_seqs": r"max_num_seqs=(\d+)",
}


def resolved(log: Path) -> dict:
    text = log.read_text(errors="replace")
    out = {}
    for key, pattern in PATTERNS.items():
        match = re.search(pattern, text)
        out[key] = match.group(1) if match else None
    return out


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "REFUSAL_GATEWAY_"))}


def start(kind: str, model: str, log: Path) -> servers.Running:
    port = servers.free_port()
    if kind == "plain-default":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", servers.SERVED_NAME, "--port", str(port)]  # fmt: skip
        # Without a KV-cache size vLLM CPU reserves 92 % of the node's memory and does not
        # start on a shared machine; this is the only setting given to the "usual" plain server.
        env = {**clean_env(), "VLLM_CPU_KVCACHE_SPACE": "1"}
    elif kind == "plain-f32-auto":  # the dtype matched, vLLM's own CPU pinning kept
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", servers.SERVED_NAME, "--port", str(port), "--dtype", "float32"]  # fmt: skip
        env = {**clean_env(), "VLLM_CPU_KVCACHE_SPACE": "1"}
    elif kind == "plain-matched":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", servers.SERVED_NAME, "--port", str(port), "--dtype", "float32"]  # fmt: skip
        env = {**clean_env(), "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}  # fmt: skip
    else:  # stack-default: what `make serve` runs (the demo model by name: float32, canary on)
        cmd = [sys.executable, "-m", "refusal_gateway.cli", "serve",
               "--served-model-name", servers.SERVED_NAME, "--port", str(port)]  # fmt: skip
        if model != _demo_dir():
            cmd[4:4] = ["--model", model]
        env = clean_env()
    return servers._spawn(kind.split("-")[0], cmd, {**env, "PYTHONUNBUFFERED": "1"}, port, log, 900)


def _demo_dir() -> str:
    from refusal_training.demo_model import demo_model_dir

    return str(demo_model_dir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.model is None:
        from refusal_training.demo_model import build_demo_model

        args.model = str(build_demo_model())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = args.out / "logs" / f"explain-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    control_ids = {t["id"]: t["text"] for t in work.manifest(args.model)["tokens"]}
    prompts = work.corpus_prompts(limit=args.requests)
    dataset = work.write_dataset(logs / "prompts.jsonl", prompts)
    kinds = ["plain-default", "stack-default", "plain-f32-auto", "plain-matched"]
    report: dict = {"date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "loadavg_start": os.getloadavg(), "servers": {}, "rounds": []}  # fmt: skip
    gens: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for kind in kinds if round_ % 2 == 0 else list(reversed(kinds)):
            log = logs / f"{kind}-r{round_}.log"
            print(f"[round {round_}] {kind} (load {os.getloadavg()[0]:.2f})", flush=True)
            srv = start(kind, args.model, log)
            try:
                before = _access_lines(log) if kind.startswith("stack") else None
                report["servers"].setdefault(kind, {"resolved": resolved(log), "start_s": round(srv.started_s, 1)})
                report["servers"][kind].setdefault("requests_before_benchmark", []).append(before)
                # Cold: the load right after start-up, no warm-up (a restart per round
                # without one); then the same load again, warm.
                for phase in ("cold", "warm"):
                    cpu0 = srv.cpu()
                    result = loadgen.run(srv.base_url, args.model, servers.SERVED_NAME, dataset,
                                         num_prompts=args.requests, concurrency=args.concurrency,
                                         output_len=args.output_len, stream=True,
                                         log=logs / f"{kind}.bench.log")  # fmt: skip
                    cpu1 = srv.cpu()
                    row = _row(kind, round_, phase, result, cpu0, cpu1)
                    report["rounds"].append(row)
                    print(f"  {kind} {phase}: {row['tokens_per_s']:.0f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms",
                          flush=True)  # fmt: skip
                if kind not in gens:
                    gens[kind] = work.generate(srv.base_url, servers.SERVED_NAME, prompts[:8], args.output_len)
                # What the processes burn with nothing in flight (an idle vLLM CPU engine spins).
                report["servers"][kind].setdefault("idle_cpu_per_s", []).append(
                    {k: round(v, 3) for k, v in idle_rate(srv).items()})
            finally:
                srv.stop()
    _finish(report, gens, control_ids, kinds, args.out, stamp)


def _access_lines(log: Path) -> int:
    """Requests the stack answered before the benchmark's own (the canary's), from its access log."""
    return sum(1 for line in log.read_text(errors="replace").splitlines() if "refusal_gateway.access" in line)


def _row(kind: str, round_: int, phase: str, result: dict, cpu0: dict, cpu1: dict) -> dict:
    return {
        "kind": kind, "round": round_, "phase": phase, "loadavg": os.getloadavg()[0],
                    "tokens_per_s": result["output_throughput"], "ttft_p50_ms": result["median_ttft_ms"],
                    "itl_p50_ms": result["median_itl_ms"], "output_tokens": result["total_output_tokens"],
                    "engine_cpu_s": cpu1["engine"] - cpu0["engine"], "api_cpu_s": cpu1["api"] - cpu0["api"],
                    "duration_s": result["duration"],
    }  # fmt: skip


def _finish(report: dict, gens: dict, control_ids: dict, kinds: list[str], out: Path, stamp: str) -> None:
    # Same work? Each against the matched plain server (the benchmark's reference).
    ref = gens["plain-matched"]
    work_check = {}
    for kind in ("plain-default", "stack-default"):
        hides = kind.startswith("stack")
        cmp = work.compare(ref, gens[kind], set(control_ids), hides)
        cmp["late_control_tokens_in_this_side"] = sum(
            t in control_ids for g in gens[kind] if "error" not in g for t in (g["token_ids"] or [])[1:])
        work_check[f"{kind} vs plain-matched"] = cmp
    report["work_check"] = work_check
    report["first_token_ids"] = {k: [(g.get("token_ids") or [None])[0] for g in v] for k, v in gens.items()}
    report["median"] = {
        f"{kind} {phase}": {m: round(statistics.median(r[m] for r in report["rounds"]
                                                      if r["kind"] == kind and r["phase"] == phase), 2)
                            for m in ("tokens_per_s", "ttft_p50_ms", "itl_p50_ms", "engine_cpu_s")}
        for kind in kinds for phase in ("cold", "warm")
    }  # fmt: skip
    report["loadavg_end"] = os.getloadavg()
    path = out / f"explain-{stamp}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("servers", "median", "work_check")}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
