"""Processor checks against a running stack, shared by the V1 and V2 runner test modules."""

from __future__ import annotations

import asyncio
import functools
import json
import random
from pathlib import Path

from openai import AsyncOpenAI
from refusal_plugins.vocab import COCONOT_CATEGORIES, RefusalManifest

from .server import Server

CATEGORIES = sorted(COCONOT_CATEGORIES)
#: Hang guard: waits that run out only when something hangs, never on a slow machine.
HANG_S = 600.0
ALL_DOWN = {key: -100.0 for key in CATEGORIES}
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coconot"


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """A seeded mix of CoCoNot prompts (refuse and contrast) or, without ../shared, corpus prompts."""
    files = [SHARED / "coconot_original_test.norm.jsonl", SHARED / "coconot_contrast_test.norm.jsonl"]
    if all(f.is_file() for f in files):
        rows = [json.loads(line)["prompt"] for f in files for line in f.read_text().splitlines() if line]
    else:
        from refusal_training.demo_model import load_corpus

        rows = [e.prompt for e in load_corpus()]
    return random.Random(seed).sample(rows, n)


class ModelOracle:
    """The served model run offline with transformers: what the model itself wants.

    Independent of vLLM, of the processor and of the layer: the prompt is
    rendered with the tokenizer's own chat template (as vLLM renders a chat
    request: ``add_generation_prompt``, no extra special tokens), the logits of
    the next position come from transformers' forward in float32, and the
    probabilities are a softmax over the whole vocabulary (T = 1, no bias).
    """

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.manifest = RefusalManifest.load(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def prompt_ids(self, prompt: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def probabilities(self, prompt: str) -> dict[str, float]:
        """softmax(logits)[c] at the decision position for every control token, by key."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a 4-layer model: milliseconds; no OpenMP spin beside vLLM
        try:
            with torch.no_grad():
                logits = self.model(torch.tensor([self.prompt_ids(prompt)])).logits[0, -1]
        finally:
            torch.set_num_threads(threads)
        p = torch.softmax(logits.double(), dim=0)
        return {t.key: float(p[t.id]) for t in self.manifest.tokens}


@functools.cache
def oracle_for(model_dir: Path) -> ModelOracle:
    return ModelOracle(model_dir)


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
    prompt_ids = (reply.model_extra or {}).get("prompt_token_ids")
    return [c.model_extra | {"_choice": c, "_prompt_token_ids": prompt_ids} for c in reply.choices]


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

    Ordering, not timing: the waves are sent once every long stream has
    streamed its decision (it is in the batch, decoding), and each of the four
    lanes keeps a long stream in flight until the last wave has its answer (a
    stream that ends earlier, on a fast machine, is followed by another one).
    """
    client = client_for(server)
    manifest = RefusalManifest.load(server.model_dir)
    ids = set(manifest.ids)
    prompts = sample_prompts(12, seed=1)
    alone = [
        (await decide(client, server, p))[0]["refusal_decision"]["token"] for p in prompts
    ]
    waves_done = asyncio.Event()

    async def long_stream(prompt: str, decoding: asyncio.Event) -> tuple[str | None, list[int]]:
        stream = await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": prompt}], max_tokens=400,
            temperature=0.0, stream=True, extra_body={"refusal_bias": {"safety": 100.0},
                                                      "ignore_eos": True, "return_token_ids": True},
        )
        category, tokens = None, []
        async for chunk in stream:
            for c in chunk.choices:
                extra = c.model_extra or {}
                tokens += extra.get("token_ids") or []
                if extra.get("refusal_decision"):
                    category = extra["refusal_decision"]["category"]
                    decoding.set()
        return category, tokens

    async def lane(prompt: str, decoding: asyncio.Event) -> list[tuple[str | None, list[int]]]:
        """Long streams, one after the other, until the waves are done."""
        done = [await long_stream(prompt, decoding)]
        while not waves_done.is_set():
            done.append(await long_stream(prompt, asyncio.Event()))
        return done

    decoding = [asyncio.Event() for _ in range(4)]
    longs = [asyncio.create_task(lane(p, e)) for p, e in zip(prompts[:4], decoding, strict=True)]
    # Hang guard only: each long stream decides within a few engine steps.
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in decoding)), HANG_S)
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
    try:
        results = await gather_limited(jobs, limit=64)
    finally:
        waves_done.set()
    for got, want in zip(results, expect, strict=True):
        for choice, w in zip(got, want, strict=True):
            d = choice["refusal_decision"]
            if isinstance(w, str) and w.startswith("="):
                assert str(d["token"]) == w[1:], (d, w)
            else:
                assert d["category"] == w, (d, w)
    for task in longs:
        for category, tokens in await asyncio.wait_for(task, HANG_S):
            assert category == "safety"
            # A control token comes first (where token_ids show it), never again.
            later = tokens[1:] if tokens and tokens[0] in ids else tokens
            assert len(later) >= 399 and not ids.intersection(later), tokens


#: Probabilities this close to the threshold, or to each other when they pick
#: c*, are ties: float noise between two runtimes may decide them either way.
TIE = 1e-3


def paper_rule(p: dict[str, float], threshold: float) -> str | None:
    """The paper's categorical rule (plugins/core.py, step 2) on probabilities at T = 1.

    c* = the most likely refusal category; emit c* when p[c*] >= threshold,
    else ``respond`` (None: no refusal category).
    """
    c_star = max(CATEGORIES, key=lambda c: p[c])
    return c_star if p[c_star] >= threshold else None


def is_tie(p: dict[str, float], threshold: float) -> bool:
    """Whether float noise could flip :func:`paper_rule` on ``p``."""
    first, second = sorted((p[c] for c in CATEGORIES), reverse=True)[:2]
    if abs(first - threshold) < TIE:
        return True
    return first >= threshold and first - second < TIE  # which category is c*


async def threshold_rule(server: Server, prompts: list[str], threshold: float) -> int:
    """Decisions with ``refusal_threshold`` follow the paper's rule; return how many were checked.

    The expected decision comes from the model's own probabilities computed
    offline (:class:`ModelOracle`), never from what the processor reports.
    """
    oracle = oracle_for(server.model_dir)
    client = client_for(server)
    thresholded = await gather_limited(
        [decide(client, server, p, refusal_threshold=threshold, return_token_ids=True) for p in prompts]
    )
    checked = 0
    for prompt, t in zip(prompts, thresholded, strict=True):
        # The oracle sees exactly the prompt the engine saw.
        assert t[0]["_prompt_token_ids"] == oracle.prompt_ids(prompt), prompt
        p = oracle.probabilities(prompt)
        if is_tie(p, threshold):
            continue
        got = t[0]["refusal_decision"]
        assert got["category"] == paper_rule(p, threshold), (prompt, threshold, p, got)
        checked += 1
    return checked
