"""Processor checks against a running stack, shared by the V1 and V2 runner test modules."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

from openai import AsyncOpenAI
from refusal_plugins.vocab import COCONOT_CATEGORIES, RefusalManifest

from .server import Server

CATEGORIES = sorted(COCONOT_CATEGORIES)
ALL_DOWN = {key: -100.0 for key in CATEGORIES}
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coconot"


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """A seeded mix of CoCoNot prompts (refuse and contrast) or, without ../shared, corpus prompts."""
    files = [SHARED / "coconot_original_test.norm.jsonl", SHARED / "coconot_contrast_test.norm.jsonl"]
    if all(f.is_file() for f in files):
        rows = [json.loads(line)["prompt"] for f in files for line in f.read_text().splitlines() if line]
    else:
        from refusal_gateway.tools.demo_model import load_corpus

        rows = [e.prompt for e in load_corpus()]
    return random.Random(seed).sample(rows, n)


def client_for(server: Server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=300)


async def decide(client: AsyncOpenAI, server: Server, prompt: str, **extra) -> list[dict]:
    body = {k: v for k, v in extra.items() if k.startswith("refusal_") or k == "return_token_ids"}
    kwargs = {k: v for k, v in extra.items() if k not in body}
    kwargs.setdefault("max_tokens", 1)
    kwargs.setdefault("temperature", 0.0)
    reply = await client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": prompt}], extra_body=body, **kwargs
    )
    return [c.model_extra | {"_choice": c} for c in reply.choices]


async def gather_limited(coros, limit: int = 48):
    gate = asyncio.Semaphore(limit)

    async def one(coro):
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def bias_sweep(server: Server, prompts: list[str], biases: list[float]) -> dict[str, list[float]]:
    """Share of prompts decided as category c when only c is biased, per bias value."""
    client = client_for(server)
    rates: dict[str, list[float]] = {}
    for category in CATEGORIES:
        jobs = [
            decide(client, server, p, refusal_bias={category: b}) for b in biases for p in prompts
        ]
        results = await gather_limited(jobs)
        rates[category] = []
        for i, _ in enumerate(biases):
            chunk = results[i * len(prompts) : (i + 1) * len(prompts)]
            hits = sum(r[0]["refusal_decision"]["category"] == category for r in chunk)
            rates[category].append(hits / len(prompts))
    return rates


async def isolation_under_batching(server: Server) -> None:
    """Per-request settings never leak between requests that share batches.

    Long streams are admitted first; short requests with other settings join
    and leave while they run (continuous batching); n>1 requests and a repeated
    prompt (prefix cache hits) carry opposite settings. Unbiased requests must
    decide exactly as they do alone.
    """
    client = client_for(server)
    manifest = RefusalManifest.load(server.model_dir)
    ids = set(manifest.ids)
    prompts = sample_prompts(12, seed=1)
    alone = [
        (await decide(client, server, p))[0]["refusal_decision"]["token"] for p in prompts
    ]

    async def long_stream(prompt: str) -> tuple[str, list[int]]:
        reply = await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": prompt}], max_tokens=400,
            temperature=0.0, extra_body={"refusal_bias": {"safety": 100.0},
                                         "ignore_eos": True, "return_token_ids": True},
        )
        c = reply.choices[0]
        return c.model_extra["refusal_decision"]["category"], c.model_extra["token_ids"]

    longs = [asyncio.create_task(long_stream(p)) for p in prompts[:4]]
    await asyncio.sleep(0.5)  # the long ones are decoding when the rest arrive
    shared_prompt = prompts[5]
    jobs, expect = [], []
    for wave in range(3):
        for i, p in enumerate(prompts):
            kind = (i + wave) % 4
            if kind == 0:
                jobs.append(decide(client, server, p, refusal_bias={"humanizing": 100.0}))
                expect.append(["humanizing"])
            elif kind == 1:
                jobs.append(decide(client, server, p, refusal_bias=ALL_DOWN))
                expect.append([None])
            elif kind == 2:
                jobs.append(decide(client, server, p))
                expect.append(["=" + str(alone[i])])
            else:
                jobs.append(decide(client, server, p, n=3, temperature=1.0,
                                   refusal_bias={"incomplete": 100.0}))
                expect.append(["incomplete"] * 3)
        # Same prompt, opposite settings: prefix-cache hits must not carry settings over.
        jobs.append(decide(client, server, shared_prompt, refusal_bias={"unsupported": 100.0}))
        expect.append(["unsupported"])
        jobs.append(decide(client, server, shared_prompt, refusal_bias={"unsupported": -100.0,
                                                                       **ALL_DOWN}))
        expect.append([None])
    assert not any(t.done() for t in longs), "long requests must still be decoding"
    results = await gather_limited(jobs, limit=64)
    # The long ones were in the batch while every wave joined and left.
    assert not all(t.done() for t in longs), "waves must finish while long requests decode"
    for got, want in zip(results, expect, strict=True):
        for choice, w in zip(got, want, strict=True):
            d = choice["refusal_decision"]
            if isinstance(w, str) and w.startswith("="):
                assert str(d["token"]) == w[1:], (d, w)
            else:
                assert d["category"] == w, (d, w)
    for task in longs:
        category, tokens = await task
        assert category == "safety"
        assert tokens[0] in ids and not ids.intersection(tokens[1:])


def paper_rule(p: dict[str, float], threshold: float) -> str | None:
    """The paper's categorical threshold rule on the model's own probabilities."""
    c_star = max(CATEGORIES, key=lambda c: p.get(c, 0.0))
    return c_star if p.get(c_star, 0.0) >= threshold else None


async def threshold_rule(server: Server, prompts: list[str], threshold: float) -> int:
    """Decisions with ``refusal_threshold`` follow the paper's rule; return how many were checked."""
    client = client_for(server)
    raw = await gather_limited(
        [decide(client, server, p, logprobs=True, top_logprobs=10) for p in prompts]
    )
    thresholded = await gather_limited(
        [decide(client, server, p, refusal_threshold=threshold) for p in prompts]
    )
    checked = 0
    for r, t in zip(raw, thresholded, strict=True):
        p = r[0]["refusal_decision"]["probabilities"]
        c_star = max(CATEGORIES, key=lambda c: p.get(c, 0.0))
        if abs(p.get(c_star, 0.0) - threshold) < 1e-3:
            continue  # on the threshold itself: float noise decides
        assert t[0]["refusal_decision"]["category"] == paper_rule(p, threshold), (p, t)
        checked += 1
    return checked
