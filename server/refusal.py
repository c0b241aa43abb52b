"""Control-token text handling for the gateway: read decisions, hide tokens, defuse input.

vLLM is asked to keep special tokens in the text (``skip_special_tokens``
false) so the layer can see the decision token; this module turns that text
back into what a client should see. All knowledge of token strings comes from
the model's manifest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from refusal_plugins.vocab import ControlToken, RefusalManifest

#: Inserted after the opening character of a control-token string found in
#: client text: invisible, and it stops the tokenizer from matching the token.
WORD_JOINER = "\u2060"


@dataclass(frozen=True)
class Decision:
    """The decision of one choice, as read from its first token."""

    token: ControlToken | None  # None: the model emitted no control token

    @property
    def refused(self) -> bool:
        return self.token is not None and self.token.key != "respond"

    @property
    def key(self) -> str:
        """Metric label: the control key, or ``none`` when no token was emitted."""
        return self.token.key if self.token else "none"

    def source(self, probabilities: dict[str, float] | None, controlled: bool) -> str:
        """Whose decision this was (the metric label ``source``).

        ``forced``: the request used refusal controls and the emitted token is
        not the model's own most likely control token; ``model``: otherwise;
        ``unknown``: the model's probabilities are not known.
        """
        if probabilities is None:
            return "unknown"
        if not controlled or self.token is None or not probabilities:
            return "model"
        own = max(probabilities, key=probabilities.__getitem__)
        return "model" if own == self.token.key else "forced"

    def to_json(
        self, probabilities: dict[str, float] | None = None, source: str = "unknown"
    ) -> dict[str, Any]:
        """The ``refusal_decision`` extension of a choice.

        ``probabilities``: control key -> the model's own p at the decision
        step (softmax over the vocabulary, before bias or threshold), or null
        when unknown; ``forced``: whether bias/threshold changed the token
        (null when unknown).
        """
        t = self.token
        return {
            "token": t.text if t else None,
            "category": t.key if t and self.refused else None,
            "refused": self.refused,
            "forced": None if source == "unknown" else source == "forced",
            "probabilities": probabilities,
        }


class ControlText:
    """Finds, strips and defuses the control-token strings of one model."""

    def __init__(self, manifest: RefusalManifest):
        self.manifest = manifest
        self.by_text = manifest.by_text()
        # Longest first, so a token that prefixes another never wins wrongly.
        texts = sorted(self.by_text, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(t) for t in texts))
        self.max_len = max(len(t) for t in texts)

    def strip(self, text: str) -> str:
        """``text`` with every control-token string removed."""
        return self._pattern.sub("", text)

    def split(self, text: str) -> tuple[Decision, str]:
        """Read the decision at the start of ``text``; return it and the visible rest."""
        match = self._pattern.match(text)
        if not match:
            return Decision(None), self.strip(text)
        rest = text[match.end() :]
        if rest.startswith(" "):
            rest = rest[1:]  # the space the model writes after the token
        return Decision(self.by_text[match.group()]), self.strip(rest)

    def undecided(self, buffered: str) -> bool:
        """Whether ``buffered`` may still grow into a control token (keep waiting)."""
        return len(buffered) < self.max_len and any(
            t.startswith(buffered) for t in self.by_text
        )

    def neutralise(self, text: str) -> str:
        """Defuse control-token strings in client text so none becomes a token."""
        return self._pattern.sub(lambda m: m.group()[0] + WORD_JOINER + m.group()[1:], text)

    def neutralise_messages(self, messages: Any) -> None:
        """Defuse every text of a chat ``messages`` list, in place."""
        if not isinstance(messages, list):
            return
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                message["content"] = self.neutralise(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part["text"] = self.neutralise(part["text"])


@dataclass(frozen=True)
class TextShape:
    """Where a choice's text lives in one endpoint's responses."""

    container: str | None  # "message", "delta", or None: the choice itself
    field: str  # "content" or "text"
    has_refusal: bool  # chat has OpenAI's refusal field; completions do not

    def target(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        target = choice if self.container is None else choice.get(self.container)
        return target if isinstance(target, dict) else None

    def place(self, target: dict[str, Any], refused: bool, text: str | None, copy: bool) -> None:
        if self.has_refusal:
            place_text(target, refused, text, copy)
        else:
            target[self.field] = text  # completions: the text stays; refusal_decision tells


CHAT_MESSAGE = TextShape("message", "content", True)
CHAT_DELTA = TextShape("delta", "content", True)
COMPLETION_TEXT = TextShape(None, "text", False)


def place_text(target: dict[str, Any], refused: bool, text: str | None, copy_content: bool) -> None:
    """Put visible ``text`` into a message or delta: ``refusal`` when refused.

    ``copy_content`` keeps the refusal text in ``content`` too (the server's
    ``refusal_content=copy`` setting); OpenAI's own shape has ``content`` null.
    """
    if not refused:
        target["content"] = text
        return
    target["refusal"] = text
    target["content"] = text if copy_content else None


def strip_logprobs(control: ControlText, choice: dict[str, Any]) -> dict[str, float] | None:
    """Drop control-token entries from a choice's ``logprobs.content``.

    Returns the control-token probabilities at the decision step, read from
    the removed entry's ``top_logprobs`` (vLLM's raw logprobs: the model's own
    distribution, before bias or threshold), or None when there was none.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    texts = control.by_text
    kept, probabilities = [], None
    for entry in logprobs["content"]:
        if isinstance(entry, dict) and entry.get("token") in texts:
            if probabilities is None:
                probabilities = {
                    texts[top["token"]].key: math.exp(top["logprob"])
                    for top in entry.get("top_logprobs") or []
                    if isinstance(top, dict) and top.get("token") in texts
                }
            continue
        kept.append(entry)
    logprobs["content"] = kept
    return probabilities
