"""Supervised fine-tuning of a refusal-token model (loss on the assistant turn only).

One training example is a chat: the user's prompt rendered with the model's
own chat template (generation prompt included), then the assistant turn
``<control token> <response><eos>``. Only the assistant turn is scored, and
the decision token can be weighted up: it is the one token the server acts on.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

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


def encode(tokenizer, example: Example, max_length: int) -> Encoded:
    """Token ids and labels of one example; the prompt side is truncated first."""
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    control_id = tokenizer.convert_tokens_to_ids(example.control)
    body = tokenizer.encode(" " + example.response, add_special_tokens=False)
    answer = [control_id, *body, tokenizer.eos_token_id]
    room = max_length - len(answer)
    if room < 8:  # keep some prompt; clip the response instead
        answer = [*answer[: max_length - 8 - 1], tokenizer.eos_token_id]
        room = 8
    prompt_ids = list(prompt_ids)[-room:]
    return Encoded(
        input_ids=prompt_ids + answer,
        labels=[IGNORE] * len(prompt_ids) + answer,
        decision_index=len(prompt_ids),
    )


def _batch(items: Sequence[Encoded], pad_id: int, decision_weight: float):
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    weights = torch.zeros((len(items), width))
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention[i, :n] = 1
        weights[i, :n] = (labels[i, :n] != IGNORE).float()
        weights[i, e.decision_index] = decision_weight
    return ids, labels, weights, attention


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


def train(model, tokenizer, examples: Sequence[Example], config: TrainConfig) -> list[float]:
    """Train ``model`` in place; return the loss per step (for the build log)."""
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    encoded = [encode(tokenizer, e, config.max_length) for e in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
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
    batches: list[list[int]] = []
    losses: list[float] = []
    model.train()
    for step in tqdm(range(config.steps), desc="training", unit="step", mininterval=5):
        if not batches:
            batches = _length_grouped_batches(encoded, config.batch_size, rng)
        picked = [encoded[i] for i in batches.pop()]
        ids, labels, weights, attention = _batch(picked, pad_id, config.decision_weight)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
