"""Why plain vLLM's API server spends more CPU than the stack's on long prompts.

    python -m bench detok [--model DIR] [--prompt-tokens 100 1000 4000] [--tokens 16]

The growth run (README, *Prompt length to 4,000 tokens*) found the API server
of plain vLLM at 31 ms of CPU per request against the stack's 23 ms with
4,000-token prompts, while both generate 16 tokens. The difference is in the
text each side produces, not in the layer. On a refusal-token model plain vLLM
writes a control token at every step (the model's decision head lifts them
everywhere; only the stack's processor bans them after the first position),
and control tokens are special tokens, skipped in the text.

vLLM detokenises each request in the API server with the ``tokenizers``
library's ``DecodeStream``, primed with the whole prompt. A step whose token
adds text trims the stream's buffer to the last few ids; a step whose token
adds none (a skipped special token) leaves it as it was, so the next step
decodes the whole prompt again. Plain vLLM's 16 control tokens each cost a
decode of the prompt: CPU in proportion to prompt length × skipped tokens.

This command measures that on vLLM's own detokenizer class
(``FastIncrementalDetokenizer``, what the output processor calls per step), in
process and without an engine: per prompt length, the time to detokenise
``--tokens`` control tokens (plain vLLM's answer on this model) against as
many ordinary tokens (the stack's answer). It needs no server and runs in
seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

FILLER = (
    "The committee met on Tuesday to review the quarterly figures, the staffing plan "
    "and the schedule for the new building, and agreed to meet again next month. "
)


def _detokenizer(tokenizer, prompt_ids: list[int]):
    """vLLM's incremental detokenizer for one request, as its output processor makes it."""
    from vllm import SamplingParams
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    request = SimpleNamespace(request_id="bench", prompt_token_ids=prompt_ids, prompt_embeds=None,
                              sampling_params=SamplingParams(max_tokens=64))  # fmt: skip
    return IncrementalDetokenizer.from_new_request(tokenizer, request)


def time_steps(tokenizer, prompt_ids: list[int], token_id: int, steps: int, repeats: int) -> float:
    """Median seconds to detokenise ``steps`` copies of ``token_id`` one step at a time."""
    samples = []
    for _ in range(repeats):
        detok = _detokenizer(tokenizer, prompt_ids)
        started = time.perf_counter()
        for _ in range(steps):
            detok.update([token_id], False)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def measure(model_dir: Path, prompt_tokens: list[int], steps: int, repeats: int) -> dict:
    from vllm.tokenizers import get_tokenizer
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    from .work import manifest

    tokenizer = get_tokenizer(str(model_dir))
    control = next(t for t in manifest(str(model_dir))["tokens"] if t["key"] == "respond")
    ordinary = tokenizer.encode(" the", add_special_tokens=False)[0]
    filler = tokenizer.encode(FILLER * (1 + max(prompt_tokens) // 20), add_special_tokens=False)
    detok_class = type(_detokenizer(tokenizer, filler[:8])).__name__
    rows = []
    for n in prompt_tokens:
        prompt = filler[:n]
        special = time_steps(tokenizer, prompt, control["id"], steps, repeats)
        plain_text = time_steps(tokenizer, prompt, ordinary, steps, repeats)
        rows.append({"prompt_tokens": len(prompt), "control_ms": special * 1e3,
                     "ordinary_ms": plain_text * 1e3, "difference_ms": (special - plain_text) * 1e3})  # fmt: skip
    return {"model": str(model_dir), "detokenizer": detok_class,
            "fast_path": detok_class == FastIncrementalDetokenizer.__name__,
            "steps": steps, "repeats": repeats, "control_token": control["text"],
            "rows": rows}  # fmt: skip


def markdown(report: dict) -> str:
    lines = [
        f"vLLM `{report['detokenizer']}`, {report['steps']} steps per request, "
        f"median of {report['repeats']}; control token `{report['control_token']}`",
        "",
        "| prompt tokens | control tokens (plain vLLM), ms | ordinary tokens (stack), ms | difference, ms |",
        "|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['prompt_tokens']:,} | {r['control_ms']:.2f} | {r['ordinary_ms']:.2f} | "
                     f"{r['difference_ms']:+.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench detok", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", help="refusal-token model dir (default: the demo model)")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[100, 1000, 4000])
    parser.add_argument("--tokens", type=int, default=16, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    from .__main__ import _model

    report = measure(Path(_model(args.model)), args.prompt_tokens, args.tokens, args.repeats)
    print(markdown(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
