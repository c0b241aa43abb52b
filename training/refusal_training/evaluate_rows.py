"""The labelled prompts of ``refusal-gateway eval``: reading, validating, sampling.

Its own module because every other part of the evaluation (decisions,
figures, the report) speaks in these rows and their file names, and a bad row
should stop the run before a single request is sent.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_plugins.vocab import COCONOT_CATEGORIES, REFUSE_KEY, RESPOND_KEY

from .train_data import KEY_OF_CATEGORY, LABELS

NO_CATEGORY = "none"
ALL = "all"


class EvalError(RuntimeError):
    """The run cannot go on (bad data, a server that is not ours, a rejected request)."""


@dataclass(frozen=True)
class EvalRow:
    file: str  # the file's name in the report
    prompt: str
    label: str  # refuse | respond
    category: str | None  # API key (safety, ...) or None


def category_key(value: Any, where: str) -> str | None:
    """CoCoNot names and keys -> key; ``respond``, ``""`` and null -> None."""
    if value is None or value in ("", RESPOND_KEY):
        return None
    if value in COCONOT_CATEGORIES or value == REFUSE_KEY:
        return value
    if value in KEY_OF_CATEGORY:
        return KEY_OF_CATEGORY[value]
    raise EvalError(
        f"{where}: unknown category {value!r} (expected one of {sorted(KEY_OF_CATEGORY)})"
    )


def file_names(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the file name without ``.jsonl`` / ``.norm.jsonl``."""
    names: list[str] = []
    for path in paths:
        name = Path(path).name.removesuffix(".jsonl").removesuffix(".norm")
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def load_rows(
    paths: Sequence[Path], limit: int | None = None, seed: int = 0
) -> tuple[list[EvalRow], dict[str, str]]:
    """All rows (file order kept), a seeded sample of ``limit`` per file; and name -> path."""
    rows: list[EvalRow] = []
    names = file_names(paths)
    for path, name in zip(paths, names, strict=True):
        these = []
        for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{where}: not JSON ({e})") from None
            if raw.get("label") not in LABELS:
                raise EvalError(f"{where}: label must be one of {LABELS}, got {raw.get('label')!r}")
            if not isinstance(raw.get("prompt"), str) or not raw["prompt"].strip():
                raise EvalError(f"{where}: missing prompt")
            these.append(
                EvalRow(name, raw["prompt"], raw["label"], category_key(raw.get("category"), where))
            )
        if not these:
            raise EvalError(f"{path}: no rows")
        if limit is not None and limit < len(these):
            keep = sorted(random.Random(f"eval:{seed}:{name}").sample(range(len(these)), limit))
            these = [these[i] for i in keep]
        rows.extend(these)
    return rows, {n: str(p) for n, p in zip(names, paths, strict=True)}
