"""Control-token text handling for the gateway: read decisions, hide tokens, defuse input.

vLLM is asked to keep special tokens in the text (``skip_special_tokens``
false) so the layer can see the decision token; this module turns that text
back into what a client should see. All knowledge of token strings comes from
the model's manifest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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


#: How deep a request's JSON may nest (vLLM's own schemas need under 10).
MAX_JSON_DEPTH = 64


def _alternation(texts: Iterable[str]) -> re.Pattern[str]:
    """One regex for ``texts``, longest first (a token that prefixes another never wins wrongly)."""
    return re.compile("|".join(re.escape(t) for t in sorted(set(texts), key=len, reverse=True)))


class ControlText:
    """Finds, strips and defuses the control-token strings of one model."""

    def __init__(self, manifest: RefusalManifest, template_tokens: Iterable[str] = ()):
        """``template_tokens``: the tokenizer's other special tokens (``<|im_start|>`` …).

        In text that reaches the chat template they would become real
        tokens: a user message could close its own turn and forge a system
        message or earlier turns the request never sent (past a profile that
        rejects system messages), so :meth:`neutralise_json` defuses them
        there too.
        """
        self.manifest = manifest
        self.by_text = manifest.by_text()
        self.ids = frozenset(manifest.ids)
        #: ``return_tokens_as_token_ids`` spells tokens as ``token_id:<id>``.
        self.id_texts = frozenset(f"token_id:{i}" for i in manifest.ids)
        self._pattern = _alternation(self.by_text)
        self._with_template = _alternation([*self.by_text, *template_tokens])
        self.max_len = max(len(t) for t in self.by_text)

    def is_control(self, token: Any) -> bool:
        """Whether a logprobs ``token`` string is a control token."""
        return token in self.by_text or token in self.id_texts

    def strip(self, text: str) -> str:
        """``text`` with every control-token string removed."""
        return self._pattern.sub("", text)

    def read(self, text: str) -> tuple[Decision, str, str]:
        """The decision in ``text``, the text before it (an echo) and the visible rest.

        Client text is defused on the way in, so the first control-token
        string of a response is the model's decision wherever it stands:
        at the start, or after the prompt that ``echo`` repeats. Nothing is
        trimmed: the rest is exactly the detokenised text after the token,
        so ``token_ids`` (without the control id) decode to it.
        """
        match = self._pattern.search(text)
        if not match:
            return Decision(None), "", self.strip(text)
        return (
            Decision(self.by_text[match.group()]),
            text[: match.start()],
            self.strip(text[match.end() :]),
        )

    def held_back(self, text: str) -> int:
        """How many characters at the end of ``text`` may still grow into a control token."""
        for size in range(min(len(text), self.max_len - 1), 0, -1):
            tail = text[-size:]
            if any(t.startswith(tail) for t in self.by_text):
                return size
        return 0

    def neutralise(self, text: str, template: bool = False) -> str:
        """Defuse control-token strings in client text so none becomes a token.

        ``template``: the text reaches the chat template, so the tokenizer's
        other special tokens are defused as well.
        """
        pattern = self._with_template if template else self._pattern
        return pattern.sub(lambda m: m.group()[0] + WORD_JOINER + m.group()[1:], text)

    def neutralise_json(self, value: Any, template: bool = False, depth: int = 1) -> Any:
        """Defuse every string (keys too) anywhere in a request's JSON value, in place.

        Every string a client sends can reach the chat template — the message
        ``role``, content parts of any type, tool definitions and arguments,
        template kwargs — so all of them are defused, not a list of known
        places (``template``: special tokens too, see :meth:`__init__`).
        Iterative, with a depth limit: a deeply nested body gets a 400, never
        a RecursionError (``depth``: how deep ``value`` sits in the body).
        Returns the defused value (a string is immutable).
        """
        if isinstance(value, str):
            return self.neutralise(value, template)
        pattern = self._with_template if template else self._pattern
        stack: list[tuple[Any, int]] = [(value, depth)]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"request JSON nests deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(node, dict):
                for key in list(node):
                    item = node[key]
                    if isinstance(key, str) and pattern.search(key):
                        del node[key]
                        key = self.neutralise(key, template)
                        node[key] = item
                    if isinstance(item, str):
                        node[key] = self.neutralise(item, template)
                    elif isinstance(item, (dict, list)):
                        stack.append((item, depth + 1))
            elif isinstance(node, list):
                for i, item in enumerate(node):
                    if isinstance(item, str):
                        node[i] = self.neutralise(item, template)
                    elif isinstance(item, (dict, list)):
                        stack.append((item, depth + 1))
        return value


@dataclass(frozen=True)
class TextShape:
    """Where a choice's text lives in one endpoint's responses."""

    container: str | None  # "message", "delta", or None: the choice itself
    field: str  # "content" or "text"
    has_refusal: bool  # chat has OpenAI's refusal field; completions do not

    def target(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        target = choice if self.container is None else choice.get(self.container)
        return target if isinstance(target, dict) else None

    def place(
        self, target: dict[str, Any], refused: bool, text: str | None, copy: bool, echo: str = ""
    ) -> None:
        """Put a choice's visible text (after an ``echo`` prefix, if any) into ``target``."""
        if self.has_refusal:
            place_text(target, refused, text, copy, echo)
        elif text is not None or echo:
            target[self.field] = echo + (text or "")  # completions: refusal_decision tells
        else:
            target[self.field] = None


CHAT_MESSAGE = TextShape("message", "content", True)
CHAT_DELTA = TextShape("delta", "content", True)
COMPLETION_TEXT = TextShape(None, "text", False)


def place_text(
    target: dict[str, Any], refused: bool, text: str | None, copy_content: bool, echo: str = ""
) -> None:
    """Put visible ``text`` into a message or delta: ``refusal`` when refused.

    ``copy_content`` keeps the refusal text in ``content`` too (the server's
    ``refusal_content=copy`` setting); OpenAI's own shape has ``content`` null.
    An ``echo`` prefix (the request's own text repeated) stays in ``content``.
    """
    if not refused:
        target["content"] = echo + text if text is not None else (echo or None)
        return
    target["refusal"] = text
    if copy_content:
        target["content"] = echo + (text or "")
    else:
        target["content"] = echo or None
