"""Schema fuzzing of a running stack: ``python -m tests.hostile.fuzz --url URL --requests N``.

Generates requests for ``POST /v1/chat/completions`` and ``/v1/completions``
with schemathesis from vLLM's own request schemas plus the refusal fields
(:mod:`tests.hostile.schema`): schema-valid requests (positive) and
schema-violating ones (negative), half each by default. Every request must
get a complete answer or a 4xx in OpenAI's error envelope; no 5xx, no broken
answer, and the engine must not restart. Prints the figures and every
failing request; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Any

from .client import EngineWatch, Tally, dump, run_all, served_model
from .schema import CHAT_PATH, COMPLETIONS_PATH, MAX_TOKENS, fuzz_openapi, vllm_openapi

#: Integer fields whose big-but-valid values would make a CPU engine work for long.
_CAPS = {"max_tokens": 8, "max_completion_tokens": 8, "min_tokens": 8, "n": 4}


def _cap(body: Any) -> Any:
    """Keep generation short: bounds the few fields that set how much the engine works.

    Values beyond what vLLM accepts at all are left alone (they must be a 4xx),
    and a request with no ``max_tokens`` gets a small one (vLLM's default is
    the whole context).
    """
    if not isinstance(body, dict):
        return body
    for key, cap in _CAPS.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and cap < value < 100_000:
            body[key] = cap
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS
    return body


#: What a "focused" schema-valid request keeps: the fields that reach the
#: refusal layer and the engine, without the many others that would make most
#: generated requests a 400 before they get there.
FOCUS = {
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream",
    "stream_options", "n", "temperature", "top_p", "top_k", "seed", "logprobs", "top_logprobs",
    "echo", "skip_special_tokens", "ignore_eos", "return_token_ids", "response_format",
    "refusal_bias", "refusal_threshold", "refusal_temperature", "refusal_profile", "vllm_xargs",
}  # fmt: skip


def _ints(value: Any) -> Any:
    """JSON Schema integers written as integers (schemathesis also writes 4.0 for 4)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def _shape(body: Any, rng: random.Random) -> Any:
    """Of the schema-valid requests, some focused (see FOCUS) and a third streamed."""
    if not isinstance(body, dict):
        return body
    if rng.random() < 0.5:
        body = {k: _ints(v) for k, v in body.items() if k in FOCUS}
        body.pop("refusal_profile", None)  # no profiles on the server: always a 400
    if "stream" not in body and rng.random() < 0.35:
        body["stream"] = True
    return body


def generate(doc: dict[str, Any], count: int, negative_share: float = 0.5, seed: int = 0) -> list[tuple[str, Any]]:
    """``count`` request bodies, (path, body), chat and completions alternately."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(doc)
    rng = random.Random(seed)
    out: list[tuple[str, Any]] = []
    negative = round(count * negative_share)
    plan = [(GenerationMode.POSITIVE, count - negative), (GenerationMode.NEGATIVE, negative)]
    for mode, total in plan:
        for i, path in enumerate((CHAT_PATH, COMPLETIONS_PATH)):
            n = total // 2 + (total % 2 if i == 0 else 0)
            if n == 0:
                continue
            bodies: list[Any] = []
            strategy = schema[path]["POST"].as_strategy(generation_mode=mode)

            @hypothesis_seed(seed * 7 + i + (100 if mode == GenerationMode.NEGATIVE else 0))
            @settings(
                max_examples=n, phases=[Phase.generate], database=None, deadline=None,
                suppress_health_check=list(HealthCheck),
            )  # fmt: skip
            @given(strategy)
            def collect(case) -> None:
                bodies.append(case.body)  # noqa: B023 (run right here)

            collect()
            if mode == GenerationMode.POSITIVE:
                bodies = [_shape(body, rng) for body in bodies]
            out += [(path, _cap(body)) for body in bodies[:n]]
    random.Random(seed).shuffle(out)
    return out


def run(
    url: str, count: int, concurrency: int = 4, log: Path | None = None, schema_url: str | None = None,
    negative_share: float = 0.5, seed: int = 0, doc: dict[str, Any] | None = None,
    model: str | None = None,
) -> tuple[Tally, int]:
    """Fuzz ``url`` with ``count`` requests; return the figures and the restarts seen.

    ``model``: the served name schema-valid requests carry (default: the one
    the server lists).
    """
    doc = doc or fuzz_openapi(vllm_openapi(schema_url), model or served_model(url))
    cases = generate(doc, count, negative_share, seed)
    watch = EngineWatch(url, log)
    watch.begin()
    tally = Tally()
    jobs = [
        (path, dump(body), isinstance(body, dict) and body.get("stream") is True, None, None)
        for path, body in cases
    ]
    asyncio.run(run_all(url, jobs, concurrency, tally, watch))
    return tally, watch.restarts()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the stack, e.g. http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--negative-share", type=float, default=0.5,
                        help="share of schema-violating requests")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schema-url", help="a plain vLLM server's /openapi.json "
                        "(default: vLLM's app built in-process)")  # fmt: skip
    parser.add_argument("--log", type=Path, help="the launcher's log, to count its restarts")
    parser.add_argument("--save-failures", type=Path, help="write failing requests here (JSONL)")
    parser.add_argument("--model", help="served model name (default: the one GET /v1/models lists)")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    model = args.model or served_model(url)
    print(f"fuzz: {url}, model {model!r}", flush=True)
    tally, restarts = run(url, args.requests, args.concurrency, args.log,
                          args.schema_url, args.negative_share, args.seed, model=model)  # fmt: skip
    print(tally.report(restarts, "fuzz"))
    if args.save_failures:
        with args.save_failures.open("w") as out:
            for path, content, outcome in tally.failures:
                out.write(json.dumps({"path": path, "body": content.decode("utf-8", "backslashreplace"),
                                      "kind": outcome.kind, "status": outcome.status,
                                      "detail": outcome.detail}) + "\n")  # fmt: skip
    return 1 if tally.failed(restarts) else 0


if __name__ == "__main__":
    sys.exit(main())
