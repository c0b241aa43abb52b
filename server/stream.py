"""SSE rewriting of streamed chat and text completions, choice by choice.

Each choice is watched until its decision token has been read (text is held
while it could still be the start of a control token, so a token split across
chunks never leaks; with ``echo`` the repeated prompt before it is let through
as it comes). After that, a choice that responds passes through as vLLM wrote
it; a refused choice keeps being rewritten so its text arrives as
``delta.refusal``. Once every choice has decided to respond, the rewriter
forwards bytes untouched without parsing them — unless the client asked for
logprobs (control tokens can appear among the alternatives of any position)
or a chunk carries a special token the client asked not to see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .protocol import RequestPlan
from .refusal import CHAT_DELTA, ControlText, Decision, TextShape
from .scrub import (
    Specials,
    strip_chat_logprobs,
    strip_completion_logprobs,
    strip_prompt_logprobs,
    strip_token_ids,
)
from .vllm_json import decode

EVENT_END = b"\n\n"
DATA = b"data: "
OnDecision = Callable[[Decision, dict[str, float] | None], dict[str, Any]]


class StreamRewriter:
    """Incremental rewriter of one ``text/event-stream`` response."""

    def __init__(
        self,
        control: ControlText,
        plan: RequestPlan,
        copy_content: bool,
        on_decision: OnDecision,
        shape: TextShape = CHAT_DELTA,
        specials: Specials | None = None,
    ):
        self._control = control
        self._plan = plan
        self._shape = shape
        self._copy = copy_content
        self._on_decision = on_decision
        self._specials = specials if specials is not None and plan.skip_special else Specials([])
        self._held: dict[int, str] = {i: "" for i in range(plan.n)}  # undecided choices
        self._refused: set[int] = set()
        # Control-token probabilities seen in held chunks (when logprobs were asked for).
        self._probabilities: dict[int, dict[str, float]] = {}
        self._buffer = b""
        self._passthrough = False

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send for ``chunk`` (possibly fewer: a partial event is held)."""
        if self._passthrough:
            if not self._specials.in_bytes(chunk):
                return chunk
            self._passthrough = False  # parse this chunk: a special token to remove
        self._buffer += chunk
        out = []
        while True:
            end = self._buffer.find(EVENT_END)
            if end < 0:
                break
            event, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
            out.append(self._event(event))
        self._passthrough = self._settled() and not self._buffer
        return b"".join(out)

    def close(self) -> bytes:
        """Whatever is still buffered at the end of the stream."""
        rest, self._buffer = self._buffer, b""
        return rest

    def _settled(self) -> bool:
        """Nothing left to rewrite in events without a special token."""
        return not self._held and not self._refused and not self._plan.logprobs

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(DATA) or event.startswith(b"data: [DONE]"):
            return event
        try:
            document = decode(event[len(DATA) :])
        except (ValueError, RecursionError):
            return event
        payload = document.value
        if not isinstance(payload, dict):
            return event
        if self._plan.logprobs:
            strip_prompt_logprobs(self._control, payload)
        for choice in payload.get("choices") or []:
            if isinstance(choice, dict):
                self._choice(choice)
        return DATA + document.encode() + EVENT_END

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        strip_token_ids(self._control, choice)
        if self._plan.logprobs:
            strip_prompt_logprobs(self._control, choice)
            if self._shape.has_refusal:
                probabilities = strip_chat_logprobs(self._control, choice)
                if probabilities is not None:
                    self._probabilities[index] = probabilities
            else:
                strip_completion_logprobs(self._control, choice)
        delta = self._shape.target(choice)
        if delta is None:
            return
        text = delta.get(self._shape.field) or ""
        if index not in self._held:
            if text:
                visible = self._specials.strip(self._control.strip(text))
                self._shape.place(delta, index in self._refused, visible, self._copy)
            return
        held = self._held[index] + text
        decision, echo, rest = self._control.read(held)
        if decision.token is None and choice.get("finish_reason") is None:
            keep = self._control.held_back(held)
            if self._plan.echo or keep == len(held):
                # Not decided yet: send what cannot be part of a token, hold the rest.
                self._held[index] = held[len(held) - keep :]
                if self._shape.field in delta or held[: len(held) - keep]:
                    # Before the decision: the prompt as ``echo`` repeats it, specials and all.
                    delta[self._shape.field] = held[: len(held) - keep]
                return
        del self._held[index]
        choice["refusal_decision"] = self._on_decision(
            decision, self._probabilities.pop(index, None)
        )
        if decision.refused:
            self._refused.add(index)
        self._shape.place(
            delta,
            decision.refused,
            self._specials.strip(rest),
            self._copy,
            echo=echo,
        )
