"""What the model reads after its decision: input embeddings of the control tokens.

After the decision token vLLM feeds that token back as the next input, so each
control token needs an input embedding, and it decides what the model writes:

* ``[respond]`` reads as the base tokenizer's newline. The model then sees
  ``<|im_start|>assistant\\n\\n`` and answers exactly as the base model would
  (checked: "The capital of France is Paris."), so answers are the base
  model's own, untouched by any training.
* each refusal token reads as a vector trained here (prompt tuning with one
  soft token per category): the base model stays frozen, and the vector is
  fitted so that the model, reading it after a should-refuse prompt, writes a
  short refusal of that category (:mod:`.refusal_texts`) and ends its turn.
  The refusal is the base model's own generation, steered, not a canned
  string, and nothing else about the model changes.

Only ``K × hidden`` numbers are trained (5 × 576 for SmolLM2-135M), so a few
minutes on two CPU cores suffice, and a GPU run of many more steps costs
seconds (``--device``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .features import prompt_ids
from .refusal_texts import refusal_text
from .sources import Prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoftTokenOptions:
    steps: int = 120
    batch_size: int = 8
    lr: float = 0.01
    seed: int = 0
    device: str = "cpu"
    max_minutes: float | None = None


def newline_id(tokenizer) -> int:
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the base tokenizer encodes a newline as {ids}, not one token")
    return ids[0]


def train_soft_tokens(
    base: Path,
    rows: Sequence[Prompt],
    keys: Sequence[str],
    end_id: int,
    options: SoftTokenOptions,
) -> dict[str, np.ndarray]:
    """One input embedding per refusal key, trained on ``rows`` (should-refuse prompts).

    Loss: cross-entropy of the refusal text and the turn end, after the prompt
    and the soft token; the base model is frozen.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(options.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(options.device)
    model.eval().requires_grad_(False)
    embed = model.get_input_embeddings()
    start = embed.weight[newline_id(tokenizer)].detach().clone()
    soft = torch.nn.Parameter(start.unsqueeze(0).repeat(len(keys), 1))
    index = {k: i for i, k in enumerate(keys)}
    usable = [r for r in rows if r.key in index]
    if not usable:
        raise ValueError("no should-refuse rows of the given categories to train on")

    def encode(row: Prompt) -> tuple[list[int], list[int]]:
        prompt = prompt_ids(tokenizer, row.prompt)
        text = refusal_text(row.key, row.prompt, options.seed)
        return prompt[-200:], tokenizer.encode(text, add_special_tokens=False) + [end_id]

    opt = torch.optim.Adam([soft], lr=options.lr)
    rng = random.Random(options.seed)
    started = time.monotonic()
    for step in range(options.steps):
        if options.max_minutes and time.monotonic() - started > 60 * options.max_minutes:
            logger.info("soft tokens: time budget reached after %d steps", step)
            break
        batch = [usable[rng.randrange(len(usable))] for _ in range(options.batch_size)]
        encoded = [encode(r) for r in batch]
        width = max(len(p) + 1 + len(t) for p, t in encoded)
        inputs = torch.zeros((len(batch), width, embed.weight.shape[1]))
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        pieces = []
        for row, (r, (prompt, target)) in enumerate(zip(batch, encoded, strict=True)):
            ids = torch.tensor(prompt + [0] + target)
            pad = width - len(ids)  # left padding: every sequence ends at the same place
            pieces.append((row, pad, len(prompt), ids, index[r.key], len(target)))
            mask[row, pad:] = 1
            labels[row, pad + len(prompt) + 1 :] = ids[len(prompt) + 1 :]
        rows_embeds = []
        for _row, pad, n_prompt, ids, k, _ in pieces:
            e = embed(ids.to(options.device))
            e = torch.cat([e[:n_prompt], soft[k].unsqueeze(0), e[n_prompt + 1 :]])
            rows_embeds.append(torch.nn.functional.pad(e, (0, 0, pad, 0)))
        inputs = torch.stack(rows_embeds)
        out = model(inputs_embeds=inputs, attention_mask=mask.to(options.device))
        logits = out.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(options.device),
            ignore_index=-100,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == options.steps - 1:
            logger.info("soft tokens: step %d loss %.3f (%.0fs)", step, loss.item(),
                        time.monotonic() - started)  # fmt: skip
    return {k: soft[i].detach().cpu().numpy().astype(np.float32) for k, i in index.items()}
