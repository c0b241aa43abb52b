"""``refusal-gateway eval``: how well a running deployment decides, measured over HTTP.

    refusal-gateway eval --url http://localhost:8000 harmful.jsonl benign.jsonl --out eval/ \\
        [--bias-sweep=-8:8:2] [--threshold-sweep 0.1:0.9:0.1] [--profile strict] [--bias safety=2]

Any server that speaks our fields (``refusal_bias``, ``refusal_threshold``,
``refusal_temperature``, ``refusal_profile``) and answers with
``refusal_decision``: this measures what clients get, through the served
stack, where ``refusal-gateway score`` measures a model directory offline.

**Data.** JSONL files with ``prompt``, ``label`` (``refuse`` | ``respond``) and
optionally ``category`` (a CoCoNot name, its key such as ``safety``, or
``respond`` / null for none): the format of ``refusal-gateway train`` and
``score``. For ``respond`` rows the category says what the prompt looks like
(CoCoNot's contrast set). ``--limit N`` takes a seeded sample of N rows per file.

**Requests.** One chat completion per row: the prompt as the only user
message, ``temperature: 0``, ``max_tokens: 1``. The first generated token of a
refusal-token model is its decision, so one token is the whole decision (the
answer text is not judged). Requests go ``--concurrency`` at a time on
keep-alive connections that expire before vLLM's 5 s idle timeout; a 503 or
429 is retried after its ``Retry-After`` (bounded), connection errors with a
short back-off; any other error stops the run with the server's message.

**Figures**, per file, per labelled category and over all rows: the refusal
rate on should-refuse rows, the over-refusal rate on should-respond rows, the
AUROC of the model's own p(refuse) (the summed refusal categories of
``refusal_decision.probabilities``; skipped for rows whose response carries
none) and category accuracy: among refused should-refuse rows with a
category, the share refused under that category (``category_accuracy``), and,
from the probabilities, the share whose most likely refusal category is that
category, refused or not (``category_accuracy_most_likely``).

**Sweeps.** ``--bias-sweep`` adds each value to ``refusal_bias.refuse`` (every
refusal category, on top of ``--bias``); ``--threshold-sweep`` sets
``refusal_threshold`` to each value (one threshold for every category, in
place of ``--threshold``). Each point is the refusal rate on should-refuse rows
against the over-refusal on should-respond rows: the trade-off curve
(``tradeoff.png``). A point is computed **offline** from the probabilities of
the first pass wherever that is exact, and only the remaining rows are sent:

* the decision at temperature 0 is the most likely control token after bias:
  ``argmax_c log p_c + b_c`` (the log-normaliser cancels), exact for any bias;
* the threshold rule compares ``p[c*] = softmax(biased logits / T)[c*]`` over the
  whole vocabulary; the reported probabilities are that softmax at T = 1, and
  the non-control mass is ``1 - sum p_c``, so at ``refusal_temperature`` 1 (the
  default) it is exact too (the rule is :class:`refusal_plugins.rule.ShadowRule`,
  the processor's own rule on reported probabilities);
* rows the rule cannot settle are sent as real requests: no probabilities in
  the response, a near tie (within 1e-4, below float32 agreement), a
  probability that underflowed to 0 that the bias could lift to the top;
* everything is sent when the offline rule is not exact or not known: a
  ``--profile`` (its settings live on the server), ``refusal_temperature`` other
  than 1 with a threshold, or a first pass whose decisions the rule does not
  reproduce (the server applies settings we do not know, e.g. its default
  profile). ``--sweep-mode requests`` sends every point regardless.

Outputs in ``--out``: ``eval.json`` (every number), ``eval.md`` (tables),
``tradeoff.png`` (with sweeps; needs matplotlib, the ``train`` extra) and
``decisions.jsonl`` (the first pass, one line per row).

The work is split by job: rows (:mod:`.evaluate_rows`), decisions and the
offline rule (:mod:`.evaluate_decisions`), figures (:mod:`.evaluate_metrics`),
HTTP (:mod:`.evaluate_client`), the run (:mod:`.evaluate_run`) and outputs
(:mod:`.evaluate_report`); this module is the command line, and re-exports
their names as ``refusal_training.evaluate``'s API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from .evaluate_client import KEEPALIVE_S, MAX_RETRY_AFTER_S, Client, retry_after
from .evaluate_decisions import TIE, Decision, Settings, offline_decisions, offline_exact
from .evaluate_metrics import breakdown, p_refuse, rates, summarize, sweep_point
from .evaluate_report import markdown, plot_tradeoff, settings_text, write_outputs
from .evaluate_rows import ALL, NO_CATEGORY, EvalError, EvalRow, category_key, file_names, load_rows
from .evaluate_run import PROMPT_SLOT, Options, control_keys, run_eval

__all__ = [
    "ALL", "KEEPALIVE_S", "MAX_RETRY_AFTER_S", "NO_CATEGORY", "TIE", "Client", "Decision",
    "EvalError", "EvalRow", "Options", "Settings", "breakdown", "category_key", "control_keys",
    "file_names", "load_rows", "main", "markdown", "offline_decisions", "offline_exact",
    "options_from_args", "p_refuse", "parse_assignment", "parse_values", "parser",
    "plot_tradeoff", "rates", "retry_after", "run_eval", "settings_from_args", "settings_text",
    "summarize", "sweep_point", "write_outputs",
]  # fmt: skip

DESCRIPTION = (
    "Send labelled JSONL prompts (prompt, label refuse/respond, optional category) to any "
    "server with the refusal fields (temperature 0, max_tokens 1: the first token is the "
    "decision) and report per file and per category: refusal rate on should-refuse rows, "
    "over-refusal on should-respond rows, AUROC of the model's own p(refuse) from "
    "refusal_decision.probabilities, category accuracy; optional bias and threshold sweeps "
    "(trade-off curve). Writes eval.json, eval.md, decisions.jsonl and tradeoff.png to --out. "
    "See refusal_training.evaluate."
)


def parse_values(text: str) -> list[float]:
    """``a,b,c`` or ``start:stop:step`` (inclusive of stop), or both mixed with commas."""
    values: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            try:
                start, stop, step = (float(x) for x in part.split(":"))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected start:stop:step, got {part!r}"
                ) from None
            if step <= 0 or stop < start:
                raise argparse.ArgumentTypeError(f"empty range {part!r}")
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            values.extend(round(start + i * step, 10) for i in range(n))
        else:
            try:
                values.append(float(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a number: {part!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("no values")
    return list(dict.fromkeys(values))


def parse_assignment(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER, got {text!r}") from None


def parser(prog: str = "refusal-gateway eval") -> argparse.ArgumentParser:
    """The flags of ``refusal-gateway eval``."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    p.add_argument(
        "data",
        nargs="+",
        type=Path,
        help="JSONL files: prompt, label (refuse/respond), optional category",
    )
    p.add_argument(
        "--url", default="http://localhost:8000", help="the server (with or without /v1)"
    )
    p.add_argument("--model", help="the model to ask (default: the first of /v1/models)")
    p.add_argument("--api-key", help="sent as Authorization: Bearer (a policy file's API key)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument(
        "--profile", help="refusal_profile of every request (makes sweeps send requests)"
    )
    p.add_argument("--system", metavar="TEXT",
                   help="a system message before every prompt (your deployment's own: it "
                   "replaces the model's default and moves its decisions)")  # fmt: skip
    p.add_argument("--earlier", type=Path, metavar="FILE",
                   help="a JSON list of chat messages (user and assistant, alternating, user "
                   "first) before every prompt: a conversation's earlier turns move the "
                   "decision too")  # fmt: skip
    p.add_argument("--wrap", type=Path, metavar="FILE",
                   help="a text file with {prompt} in it: every prompt is sent inside it (e.g. "
                   "a transcript written into the user message, docs/quality/wrap-*.txt)")  # fmt: skip
    p.add_argument("--bias", type=parse_assignment, action="append", default=[], metavar="KEY=N",
                        help="a fixed refusal_bias entry of every request (repeatable), e.g. safety=2")  # fmt: skip
    p.add_argument("--threshold", action="append", default=[], metavar="N|KEY=N",
                        help="a fixed refusal_threshold: one number, or KEY=N entries (repeatable)")  # fmt: skip
    p.add_argument(
        "--refusal-temperature", type=float, help="refusal_temperature of every request"
    )
    p.add_argument("--bias-sweep", type=parse_values, metavar="VALUES",
                        help="values added to refusal_bias.refuse, e.g. -8:8:2 or -4,0,4 "
                        "(write --bias-sweep=-8:8:2 when the first value is negative)")  # fmt: skip
    p.add_argument("--threshold-sweep", type=parse_values, metavar="VALUES",
                        help="refusal_threshold values, e.g. 0.1:0.9:0.1. At refusal_temperature 1 "
                        "and without --profile both sweeps are computed from the first pass's "
                        "probabilities (exact: the processor's rule) and only rows it cannot "
                        "settle are sent, so they cost almost nothing; see --sweep-mode")  # fmt: skip
    p.add_argument("--sweep-mode", choices=("auto", "requests"), default="auto",
                        help="auto: offline where exact, requests otherwise; requests: send every point")  # fmt: skip
    p.add_argument(
        "--out", type=Path, help="directory for eval.json, eval.md, decisions.jsonl, tradeoff.png"
    )
    p.add_argument("--limit", type=int, help="a seeded sample of at most N rows per file")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per request (default 120)")
    p.add_argument(
        "--max-attempts",
        type=int,
        default=8,
        help="per request, on 503/429/5xx and connection errors",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip tradeoff.png")
    p.add_argument(
        "--json", action="store_true", help="print eval.json instead of the Markdown"
    )
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    threshold: float | dict[str, float] | None = None
    for item in args.threshold:
        if "=" in item:
            if isinstance(threshold, float):
                raise EvalError("--threshold: one number or KEY=N entries, not both")
            key, value = parse_assignment(item)
            threshold = {**(threshold or {}), key: value}
        else:
            if threshold is not None:
                raise EvalError("--threshold: one number or KEY=N entries, not both")
            threshold = float(item)
    bias: dict[str, float] = {}
    for key, value in args.bias:
        bias[key] = bias.get(key, 0.0) + value
    return Settings(bias, threshold, args.refusal_temperature, args.profile)


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        data=list(args.data), url=args.url, model=args.model, api_key=args.api_key,
        concurrency=args.concurrency, settings=settings_from_args(args),
        bias_sweep=args.bias_sweep, threshold_sweep=args.threshold_sweep,
        sweep_mode=args.sweep_mode, out=args.out, limit=args.limit, seed=args.seed,
        timeout_s=args.timeout_s, max_attempts=args.max_attempts,
        progress=not args.no_progress, plot=not args.no_plot, system=args.system,
        earlier=read_earlier(args.earlier) if args.earlier else (),
        wrap=read_wrap(args.wrap) if args.wrap else None,
    )  # fmt: skip


def read_wrap(path: Path) -> str:
    """``--wrap``: a text file that contains ``{prompt}`` once (its final newline dropped)."""
    try:
        text = path.read_text().removesuffix("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--wrap {path}: {e}") from None
    if text.count(PROMPT_SLOT) != 1:
        raise EvalError(f"--wrap {path}: the text must contain {PROMPT_SLOT} exactly once")
    return text


def read_earlier(path: Path) -> tuple[tuple[str, str], ...]:
    """``--earlier``: the (user, assistant) exchanges of a JSON list of chat messages."""
    try:
        messages = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"--earlier {path}: {e}") from None
    roles = ["user", "assistant"] * (len(messages) // 2) if isinstance(messages, list) else None
    if (not messages or roles is None or len(roles) != len(messages)
            or any(not isinstance(m, dict) or m.get("role") != r or not isinstance(m.get("content"), str)
                   for m, r in zip(messages, roles, strict=True))):  # fmt: skip
        raise EvalError(f"--earlier {path}: a JSON list of user and assistant messages, alternating, "
                        "user first, each with string content")  # fmt: skip
    return tuple((u["content"], a["content"]) for u, a in zip(messages[::2], messages[1::2], strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``refusal-gateway eval``; print the Markdown (or the JSON with ``--json``)."""
    args = parser().parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    try:
        report = asyncio.run(run_eval(options_from_args(args)))
    except EvalError as e:
        raise SystemExit(f"eval: {e}") from None
    print(json.dumps(report, indent=2) if args.json else markdown(report))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
