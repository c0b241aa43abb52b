"""Supervised fine-tuning of a refusal-token model (loss on the assistant turn only).

One training example is a chat: the user's prompt rendered with the model's
own chat template (generation prompt included), then the assistant turn
``<control token> <response><eos>``. The assistant turn is scored, and the
decision token can be weighted up: it is the one token the server acts on.
``prompt_weight`` (default 0) also scores the prompt's own tokens as plain
language modelling, and ``prompt_dropout`` (default 0) hides a random share of
the prompt's tokens in each batch (the labels keep them): both help a model
trained from scratch rely on what a prompt says rather than on its exact form.

The loop is shared by the demo build (a from-scratch model, every parameter
trained) and ``refusal-gateway train`` (an existing model, full or LoRA): only
parameters with ``requires_grad`` are optimised, batches go to the model's
device, and an optional :class:`Checkpointer` sees the complete loop state
after every step, so a run can be resumed bit for bit.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .loop_state import Checkpointer, LoopState, capture_rng, restore_rng

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE", "Checkpointer", "Encoded", "Example", "LoopState", "PromptTooLong", "TrainConfig",
    "encode", "train",
]  # fmt: skip

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """A prompt, the control token the model must emit first, and a response."""

    prompt: str
    control: str
    response: str


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside the assistant turn
    decision_index: int  # position (in labels) of the control token


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    decision_weight: float = 3.0
    max_length: int = 128
    seed: int = 0
    prompt_weight: float = 0.0  # weight of next-token loss on the prompt (0: assistant turn only)
    prompt_dropout: float = 0.0  # share of prompt tokens hidden (replaced by pad) in each batch


class PromptTooLong(ValueError):
    """The rendered prompt leaves no room for the decision token within ``max_length``."""


def encode(
    tokenizer,
    example: Example,
    max_length: int,
    eos_id: int | None = None,
    keep_prompt: bool = False,
) -> Encoded:
    """Token ids and labels of one example, at most ``max_length`` tokens.

    By default the prompt side is truncated first (from the left, keeping at
    least 8 prompt tokens). With ``keep_prompt`` the prompt is kept whole,
    since the decision depends on all of it, and the response is clipped
    instead, losing its end-of-turn token (the model is not taught to stop
    mid-sentence); a prompt that leaves no room for the decision token raises
    :class:`PromptTooLong`.

    ``eos_id`` is the token that ends the assistant turn (default: the
    tokenizer's eos); chat models whose template closes turns with another
    token (``<|im_end|>``, ``<|eot_id|>``) pass that one.
    """
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    control_id = tokenizer.convert_tokens_to_ids(example.control)
    body = tokenizer.encode(" " + example.response, add_special_tokens=False)
    answer = [control_id, *body, eos]
    if keep_prompt:
        prompt_ids = list(prompt_ids)
        room = max_length - len(prompt_ids)
        if room < 1:
            raise PromptTooLong(
                f"prompt of {len(prompt_ids)} tokens does not fit max_length {max_length}"
            )
        answer = answer[:room]
    else:
        room = max_length - len(answer)
        if room < 8:  # keep some prompt; clip the response instead
            answer = [*answer[: max_length - 8 - 1], eos]
            room = 8
        prompt_ids = list(prompt_ids)[-room:]
    return Encoded(
        input_ids=prompt_ids + answer,
        labels=[IGNORE] * len(prompt_ids) + answer,
        decision_index=len(prompt_ids),
    )


def _batch(items: Sequence[Encoded], pad_id: int, decision_weight: float, prompt_weight: float = 0.0):
    """Padded ids, labels, loss weights, attention mask and which prompt positions may be hidden."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    weights = torch.zeros((len(items), width))
    attention = torch.zeros((len(items), width), dtype=torch.long)
    in_prompt = torch.zeros((len(items), width), dtype=torch.bool)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention[i, :n] = 1
        in_prompt[i, : e.decision_index] = True
        weights[i, :n] = (labels[i, :n] != IGNORE).float()
        if prompt_weight > 0:
            labels[i, : e.decision_index] = ids[i, : e.decision_index]
            weights[i, : e.decision_index] = prompt_weight
        weights[i, e.decision_index] = decision_weight
    return ids, labels, weights, attention, in_prompt


def _length_grouped_batches(
    encoded: Sequence[Encoded], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """One epoch of batches of similar length (less padding), in random order."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    while len(order) % batch_size:  # top up so every batch is full
        order.append(order[rng.randrange(len(encoded))])
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        group = sorted(order[start : start + window], key=lambda i: len(encoded[i].input_ids))
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def train(
    model,
    tokenizer,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    eos_id: int | None = None,
    keep_prompt: bool = False,
    checkpointer: Checkpointer | None = None,
    lr_scales: Mapping[str, float] | None = None,
    max_minutes: float | None = None,
) -> list[float]:
    """Train ``model`` in place; return the loss per step (for the build log).

    Only parameters with ``requires_grad`` are trained (LoRA freezes the
    rest). ``eos_id`` and ``keep_prompt`` are passed to :func:`encode`. With a ``checkpointer`` the run starts from its latest checkpoint,
    if any, and the returned losses cover every step, restored ones included.
    ``lr_scales`` maps a parameter-name substring to a learning-rate
    multiplier (first match wins): LoRA's new control-token rows start
    identical and must travel much further than the low-rank adapters.
    """
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    encoded = [encode(tokenizer, e, config.max_length, eos_id, keep_prompt) for e in examples]
    if not encoded:
        raise ValueError("no training examples")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Never hidden by prompt_dropout: special and added tokens (the chat template's markers).
    special = torch.tensor(
        sorted(set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))),
        dtype=torch.long,
    )
    device = next(model.parameters()).device
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def scale_of(name: str) -> float:
        return next((v for k, v in (lr_scales or {}).items() if k in name), 1.0)

    groups: dict[tuple[float, bool], list] = {}
    for n, p in trainable:
        groups.setdefault((scale_of(n), p.ndim >= 2), []).append(p)
    if lr_scales:
        counts: dict[float, int] = {}
        for (scale, _), ps in groups.items():
            counts[scale] = counts.get(scale, 0) + sum(p.numel() for p in ps)
        logger.info("parameters per learning-rate scale: %s", counts)
    optimizer = torch.optim.AdamW(
        [
            {"params": ps, "weight_decay": config.weight_decay if decays else 0.0, "lr_scale": scale}
            for (scale, decays), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        floor = config.lr * config.min_lr_ratio
        return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    rng = random.Random(config.seed)
    state = LoopState()
    restored = checkpointer.restore(model, optimizer) if checkpointer else None
    if restored is not None:
        state = restored
        restore_rng(state, rng)
        logger.info("resuming at step %d of %d", state.step, config.steps)
    batches, losses = state.batches, state.losses
    model.train()
    progress = tqdm(
        range(state.step, config.steps),
        desc="training",
        unit="step",
        mininterval=5,
        initial=state.step,
        total=config.steps,
    )
    started = time.monotonic()
    for step in progress:
        if max_minutes is not None and time.monotonic() - started > 60 * max_minutes:
            logger.info("time budget of %.1f min reached: stopping at step %d", max_minutes, step)
            break
        if not batches:
            batches = _length_grouped_batches(encoded, config.batch_size, rng)
        picked = [encoded[i] for i in batches.pop()]
        ids, labels, weights, attention, in_prompt = _batch(
            picked, pad_id, config.decision_weight, config.prompt_weight
        )
        if config.prompt_dropout > 0:
            hide = in_prompt & ~torch.isin(ids, special) & (torch.rand(ids.shape) < config.prompt_dropout)
            ids = ids.masked_fill(hide, pad_id)
        ids, labels, weights, attention = (t.to(device) for t in (ids, labels, weights, attention))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step) * group["lr_scale"]
        logits = model(input_ids=ids, attention_mask=attention).logits
        # Predict token t+1 from position t.
        logits, labels, weights = logits[:, :-1], labels[:, 1:], weights[:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="none",
        )
        loss = (token_loss * weights.reshape(-1)).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        optimizer.step()
        losses.append(loss.item())
        if checkpointer is not None:
            state.step, state.batches, state.losses = step + 1, batches, losses
            capture_rng(state, rng)
            checkpointer.after_step(model, optimizer, state, config.steps)
    model.eval()
    return losses
