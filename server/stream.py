"""SSE rewriting of streamed chat and text completions, choice by choice.

Each choice is watched only until its decision token has been read (the text
is held while it could still be the start of a control token, so a token split
across chunks never leaks). After that, a choice that responds passes through
as vLLM wrote it; a refused choice keeps being rewritten so its text arrives
as ``delta.refusal``. Once every choice has decided to respond, the rewriter
forwards bytes untouched without parsing them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .refusal import CHAT_DELTA, ControlText, Decision, TextShape, strip_logprobs

EVENT_END = b"\n\n"
DATA = b"data: "


class StreamRewriter:
    """Incremental rewriter of one ``text/event-stream`` response."""

    def __init__(
        self,
        control: ControlText,
        n: int,
        copy_content: bool,
        on_decision: Callable[[Decision, dict[str, float] | None], dict[str, Any]],
        shape: TextShape = CHAT_DELTA,
    ):
        self._control = control
        self._shape = shape
        self._copy = copy_content
        self._on_decision = on_decision
        self._held: dict[int, str] = {i: "" for i in range(n)}  # undecided choices
        self._refused: set[int] = set()
        # Decided choices whose next text still starts with the token's space.
        self._trim: set[int] = set()
        # Control-token probabilities seen in held chunks (when logprobs were asked for).
        self._probabilities: dict[int, dict[str, float]] = {}
        self._buffer = b""
        self._passthrough = False

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send for ``chunk`` (possibly fewer: a partial event is held)."""
        if self._passthrough:
            return chunk
        self._buffer += chunk
        out = []
        while not self._passthrough:
            end = self._buffer.find(EVENT_END)
            if end < 0:
                break
            event, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
            out.append(self._event(event))
        if self._passthrough:
            out.append(self._buffer)
            self._buffer = b""
        return b"".join(out)

    def close(self) -> bytes:
        """Whatever is still buffered at the end of the stream."""
        rest, self._buffer = self._buffer, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(DATA) or event.startswith(b"data: [DONE]"):
            return event
        try:
            payload = json.loads(event[len(DATA) :])
        except ValueError:
            return event
        if not isinstance(payload, dict) or not payload.get("choices"):
            return event  # usage-only chunks, errors
        for choice in payload["choices"]:
            self._choice(choice)
        if not self._held and not self._refused and not self._trim:
            self._passthrough = True
        return DATA + json.dumps(payload, ensure_ascii=False).encode() + EVENT_END

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        delta = self._shape.target(choice)
        if delta is None:
            return
        field = self._shape.field
        probabilities = strip_logprobs(self._control, choice)
        if probabilities is not None:
            self._probabilities[index] = probabilities
        text = delta.get(field) or ""
        if index in self._held:
            held = self._held[index] + text
            if self._control.undecided(held) and choice.get("finish_reason") is None:
                self._held[index] = held
                if field in delta:
                    delta[field] = ""
                return
            del self._held[index]
            decision, visible = self._control.split(held)
            choice["refusal_decision"] = self._on_decision(
                decision, self._probabilities.pop(index, None)
            )
            if decision.refused:
                self._refused.add(index)
            if decision.token is not None and held == decision.token.text:
                self._trim.add(index)  # the token came alone; its space comes next
            self._shape.place(delta, decision.refused, visible, self._copy)
            return
        if not text:
            return
        if index in self._trim:
            self._trim.discard(index)
            text = text[1:] if text.startswith(" ") else text
        self._shape.place(delta, index in self._refused, self._control.strip(text), self._copy)
