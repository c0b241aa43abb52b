"""The SmolLM2 recipe's data split: what is trained on, what is held out, what calibrates.

Step 2 of :mod:`.smollm2` (the rules are in its docstring). Its own module
because the split is the contract behind the README's figures (seeded,
stratified, held-out and evaluation prompts never trained on) and needs
nothing of the model conversion.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from refusal_plugins.vocab import COCONOT_CATEGORIES

from .train_data import Row, load_rows, split_holdout, write_holdout

logger = logging.getLogger(__name__)

#: The files of ``--data-dir`` (the layout of this repository's ``../shared/data``).
REFUSE_FILE = "coconot/coconot_original_test.norm.jsonl"
RESPOND_FILES = (
    "coconot/coconot_pref_train.norm.jsonl",
    "self_instruct/self_instruct_seed_train.norm.jsonl",
)
CONTRAST_FILE = "coconot/coconot_contrast_test.norm.jsonl"
BENIGN_FILE = "self_instruct/self_instruct_user_oriented_test.norm.jsonl"


@dataclass(frozen=True)
class DataFiles:
    """Where the prompt sets are: what is split, what is trained on, what is only evaluated."""

    refuse: Path  # should-refuse prompts, split into train / held out
    respond: tuple[Path, ...]  # benign prompts with responses, all trained on
    contrast: Path  # benign look-alikes of refuse prompts: evaluation only
    benign: Path | None = None  # plain benign prompts: evaluation only (optional)

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> DataFiles:
        benign = data_dir / BENIGN_FILE
        return cls(
            refuse=data_dir / REFUSE_FILE,
            respond=tuple(data_dir / f for f in RESPOND_FILES),
            contrast=data_dir / CONTRAST_FILE,
            benign=benign if benign.is_file() else None,
        )


@dataclass(frozen=True)
class Split:
    """The files :func:`split_data` wrote into its work directory."""

    train: Path
    heldout: Path  # held-out part of the refuse file
    contrast: Path
    benign: Path | None
    info: dict
    calibration: Path | None = None  # held-out original + contrast rows for `calibrate`


def _fold(prompt: str) -> str:
    return " ".join(prompt.casefold().split())


def sample_rows(rows: Sequence[Row], limit: int | None, seed: int) -> list[Row]:
    """At most ``limit`` rows, taken in turn from each (label, category) stratum; seeded.

    For quick runs (tests, smoke checks): small samples still cover every
    category and both labels. ``None`` keeps every row, in order.
    """
    if limit is None or limit >= len(rows):
        return list(rows)
    strata: dict[tuple[str, str], list[Row]] = {}
    for row in sorted(rows, key=lambda r: r.id):
        strata.setdefault((row.label, row.category or ""), []).append(row)
    queues = []
    for key, members in sorted(strata.items()):
        random.Random(f"sample:{seed}:{key}").shuffle(members)
        queues.append(members)
    picked: list[Row] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop())
    chosen = {r.id for r in picked}
    return [r for r in rows if r.id in chosen]


def write_rows(rows: Iterable[Row], path: Path) -> None:
    """Rows as training JSONL (CoCoNot category names, responses kept)."""
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            record = {
                "id": r.id,
                "prompt": r.prompt,
                "label": r.label,
                "category": COCONOT_CATEGORIES[r.category] if r.category else None,
            }
            if r.response is not None:
                record["response"] = r.response
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def split_data(
    files: DataFiles,
    work_dir: Path,
    seed: int = 0,
    heldout_fraction: float = 0.5,
    max_train_rows: int | None = None,
    max_eval_rows: int | None = None,
    calibration_fraction: float = 0.0,
) -> Split:
    """Write ``train.jsonl`` and the evaluation files into ``work_dir`` (see the module doc).

    The split is a pure function of the rows and ``seed``, so the held-out
    files are the same on every machine. ``calibration_fraction`` moves that
    share of the held-out original rows and of the contrast rows (seeded,
    stratified) into ``calibration.jsonl``, for fitting thresholds; the
    training rows do not depend on it. ``max_*_rows`` subsample (per file,
    stratified) for quick checks only; figures are comparable at the default.
    """
    refuse = load_rows([files.refuse])
    if any(r.label != "refuse" for r in refuse):
        raise ValueError(f"{files.refuse}: every row must be labelled refuse")
    train_refuse, heldout_all = split_holdout(refuse, heldout_fraction, seed)
    contrast_all = load_rows([files.contrast])
    benign_all = load_rows([files.benign]) if files.benign else []
    # Every evaluation prompt (before any subsampling), so that none is trained on.
    evaluated = {_fold(r.prompt) for r in [*heldout_all, *contrast_all, *benign_all]}
    heldout = sample_rows(heldout_all, max_eval_rows, seed)
    contrast = sample_rows(contrast_all, max_eval_rows, seed)
    calibration: list[Row] = []
    if calibration_fraction > 0:
        # Its own seed stream: the held-out/train cut above stays as it was.
        heldout, cal_refuse = split_holdout(heldout, calibration_fraction, seed + 1)
        contrast, cal_respond = split_holdout(contrast, calibration_fraction, seed + 1)
        calibration = [*cal_refuse, *cal_respond]
    benign = sample_rows(benign_all, max_eval_rows, seed)

    respond = [r for r in load_rows(files.respond) if r.label == "respond"]
    with_response = [r for r in respond if r.response is not None]
    candidates = [*train_refuse, *with_response]
    train = [r for r in candidates if _fold(r.prompt) not in evaluated]
    dropped = [r.id for r in candidates if _fold(r.prompt) in evaluated]
    if dropped:
        logger.warning("dropped %d training rows that are evaluation prompts", len(dropped))
    train = sample_rows(train, max_train_rows, seed)

    work_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": work_dir / "train.jsonl",
        "heldout": work_dir / "heldout_original.jsonl",
        "contrast": work_dir / "contrast.jsonl",
        "benign": work_dir / "benign.jsonl" if files.benign else None,
        "calibration": work_dir / "calibration.jsonl" if calibration else None,
    }
    write_rows(train, paths["train"])
    write_holdout(heldout, paths["heldout"])
    write_holdout(contrast, paths["contrast"])
    if paths["benign"] is not None:
        write_holdout(benign, paths["benign"])
    if paths["calibration"] is not None:
        write_holdout(calibration, paths["calibration"])

    def by_category(rows: Sequence[Row]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in rows:
            key = f"{r.label}:{r.category or '-'}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    info = {
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "sources": {
            k: [str(p) for p in v] if isinstance(v, tuple) else str(v)
            for k, v in asdict(files).items()
        },
        "train": by_category(train),
        "heldout_original": by_category(heldout),
        "contrast": len(contrast),
        "benign": len(benign),
        "calibration_fraction": calibration_fraction,
        "calibration": by_category(calibration),
        "respond_without_response": len(respond) - len(with_response),
        "dropped_as_evaluation_prompts": dropped,
        "max_train_rows": max_train_rows,
        "max_eval_rows": max_eval_rows,
    }
    (work_dir / "split_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return Split(
        paths["train"], paths["heldout"], paths["contrast"], paths["benign"], info, paths["calibration"]
    )
