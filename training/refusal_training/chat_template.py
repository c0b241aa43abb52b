"""The chat template of ``refusal-gateway train``: how turns are rendered and ended.

Its own module because what a prompt looks like and which token ends the
assistant's turn are decided by the base model's template, not by the data or
the training loop, and vLLM must see exactly the same rendering.

**Chat template.** The base template is kept unchanged: a prompt is the base
template's rendering of the user turn with the generation prompt, and the
model learns to emit the control token as the first assistant token, followed
by the response and the token that ends an assistant turn in that template
(``<|im_end|>``, ``<|eot_id|>``, ... found by rendering a turn; the eos
otherwise, and it is added to ``generation_config.json``'s eos ids by
:func:`generation_config` so vLLM stops there). A base model without a chat template gets
:data:`DEFAULT_CHAT_TEMPLATE` with its own eos (and bos, if it has one).
*History:* earlier assistant turns are rendered by the base template as given.
The gateway returns text without control tokens, so clients send history
without them, and training uses single-turn prompts only: the decision is
learnt for the newest assistant turn, and earlier turns are ordinary context.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

#: For base models without a chat template (as in the demo model, but with
#: the model's own end-of-sequence text): role tags are plain text.
#: ``@BOS@`` / ``@EOS@`` become Jinja string literals of the tokenizer's texts.
DEFAULT_CHAT_TEMPLATE = (
    "{{ @BOS@ }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + @EOS@ }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def default_chat_template(tokenizer) -> str:
    """:data:`DEFAULT_CHAT_TEMPLATE` with the tokenizer's own eos / bos texts baked in."""
    if tokenizer.eos_token is None:
        raise ValueError("the base tokenizer has no eos token; cannot end assistant turns")
    literals = {
        "BOS": json.dumps(tokenizer.bos_token or ""),
        "EOS": json.dumps(tokenizer.eos_token),
    }
    return re.sub(r"@(BOS|EOS)@", lambda m: literals[m.group(1)], DEFAULT_CHAT_TEMPLATE)


def ensure_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer the default chat template; True if it did."""
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = default_chat_template(tokenizer)
    logger.info("base model has no chat template; using the default one")
    return True


def _is_special(tokenizer, token_id: int) -> bool:
    """A special token of the tokenizer, named in its map or only flagged as added-special."""
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or (added is not None and added.special)


def turn_end_id(tokenizer) -> int:
    """The token that closes an assistant turn in the chat template (eos if none is found).

    Rendering a finished assistant turn shows what the template puts after
    the content; a special token there (``<|im_end|>``, ``<|eot_id|>``) is
    what the model should emit to end its turn.
    """
    sentinel = "Zq7xRefusalSentinel"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sentinel}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as exc:  # templates raise arbitrary errors
        logger.info("could not render an assistant turn (%s); ending turns with eos", exc)
        return tokenizer.eos_token_id
    if sentinel in text:
        tail = tokenizer.encode(text.split(sentinel, 1)[1], add_special_tokens=False)
        if tail and _is_special(tokenizer, tail[0]):
            return tail[0]
    return tokenizer.eos_token_id


def generation_config(base: Path, tokenizer, end_id: int):
    """The base model's generation config, with the turn end among its eos ids."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(base, local_files_only=True)
    except OSError:
        config = GenerationConfig()
    eos = config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    for tid in (end_id, tokenizer.eos_token_id):
        if tid is not None and tid not in eos_ids:
            eos_ids.append(tid)
    config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if config.pad_token_id is None:
        config.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    return config
