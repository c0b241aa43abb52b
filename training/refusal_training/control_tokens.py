"""The control tokens of ``refusal-gateway train``: their texts, ids and embedding rows.

Its own module because turning a base tokenizer and model into ones with
control tokens is a step with its own rules (below), independent of the data
and of the training loop; torch and tokenizers are imported only inside the
functions that need them.

**Tokens.** The control tokens (``--token key=text``, ``--tokens JSON``,
default the paper's strings) are added as special tokens (one id each,
``normalized=False``, skipped when decoding with ``skip_special_tokens``).
The embedding matrix grows to ``len(tokenizer)`` when it is smaller (it is
never padded to a multiple, nor shrunk when a base model already has padding
rows), and the new tokens' input and output rows (both, when the embeddings
are untied) start at the mean of the base vocabulary's rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from refusal_plugins.vocab import Scheme, default_token_text, scheme_keys

logger = logging.getLogger(__name__)


def token_texts(scheme: Scheme, overrides: dict[str, str]) -> dict[str, str]:
    """Token text per key of the scheme, in manifest order; overrides validated."""
    keys = scheme_keys(scheme)
    unknown = set(overrides) - set(keys)
    if unknown:
        raise ValueError(
            f"unknown token keys for the {scheme} scheme: {sorted(unknown)} (keys: {keys})"
        )
    texts = {key: overrides.get(key, default_token_text(key)) for key in keys}
    if any(not t.strip() for t in texts.values()):
        raise ValueError("control-token texts must not be empty")
    if len(set(texts.values())) != len(texts):
        raise ValueError(f"control-token texts must be distinct: {texts}")
    return texts


def parse_token_overrides(pairs: Sequence[str], mapping: str | None) -> dict[str, str]:
    """``key=text`` pairs and/or a JSON object (inline or a file path) -> {key: text}."""
    out: dict[str, str] = {}
    if mapping:
        inline = mapping.lstrip().startswith("{")
        data = json.loads(mapping if inline else Path(mapping).read_text())
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError("--tokens must be a JSON object of key -> token text")
        out.update(data)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--token expects key=text, got {pair!r}")
        out[key.strip()] = text
    return out


def add_control_tokens(tokenizer, texts: Sequence[str]) -> tuple[list[int], list[int]]:
    """Add ``texts`` as special tokens; return (their ids, the ids that are new).

    A text already in the vocabulary keeps its id (and its trained rows); it
    may not be one of the tokenizer's own special tokens (eos, pad, ...).
    """
    from tokenizers import AddedToken

    own_specials = set(tokenizer.all_special_tokens) - set(tokenizer.extra_special_tokens or [])
    clash = set(texts) & own_specials
    if clash:
        raise ValueError(
            f"control tokens {sorted(clash)} are already special tokens of the base tokenizer"
        )
    before = tokenizer.get_vocab()
    previous_specials = set(tokenizer.extra_special_tokens or [])
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in texts]},
        replace_extra_special_tokens=False,
    )
    ids = [tokenizer.convert_tokens_to_ids(t) for t in texts]
    for text, tid in zip(texts, ids, strict=True):
        if tokenizer.encode(text, add_special_tokens=False) != [tid]:
            raise ValueError(f"control token {text!r} does not encode to its single id {tid}")
        if text in before:  # e.g. retraining a refusal-token model: fine; an ordinary word: odd
            log = logger.info if text in previous_specials else logger.warning
            log("control token %r is already in the vocabulary (id %d); reusing it", text, tid)
    return ids, [tid for text, tid in zip(texts, ids, strict=True) if text not in before]


def tied_embeddings(model) -> bool:
    """Whether the output embeddings share the input embeddings' weight."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def init_rows_with_mean(model, new_ids: Sequence[int], base_vocab: int) -> None:
    """Set the new tokens' embedding rows to the mean of the base vocabulary's rows.

    The mean keeps a new token's initial logit and hidden state in the range
    of ordinary tokens (a random row can dominate or vanish). Rows of the base
    vocabulary (ids < ``base_vocab``, the new ids excluded) form the mean; the
    output matrix gets its own mean when it is not tied to the input one.
    """
    import torch

    if not new_ids:
        return
    idx = torch.tensor(sorted(set(new_ids)), dtype=torch.long)
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and not tied_embeddings(model):
        matrices.append(out.weight)
    with torch.no_grad():
        for weight in matrices:
            keep = torch.ones(min(base_vocab, weight.shape[0]), dtype=torch.bool)
            keep[idx[idx < keep.numel()]] = False
            mean = weight[: keep.numel()][keep].float().mean(dim=0)
            weight[idx.to(weight.device)] = mean.to(weight.dtype).to(weight.device)
        bias = getattr(out, "bias", None)
        if bias is not None:
            keep = torch.ones(min(base_vocab, bias.shape[0]), dtype=torch.bool)
            keep[idx[idx < keep.numel()]] = False
            bias[idx.to(bias.device)] = bias[: keep.numel()][keep].float().mean().to(bias.dtype)


def resize_embeddings(model, tokenizer, new_ids: Sequence[int], base_vocab: int) -> None:
    """Grow the embeddings to ``len(tokenizer)`` (never pad, never shrink) and mean-init new rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        logger.info("embeddings resized from %d to %d rows", rows, len(tokenizer))
    init_rows_with_mean(model, new_ids, base_vocab)
