"""What a client must never see in a response: the control token outside the decision.

The decision token is hidden from the text (:mod:`refusal_gateway.refusal`),
but vLLM reports it elsewhere too: as a generated id in ``token_ids``, as an
entry of ``logprobs`` (with its offset counted in ``text_offset``), and —
since logprobs are the model's raw distribution, before the processor bans
control tokens — among the ``top_logprobs`` alternatives of any position,
including the prompt's (``prompt_logprobs``). The layer also asks vLLM to keep
special tokens in the text (it reads the decision there); when the client did
not ask for them (``skip_special_tokens``, true by default), the other
special tokens (``<|end|>``, ``<|user|>`` …) are taken out again here, so the
client sees what plain vLLM would show, minus the control token.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .refusal import ControlText


def special_tokens(model_dir: Path | None, control: Collection[str]) -> list[str]:
    """The tokenizer's special tokens other than the ``control`` token strings (from its files)."""
    if model_dir is None:
        return []
    found: set[str] = set()
    tokenizer = Path(model_dir) / "tokenizer.json"
    if tokenizer.is_file():
        for entry in json.loads(tokenizer.read_text()).get("added_tokens", []):
            if entry.get("special"):
                found.add(entry["content"])
    config = Path(model_dir) / "tokenizer_config.json"
    if config.is_file():
        for entry in (json.loads(config.read_text()).get("added_tokens_decoder") or {}).values():
            if isinstance(entry, dict) and entry.get("special"):
                found.add(entry["content"])
    return sorted(t for t in found if t and t not in control)


class Specials:
    """Removes the tokenizer's special-token strings from text a client reads."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        ordered = sorted(tokens, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if tokens else None
        # The same strings as they appear in vLLM's JSON, to skip parsing clean chunks.
        forms = {json.dumps(t, ensure_ascii=a)[1:-1].encode() for t in tokens for a in (True, False)}
        self._bytes = re.compile(b"|".join(map(re.escape, forms))) if tokens else None

    def strip(self, text: str) -> str:
        return self._pattern.sub("", text) if self._pattern else text

    def in_bytes(self, raw: bytes) -> bool:
        return bool(self._bytes and self._bytes.search(raw))


def strip_token_ids(control: ControlText, choice: dict[str, Any]) -> None:
    """Drop control ids from a choice's generated ``token_ids`` (decode(ids) == text)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list) and control.ids.intersection(i for i in ids if isinstance(i, int)):
        choice["token_ids"] = [i for i in ids if i not in control.ids]


def strip_chat_logprobs(control: ControlText, choice: dict[str, Any]) -> dict[str, float] | None:
    """Drop control tokens from a chat choice's ``logprobs.content`` and its alternatives.

    Returns the control-token probabilities at the decision step, read from
    the removed entry's ``top_logprobs`` (vLLM's raw logprobs: the model's own
    distribution, before bias or threshold), or None when there was none.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    kept, probabilities = [], None
    for entry in logprobs["content"]:
        if not isinstance(entry, dict):
            kept.append(entry)
            continue
        tops = entry.get("top_logprobs")
        if control.is_control(entry.get("token")):
            if probabilities is None:
                probabilities = _probabilities(control, tops)
            continue
        if isinstance(tops, list):
            entry["top_logprobs"] = [
                t for t in tops if not (isinstance(t, dict) and control.is_control(t.get("token")))
            ]
        kept.append(entry)
    logprobs["content"] = kept
    return probabilities


def _probabilities(control: ControlText, tops: Any) -> dict[str, float]:
    out = {}
    for top in tops or []:
        if isinstance(top, dict) and top.get("token") in control.by_text:
            logprob = top.get("logprob")
            if isinstance(logprob, (int, float)):
                out[control.by_text[top["token"]].key] = math.exp(logprob)
    return out


def strip_completion_logprobs(control: ControlText, choice: dict[str, Any]) -> None:
    """Drop the control token from a text completion's parallel logprobs lists.

    ``text_offset`` of every later token moves back by the removed token's
    length, so offsets keep pointing into the text the client reads.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("tokens"), list):
        return
    tokens = logprobs["tokens"]
    drop = [i for i, t in enumerate(tokens) if control.is_control(t)]
    lists = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    if drop:
        offsets = logprobs.get("text_offset")
        if isinstance(offsets, list) and len(offsets) == len(tokens):
            shift, shifted = 0, []
            for i, offset in enumerate(offsets):
                if i in drop:
                    shift += _control_length(control, tokens[i])
                    continue
                shifted.append(offset - shift if isinstance(offset, int) else offset)
            logprobs["text_offset"] = shifted
        for name in lists[:3]:
            values = logprobs.get(name)
            if isinstance(values, list) and len(values) == len(tokens):
                logprobs[name] = [v for i, v in enumerate(values) if i not in drop]
    tops = logprobs.get("top_logprobs")
    if isinstance(tops, list):
        logprobs["top_logprobs"] = [
            {k: v for k, v in top.items() if not control.is_control(k)}
            if isinstance(top, dict) else top
            for top in tops
        ]  # fmt: skip


def _control_length(control: ControlText, token: str) -> int:
    if token in control.by_text:
        return len(token)
    return len(control.manifest.by_id()[int(token.removeprefix("token_id:"))].text)


def strip_prompt_logprobs(control: ControlText, holder: dict[str, Any]) -> None:
    """Drop control ids from the alternatives of ``prompt_logprobs`` (id -> logprob)."""
    entries = holder.get("prompt_logprobs")
    if not isinstance(entries, list):
        return
    names = {str(i) for i in control.ids}
    holder["prompt_logprobs"] = [
        {k: v for k, v in e.items() if k not in names} if isinstance(e, dict) else e
        for e in entries
    ]
