"""Helpers shared by the ported cases (the demo model's tokenizer and chat template)."""

from __future__ import annotations


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt token ids vLLM renders for ``messages`` (with the generation prompt)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as one user turn in the demo model's chat template, as a raw completion prompt.

    The demo model is a chat model: on a bare text prompt it ends at once, where
    upstream's base models (opt-125m) go on; the README tells completions clients to
    format the prompt with the chat template themselves.
    """
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def without_stop(tokenizer, token_ids: list[int]) -> list[int]:
    """``token_ids`` less a trailing EOS (the stop token, which vLLM never puts in the text)."""
    if token_ids and token_ids[-1] == tokenizer.eos_token_id:
        return token_ids[:-1]
    return token_ids
