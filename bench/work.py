"""Prompts, and the check that every side generated the same work.

Prompts are the demo corpus's ``respond`` rows that the model itself answers
(greedy first token = ``[respond]`` on plain vLLM) and on which plain vLLM
writes no control token later in its answer (:func:`select_prompts`), so
"stack without fields" and "stack with fields" (which forces ``[respond]``)
generate the same tokens as plain vLLM: a refusal would move the text into
``message.refusal`` on the stack, and a later control token — invisible in
plain vLLM's text, banned by the stack's processor — makes the two answers
part ways from there on.

The check (:func:`generate`/:func:`compare`) asks each side for the same
prompts at temperature 0 with ``ignore_eos`` and fixed ``max_tokens``, one at a
time, and compares ``usage.completion_tokens``, the token ids and the text.
What is expected to differ, and is accounted for:

- plain vLLM's first generated token is the control token; the stack hides it
  (``token_ids`` without it, text without it). Both count it in ``usage``.
- plain vLLM on a refusal-token model may emit control tokens later too (the
  stack's processor bans them after the first position); with
  ``skip_special_tokens`` they vanish from plain's text but not from its token
  ids — reported as ``plain_late_control_tokens``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import httpx


def corpus_prompts(limit: int = 400) -> list[str]:
    from importlib.resources import files

    rows = files("refusal_training").joinpath("demo/corpus.jsonl").read_text().splitlines()
    out, seen = [], set()
    for line in rows:
        row = json.loads(line)
        if row.get("label") == "respond" and row["prompt"] not in seen:
            seen.add(row["prompt"])
            out.append(row["prompt"])
        if len(out) >= limit:
            break
    return out


def manifest(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "refusal_manifest.json").read_text())


def greedy_ids(base_url: str, served: str, prompts: list[str], max_tokens: int,
               concurrency: int = 16) -> list[list[int] | None]:  # fmt: skip
    """Plain vLLM's greedy generated token ids (``ignore_eos``) for each prompt."""
    import asyncio

    async def run() -> list[list[int] | None]:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            async def one(prompt: str) -> list[int] | None:
                body = {"model": served, "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True}  # fmt: skip
                async with gate:
                    r = await client.post("/v1/chat/completions", json=body)
                return r.json()["choices"][0].get("token_ids") if r.status_code == 200 else None

            return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(run())


def select_prompts(base_url: str, served: str, model_dir: str, want: int,
                   output_len: int) -> tuple[list[str], dict]:  # fmt: skip
    """Prompts on which plain vLLM and the stack must generate the same tokens.

    Plain vLLM's greedy answer must start with ``[respond]`` (a refusal would
    move the stack's text into ``message.refusal``) and contain no control
    token after it within ``output_len`` tokens: plain vLLM may emit one there
    (invisible in its text), the stack's processor bans it and the model
    writes something else from that point on — different work.
    """
    tokens = manifest(model_dir)["tokens"]
    respond = next(t["id"] for t in tokens if t["key"] == "respond")
    control = {t["id"] for t in tokens}
    candidates = corpus_prompts(limit=max(4 * want, 64))
    ids = greedy_ids(base_url, served, candidates, output_len)
    first = [bool(i) and i[0] == respond for i in ids]
    clean = [f and not any(t in control for t in i[1:]) for f, i in zip(first, ids, strict=True)]
    chosen = [p for p, ok in zip(candidates, clean, strict=True) if ok][:want]
    stats = {"candidates": len(candidates), "respond_first": sum(first),
             "no_late_control_token": sum(clean), "chosen": len(chosen)}  # fmt: skip
    if not chosen:
        # With ignore_eos every answer runs past the model's own end, where the demo model
        # starts a new turn with a control token: keep the [respond] prompts; the texts are
        # then equal up to plain vLLM's first later control token (see compare()).
        chosen = [p for p, f in zip(candidates, first, strict=True) if f][:want]
        stats["fallback"] = "respond_first"
        stats["chosen"] = len(chosen)
    return chosen, stats


@functools.cache
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def padded_prompts(prompts: list[str], model_dir: str, target_tokens: int, count: int) -> list[str]:
    """``count`` prompts of about ``target_tokens`` prompt tokens (chat template included).

    Each one is several corpus prompts run together, the last of which is the
    question (so the greedy decision stays the one of a chosen prompt).
    """
    tok = _tokenizer(model_dir)

    def length(text: str) -> int:
        templated = tok.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=False)  # fmt: skip
        return len(tok(templated, add_special_tokens=False).input_ids)

    overhead = length("")
    sizes = [len(tok(" " + p, add_special_tokens=False).input_ids) for p in prompts]
    out = []
    for i in range(count):
        q = i % len(prompts)
        parts, total, j = [], overhead + sizes[q], i + 1
        while total < target_tokens:
            k = j % len(prompts)
            if k != q:
                parts.append(prompts[k])
                total += sizes[k]
            j += 1
        out.append(" ".join([*parts, prompts[q]]))
    return out


def write_dataset(path: Path, prompts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def generate(base_url: str, served: str, prompts: list[str], max_tokens: int,
             extra_body: dict | None = None, headers: dict | None = None) -> list[dict]:  # fmt: skip
    """One request at a time, non-streaming, greedy, ignore_eos; text + ids + usage."""
    out = []
    with httpx.Client(base_url=base_url, timeout=300, headers=headers) as client:
        for prompt in prompts:
            body = {"model": served, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True, **(extra_body or {})}  # fmt: skip
            r = client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                out.append({"error": f"HTTP {r.status_code}: {r.text[:300]}"})
                continue
            data = r.json()
            choice = data["choices"][0]
            message = choice["message"]
            out.append({
                "text": message.get("content"), "refusal": message.get("refusal"),
                "token_ids": choice.get("token_ids"),
                "completion_tokens": data["usage"]["completion_tokens"],
                "decision": (choice.get("refusal_decision") or {}).get("token"),
            })  # fmt: skip
    return out


def compare(plain: list[dict], other: list[dict], control_ids: set[int], hides_control: bool) -> dict:
    """How ``other``'s generations match plain vLLM's (see the module docstring)."""
    same_tokens = same_ids = same_text = late_control = errors = no_ids = same_prefix = 0
    diffs = []
    for i, (p, o) in enumerate(zip(plain, other, strict=True)):
        if "error" in p or "error" in o:
            errors += 1
            diffs.append({"prompt": i, "error": p.get("error") or o.get("error")})
            continue
        pid, oid = p["token_ids"] or [], o["token_ids"] or []
        late_control += sum(t in control_ids for t in pid[1:])
        expected_ids = pid[1:] if hides_control and pid and pid[0] in control_ids else pid
        # Up to plain vLLM's first later control token the two must agree token for token.
        cut = next((k for k, t in enumerate(expected_ids) if t in control_ids), len(expected_ids))
        same_prefix += bool(o["token_ids"] is None or oid[:cut] == expected_ids[:cut])
        same_tokens += p["completion_tokens"] == o["completion_tokens"]
        if o["token_ids"] is None:  # a proxy that does not pass token_ids on: texts only
            oid = expected_ids
            no_ids += 1
        same_ids += expected_ids == oid
        same_text += (p["text"] or "") == (o["text"] or o["refusal"] or "")
        if expected_ids != oid or (p["text"] or "") != (o["text"] or o["refusal"] or ""):
            diffs.append({"prompt": i, "plain_text": (p["text"] or "")[:80],
                          "other_text": (o["text"] or o["refusal"] or "")[:80],
                          "plain_ids": pid[:12], "other_ids": oid[:12]})  # fmt: skip
    n = len(plain)
    return {"prompts": n, "errors": errors, "same_completion_tokens": same_tokens,
            "same_token_ids": same_ids, "same_text": same_text,
            "same_ids_until_plain_control_token": same_prefix,
            "plain_late_control_tokens": late_control, "token_ids_not_returned": no_ids,
            "differences": diffs[:5]}  # fmt: skip
