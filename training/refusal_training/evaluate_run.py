"""One ``refusal-gateway eval`` run: the first pass, the consistency check, the sweeps.

The orchestration between the client (:mod:`.evaluate_client`), the offline
rule (:mod:`.evaluate_decisions`) and the figures (:mod:`.evaluate_metrics`);
the outputs are written by :mod:`.evaluate_report`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from refusal_plugins.vocab import RESPOND_KEY

from .evaluate_client import Client
from .evaluate_decisions import Decision, Settings, offline_decisions, offline_exact
from .evaluate_metrics import breakdown, sweep_point
from .evaluate_report import write_outputs
from .evaluate_rows import EvalError, EvalRow, load_rows
from .system_prompts import Context

logger = logging.getLogger(__name__)


@dataclass
class Options:
    data: list[Path]
    url: str = "http://localhost:8000"
    model: str | None = None
    api_key: str | None = None
    concurrency: int = 8
    settings: Settings = field(default_factory=Settings)
    bias_sweep: list[float] | None = None
    threshold_sweep: list[float] | None = None
    sweep_mode: str = "auto"  # auto | requests
    out: Path | None = None
    limit: int | None = None
    seed: int = 0
    timeout_s: float = 120.0
    max_attempts: int = 8
    progress: bool = True
    plot: bool = True
    system: str | None = None  # a system message before every prompt
    earlier: tuple[tuple[str, str], ...] = ()  # (user, assistant) exchanges before every prompt
    wrap: str | None = None  # every prompt is sent inside this text, at PROMPT_SLOT
    transport: httpx.AsyncBaseTransport | None = None  # tests


#: Where ``--wrap`` puts each prompt.
PROMPT_SLOT = "{prompt}"


def control_keys(decisions: Sequence[Decision]) -> list[str]:
    """The model's control keys (``respond`` first), from the reported probabilities."""
    keys: dict[str, None] = {RESPOND_KEY: None}
    for d in decisions:
        if d.probabilities:
            keys.update(dict.fromkeys(d.probabilities))
    return list(keys)


async def _sweep(
    client: Client,
    rows: Sequence[EvalRow],
    base: Sequence[Decision],
    keys: Sequence[str],
    kind: str,
    values: Sequence[float],
    settings: Settings,
    offline: bool,
) -> dict[str, Any]:
    """The points of one sweep: offline where exact, the other rows as requests."""
    point_settings = [
        settings.with_bias(v) if kind == "bias" else settings.with_threshold(v) for v in values
    ]
    probabilities = [d.probabilities for d in base]
    chosen: list[list[str | None]] = []
    jobs: list[tuple[str, Settings]] = []
    where: list[tuple[int, int]] = []
    if kind == "threshold" and not all(0.0 <= v <= 1.0 for v in values):
        raise EvalError(f"threshold sweep values must be in [0, 1], got {list(values)}")
    for j, s in enumerate(point_settings):
        if kind == "bias":
            for key, b in s.bias.items():
                if abs(b) > 100:
                    raise EvalError(
                        f"refusal_bias.{key} {b:g} is outside [-100, 100] at sweep value {values[j]:g}"
                    )
        keys_j = offline_decisions(probabilities, keys, s) if offline else [None] * len(rows)
        chosen.append(keys_j)
        for i, k in enumerate(keys_j):
            if k is None:
                jobs.append((rows[i].prompt, s))
                where.append((j, i))
    if jobs:
        for (j, i), d in zip(where, await client.decide_all(jobs, f"{kind} sweep"), strict=True):
            chosen[j][i] = d.key
    mode = (
        "offline"
        if not jobs
        else "requests"
        if len(jobs) == len(rows) * len(values)
        else "offline+requests"
    )
    return {
        "values": list(values),
        "mode": mode,
        "requests": len(jobs),
        "settings": [s.body() for s in point_settings],
        "points": [
            {"value": v, **sweep_point(rows, c)} for v, c in zip(values, chosen, strict=True)
        ],
    }


async def run_eval(options: Options) -> dict[str, Any]:
    rows, files = load_rows(options.data, options.limit, options.seed)
    if options.wrap is not None:  # the decisions are of what was sent
        rows = [replace(r, prompt=options.wrap.replace(PROMPT_SLOT, r.prompt)) for r in rows]
    client = Client(
        options.url, options.model, options.api_key, options.concurrency, options.timeout_s,
        options.max_attempts, options.progress, options.transport,
        Context(options.system, options.earlier),
    )  # fmt: skip
    settings = options.settings
    started = time.monotonic()
    base = await client.decide_all([(r.prompt, settings) for r in rows], "decisions")
    keys = control_keys(base)
    # Does the offline rule reproduce what the server did? (It should, unless the
    # server applies settings we do not know, such as its default profile.)
    consistency: dict[str, Any] = {"checked": 0, "mismatches": 0}
    exact = offline_exact(settings)
    if exact:
        predicted = offline_decisions([d.probabilities for d in base], keys, settings)
        pairs = [(p, d.key) for p, d in zip(predicted, base, strict=True) if p is not None]
        consistency = {"checked": len(pairs), "mismatches": sum(p != k for p, k in pairs)}
        if consistency["mismatches"]:
            logger.warning(
                "%d of %d decisions differ from the rule applied to the reported probabilities: "
                "the server applies settings this run does not know (a default profile?); "
                "sweeps are sent as requests",
                consistency["mismatches"], consistency["checked"],
            )  # fmt: skip
    offline = exact and consistency["mismatches"] == 0 and options.sweep_mode == "auto"
    report: dict[str, Any] = {
        "url": options.url,
        "model": client.model,
        "files": files,
        "limit": options.limit,
        "seed": options.seed,
        "system": options.system,
        "earlier": [list(e) for e in options.earlier],
        "wrap": options.wrap,
        "settings": settings.body(),
        "request": "chat completion, temperature 0, max_tokens 1: the first token is the decision",
        "control_keys": keys,
        "results": breakdown(rows, base),
        "offline_rule_check": consistency,
        "sweeps": {},
    }
    for kind, values in (("bias", options.bias_sweep), ("threshold", options.threshold_sweep)):
        if values:
            sweep_offline = offline and offline_exact(
                settings.with_threshold(0.5) if kind == "threshold" else settings
            )
            report["sweeps"][kind] = await _sweep(
                client, rows, base, keys, kind, values, settings, sweep_offline
            )
    report["requests_sent"] = client.sent
    report["retries"] = client.retries
    report["seconds"] = round(time.monotonic() - started, 1)
    if options.out is not None:
        write_outputs(report, rows, base, options.out, plot=options.plot)
    return report
