"""Small builders shared by the unit tests (no vLLM, no model)."""

from __future__ import annotations

import json

from refusal_plugins.vocab import (
    COCONOT_CATEGORIES,
    ControlToken,
    RefusalManifest,
    default_token_text,
    scheme_keys,
)


def categorical_manifest(first_id: int = 100) -> RefusalManifest:
    keys = scheme_keys("categorical")
    return RefusalManifest(
        scheme="categorical",
        tokens=tuple(
            ControlToken(k, default_token_text(k), first_id + i, COCONOT_CATEGORIES.get(k))
            for i, k in enumerate(keys)
        ),
    )


def sse(*events: dict | str) -> bytes:
    """An SSE body as vLLM writes it."""
    out = b""
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        out += b"data: " + data.encode() + b"\n\n"
    return out


def chunk(index: int, content: str | None = None, finish: str | None = None, role: bool = False) -> dict:
    delta: dict = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def parse_sse(body: bytes) -> list[dict | str]:
    events = []
    for block in body.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: "), block
        data = block[len(b"data: "):].decode()
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
