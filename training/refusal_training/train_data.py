"""The training data of ``refusal-gateway train``: rows, the holdout, examples.

Its own module because the data rules (what a row is, which rows are held out,
what each row is trained on) are a contract with the data files and with
``refusal-gateway score``, and are tested without a model: nothing here
imports torch, and only :func:`fitting_examples` needs a tokenizer.

1. **Rows.** Every ``--data`` file is JSONL with ``prompt``, ``label``
   (``refuse`` | ``respond``), ``category`` (a CoCoNot category name such as
   ``"Requests with safety concerns"``, or its API key ``"safety"``, or null)
   and optionally ``response`` and ``id``. A row's id is its ``id`` field, else
   ``<file name>:<line number>``; ids must be unique.
2. **Holdout.** With ``--holdout-fraction F`` a seeded (``--split-seed``)
   fraction of the rows is held out, stratified by (label, category): in each
   stratum the rows are sorted by id, shuffled with a generator seeded by the
   split seed and the stratum, and the first ``round(F * n)`` are held out. The
   split is a pure function of the rows' ids, labels, categories and the seed,
   so it does not depend on file order and a resumed run holds out the same
   rows. The held-out rows (``id``, ``prompt``, ``label``, ``category``) go to
   ``<out>/holdout.jsonl``, in the format ``refusal-gateway score`` reads, and
   are never trained on: evaluate on exactly that file
   (``refusal-gateway score --model <out> <out>/holdout.jsonl``). Rows are held
   out before responses are checked, so the holdout may contain ``respond``
   rows without a response (scoring needs none).
3. **Examples.** ``respond`` rows become ``[respond] <response>``; a
   ``respond`` row without a response is skipped with a warning (we cannot
   invent answers). ``refuse`` rows become ``<refusal token> <response>``: the
   category's token in the categorical scheme (a refuse row without a category
   is skipped there, with a warning), ``[refuse]`` in the binary scheme. A refuse
   row without a response gets a short refusal text for its category from
   :mod:`.refusal_texts`, chosen by (``--seed``, row id).
4. **Length.** An example is at most ``--max-length`` tokens: the prompt is
   kept whole (the decision depends on all of it; an example whose prompt does
   not fit is skipped, with a warning) and a long response is clipped, without
   its end of turn.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_plugins.vocab import (
    COCONOT_CATEGORIES,
    KEY_OF_CATEGORY,
    REFUSE_KEY,
    RESPOND_KEY,
    Scheme,
)

from .refusal_texts import refusal_text

if TYPE_CHECKING:  # heavy imports stay out of `refusal-gateway --help`
    from .sft import Example

logger = logging.getLogger(__name__)

LABELS = ("refuse", "respond")


@dataclass(frozen=True)
class Row:
    """One labelled prompt of the training data."""

    id: str
    prompt: str
    label: str  # refuse | respond
    category: str | None  # API key (``safety``, ...) or None
    response: str | None


def _category_key(value: Any, where: str) -> str | None:
    """A row's category as an API key; CoCoNot names and keys are both accepted."""
    if value is None or value == "":
        return None
    if value in COCONOT_CATEGORIES:
        return value
    if value in KEY_OF_CATEGORY:
        return KEY_OF_CATEGORY[value]
    raise ValueError(
        f"{where}: unknown category {value!r} (expected one of {sorted(KEY_OF_CATEGORY)})"
    )


def load_rows(paths: Sequence[Path]) -> list[Row]:
    """Read and validate JSONL rows; fail early, naming the file and line."""
    rows: list[Row] = []
    seen: set[str] = set()
    for path in paths:
        for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            raw = json.loads(line)
            if raw.get("label") not in LABELS:
                raise ValueError(
                    f"{where}: label must be one of {LABELS}, got {raw.get('label')!r}"
                )
            if not isinstance(raw.get("prompt"), str) or not raw["prompt"].strip():
                raise ValueError(f"{where}: missing prompt")
            row_id = str(raw["id"]) if raw.get("id") is not None else f"{Path(path).name}:{lineno}"
            if row_id in seen:
                raise ValueError(
                    f"{where}: duplicate row id {row_id!r} (give rows unique 'id' fields)"
                )
            seen.add(row_id)
            response = raw.get("response")
            rows.append(
                Row(
                    id=row_id,
                    prompt=raw["prompt"],
                    label=raw["label"],
                    category=_category_key(raw.get("category"), where),
                    response=response if isinstance(response, str) and response.strip() else None,
                )
            )
    return rows


def split_holdout(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, holdout): a seeded, stratified (label, category) holdout; see the module doc."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(rows), []
    strata: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        strata.setdefault((row.label, row.category or ""), []).append(row)
    held: set[str] = set()
    for (label, category), members in sorted(strata.items()):
        members = sorted(members, key=lambda r: r.id)
        random.Random(f"holdout:{seed}:{label}:{category}").shuffle(members)
        held.update(r.id for r in members[: math.floor(fraction * len(members) + 0.5)])
    return [r for r in rows if r.id not in held], [r for r in rows if r.id in held]


def write_holdout(rows: Sequence[Row], path: Path) -> None:
    """Held-out rows in the format ``refusal-gateway score`` reads (CoCoNot names)."""
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            category = COCONOT_CATEGORIES[r.category] if r.category else None
            record = {"id": r.id, "prompt": r.prompt, "label": r.label, "category": category}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def rows_to_examples(
    rows: Sequence[Row], scheme: Scheme, texts: dict[str, str], seed: int
) -> list[Example]:
    """Training examples of the rows; rows that cannot be trained on are skipped, with a warning."""
    from .sft import Example

    examples = []
    no_answer, no_category = [], []
    for row in rows:
        if row.label == "respond":
            if row.response is None:
                no_answer.append(row.id)
                continue
            examples.append(Example(row.prompt, texts[RESPOND_KEY], row.response))
            continue
        if scheme == "binary":
            key = REFUSE_KEY
        elif row.category is None:
            no_category.append(row.id)
            continue
        else:
            key = row.category
        response = row.response or refusal_text(row.category or REFUSE_KEY, row.id, seed)
        examples.append(Example(row.prompt, texts[key], response))
    if no_answer:
        logger.warning(
            "skipped %d respond rows without a response (e.g. %s): answers are not invented",
            len(no_answer),
            ", ".join(no_answer[:3]),
        )
    if no_category:
        logger.warning(
            "skipped %d refuse rows without a category (e.g. %s): the categorical scheme needs one",
            len(no_category),
            ", ".join(no_category[:3]),
        )
    return examples


def fitting_examples(
    tokenizer, examples: Sequence[Example], max_length: int, end_id: int
) -> list[Example]:
    """The examples whose whole prompt fits ``max_length``; the rest are skipped, with a warning.

    A truncated prompt is a different request (the decision depends on all of
    it), so long prompts are dropped rather than cut; long responses are
    clipped instead (see :func:`.sft.encode` with ``keep_prompt``).
    """
    from .sft import PromptTooLong, encode

    kept, clipped = [], 0
    for example in examples:
        try:
            enc = encode(tokenizer, example, max_length, end_id, keep_prompt=True)
        except PromptTooLong:
            continue
        kept.append(example)
        clipped += enc.input_ids[-1] != end_id
    if len(kept) < len(examples):
        logger.warning(
            "skipped %d examples whose prompt does not fit --max-length %d",
            len(examples) - len(kept),
            max_length,
        )
    if clipped:
        logger.info("%d responses clipped to --max-length %d", clipped, max_length)
    if not kept:
        raise ValueError(f"no example fits --max-length {max_length}")
    return kept
