"""The frozen base model's view of a prompt at the decision position.

The decision of a refusal-token model is its first assistant token, so what
the model "knows" about a prompt when it decides is the final hidden state
(after the last norm, i.e. the input of the output projection) at the last
prompt position — the newline that ends ``<|im_start|>assistant``. A head
fitted on these vectors (:mod:`.decision_head`) and written into the output
projection's control-token rows gives, in vLLM, exactly the logits it gave here.

Extraction is the expensive part on a CPU (a forward pass per prompt), so the
vectors are cached per (model, prompt) under ``<cache>/features/``: a refit,
a leave-one-source-out sweep or another head costs no forward pass.

A prompt may come with a client's system message (``systems``): clients send
their own, the chat template then drops the model's default one, and the
decision position sees a different context (docs/quality/experiments.md,
*A client's system prompt*). Such a rendering is cached under its own key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .system_prompts import Before, Context, chat_messages

logger = logging.getLogger(__name__)

FEATURES_VERSION = 1  # bump when what is extracted changes


def _model_key(model_dir: Path, layer: int | None = None) -> str:
    h = hashlib.sha256(f"features-v{FEATURES_VERSION}".encode())
    if layer is not None:  # the final layer keeps the key it always had
        h.update(f"layer={layer}".encode())
    for name in ("config.json", "convert_info.json", "chat_template.jinja"):
        path = model_dir / name
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _prompt_key(prompt: str, before: Before = None) -> str:
    """The cache key of a rendering: the prompt's own hash when the template's default
    system message is used (the key features always had), else one of both texts, or of
    the whole context when earlier exchanges come before the prompt."""
    if isinstance(before, Context):
        if before.earlier:
            text = json.dumps(["context", before.system, before.earlier, prompt])
            return hashlib.sha256(text.encode("utf-8")).hexdigest()
        before = before.system
    if before is None:
        return hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    return hashlib.sha256(json.dumps(["system", before, prompt]).encode("utf-8")).hexdigest()


class FeatureCache:
    """Vectors per prompt for one model, kept in one ``.npz`` + index file pair."""

    def __init__(self, root: Path, model_dir: Path, layer: int | None = None):
        self.dir = root / "features" / _model_key(model_dir, layer)
        self._index: dict[str, int] = {}
        self._rows = np.zeros((0, 0), dtype=np.float32)
        index, rows = self.dir / "index.json", self.dir / "rows.npy"
        if index.is_file() and rows.is_file():
            self._index = json.loads(index.read_text())
            self._rows = np.load(rows)

    def get(self, keys: Sequence[str]) -> tuple[list[int], np.ndarray | None]:
        """Positions of the keys (:func:`_prompt_key`) not cached yet, and the cached
        rows (None if any is missing)."""
        missing = [i for i, k in enumerate(keys) if k not in self._index]
        if missing:
            return missing, None
        return [], self._rows[[self._index[k] for k in keys]]

    def add(self, keys: Sequence[str], rows: np.ndarray) -> None:
        new = [(k, r) for k, r in zip(keys, rows, strict=True) if k not in self._index]
        if not new:
            return
        start = len(self._index)
        block = np.stack([r for _, r in new]).astype(np.float32)
        self._rows = block if self._rows.size == 0 else np.concatenate([self._rows, block])
        for offset, (key, _) in enumerate(new):
            self._index[key] = start + offset
        self.dir.mkdir(parents=True, exist_ok=True)
        # Each file replaced whole, rows first: a run killed mid-write (or a reader in
        # another process) finds an index no newer than the rows, never a torn file.
        np.save(self.dir / "rows.tmp.npy", self._rows)
        (self.dir / "rows.tmp.npy").replace(self.dir / "rows.npy")
        (self.dir / "index.tmp.json").write_text(json.dumps(self._index))
        (self.dir / "index.tmp.json").replace(self.dir / "index.json")


def prompt_ids(tokenizer, prompt: str, system: Before = None) -> list[int]:
    """A user prompt rendered by the model's chat template, up to the decision position;
    after a client's ``system`` message (or a whole :class:`.Context`) when one is given."""
    ids = tokenizer.apply_chat_template(chat_messages(prompt, system), add_generation_prompt=True,
                                        tokenize=True)  # fmt: skip
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _capture(model, layers: Sequence[int | None]):
    """A callable running ``model`` once and returning, per entry of ``layers``, the
    input of that decoder layer, or the final state (after the last norm) for None.

    Without the final state the pass stops at the highest layer asked for: nothing
    above it is needed."""
    from .middle_head import LayerInput, Reached

    middle = sorted({layer for layer in layers if layer is not None})
    final = None in layers
    captured = {layer: LayerInput(model, layer, stop=not final and layer == middle[-1])
                for layer in middle}  # fmt: skip

    def run(**inputs):
        out = {}
        try:
            out[None] = model.model(**inputs).last_hidden_state
        except Reached:
            pass
        return [out[layer] if layer is None else captured[layer].value for layer in layers]

    return run


def shared_prefixes(ids: Sequence[Sequence[int]], groups: Sequence[str]) -> list[tuple[int, list[int]]]:
    """Prompts that share a rendered context, and how many leading tokens they share.

    ``groups`` names each prompt's context (its system message, earlier turns); the
    prompts of one group share their leading tokens (the template's system turn, the
    earlier exchanges: 47 % of the default rendering's tokens, 73 % of the copies after
    earlier turns), which :func:`_extract` then runs once per group instead of once per
    prompt. Each entry: the shared length (the longest common prefix of the group's
    token ids, always leaving every prompt at least its last token) and the members'
    positions. A lone prompt shares nothing (running its context apart gains nothing)."""
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    out = []
    for rows in members.values():
        shared = 0
        if len(rows) > 1:
            first, limit = ids[rows[0]], min(len(ids[i]) for i in rows) - 1
            while shared < limit and all(ids[i][shared] == first[shared] for i in rows):
                shared += 1
        out.append((shared, rows))
    return out


def _extract(
    model_dir: Path,
    prompts: Sequence[str],
    batch_size: int,
    device: str,
    layers: Sequence[int | None] = (None,),
    systems: Sequence[Before] | None = None,
) -> list[np.ndarray]:
    """The decision-position vectors of ``prompts`` (each after its client system
    message in ``systems``, if any) at each of ``layers`` (a decoder layer's input, or
    None for the final state), all from one pass.

    Prompts rendered in the same context share its leading tokens: those run once per
    context (:func:`shared_prefixes`) and every batch of its prompts continues from
    their cached keys and values, at the positions they would have had (the recipe's
    copies after earlier turns are three-quarters shared context). The vectors are those
    of the whole rendering run at once, to float32 rounding (unit-tested)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wanted = list(layers)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    capture = _capture(model, wanted)
    systems = systems if systems is not None else [None] * len(prompts)
    ids = [prompt_ids(tokenizer, p, s) for p, s in zip(prompts, systems, strict=True)]
    out = [np.zeros((len(ids), model.config.hidden_size), dtype=np.float32) for _ in wanted]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    started, done = time.monotonic(), 0
    contexts = [repr(s) for s in systems]
    with torch.inference_mode():
        for shared, rows in shared_prefixes(ids, contexts):
            context = _run_context(model, capture, ids[rows[0]][:shared], device)
            order = sorted(rows, key=lambda i: len(ids[i]))  # little padding per batch
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                hidden = capture(**_continuation([ids[i][shared:] for i in chunk], shared, context,
                                                 pad, device))  # fmt: skip
                for target, h in zip(out, hidden, strict=True):
                    target[chunk] = h[:, -1].float().cpu().numpy()
                done += len(chunk)
                if done // (batch_size * 20) > (done - len(chunk)) // (batch_size * 20):
                    logger.info("features: %d/%d prompts (%.0fs)", done, len(ids), time.monotonic() - started)
    return out


def _run_context(model, capture, context_ids: list[int], device: str):
    """The keys and values of a shared context (None when nothing is shared)."""
    import torch
    from transformers import DynamicCache

    if not context_ids:
        return None
    cache = DynamicCache(config=model.config)
    capture(input_ids=torch.tensor([context_ids], device=device), past_key_values=cache, use_cache=True)
    return cache


def _continuation(suffixes: list[list[int]], shared: int, context, pad: int, device: str) -> dict:
    """A left-padded batch of ``suffixes`` that continues ``context`` (``shared`` cached
    tokens): the mask covers the context, and each suffix's positions follow it with no
    gap for the padding (RoPE sees the distances of the whole rendering)."""
    import copy

    import torch

    width = max(len(s) for s in suffixes)
    batch = torch.full((len(suffixes), width), pad, dtype=torch.long)
    mask = torch.zeros((len(suffixes), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    positions = torch.full((len(suffixes), width), shared, dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        batch[row, width - len(suffix) :] = torch.tensor(suffix)
        mask[row, shared + width - len(suffix) :] = 1
        positions[row, width - len(suffix) :] = torch.arange(shared, shared + len(suffix))
    inputs = {"input_ids": batch.to(device), "attention_mask": mask.to(device),
              "position_ids": positions.to(device)}  # fmt: skip
    if context is not None:
        cache = copy.deepcopy(context)
        cache.batch_repeat_interleave(len(suffixes))
        inputs |= {"past_key_values": cache, "use_cache": True}
    return inputs


def decision_features(
    model_dir: Path,
    prompts: Sequence[str],
    cache_root: Path,
    batch_size: int = 16,
    device: str = "cpu",
    layer: int | None = None,
) -> np.ndarray:
    """[N, hidden] hidden states at the decision position, cached per prompt: the final
    ones (after the last norm) by default, or the input of decoder layer ``layer``."""
    return decision_features_at(model_dir, prompts, cache_root, [layer], batch_size, device)[0]


def decision_features_at(
    model_dir: Path,
    prompts: Sequence[str],
    cache_root: Path,
    layers: Sequence[int | None],
    batch_size: int = 16,
    device: str = "cpu",
    systems: Sequence[Before] | None = None,
) -> list[np.ndarray]:
    """:func:`decision_features` of each of ``layers``; whatever is not cached yet is
    extracted for every layer that lacks it in one pass over the model. ``systems``:
    per prompt, a client system message, a :class:`.Context` or None (the template's
    default)."""
    systems = list(systems) if systems is not None else [None] * len(prompts)
    keys = [_prompt_key(p, s) for p, s in zip(prompts, systems, strict=True)]
    caches = {layer: FeatureCache(cache_root, model_dir, layer) for layer in dict.fromkeys(layers)}
    todo: dict[str, tuple[str, Before]] = {}
    lacking = []
    for layer, cache in caches.items():
        missing, _ = cache.get(keys)
        if missing:
            lacking.append(layer)
            todo.update((keys[i], (prompts[i], systems[i])) for i in missing)
    if todo:
        logger.info("extracting decision features of %d prompts at layers %s on %s",
                    len(todo), ["final" if x is None else x for x in lacking], device)  # fmt: skip
        rendered = list(todo.values())
        rows = _extract(model_dir, [p for p, _ in rendered], batch_size, device, layers=lacking,
                        systems=[s for _, s in rendered])  # fmt: skip
        for layer, block in zip(lacking, rows, strict=True):
            caches[layer].add(list(todo), block)
    out = []
    for layer in layers:
        _, rows = caches[layer].get(keys)
        assert rows is not None
        out.append(rows)
    return out
