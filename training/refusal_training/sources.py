"""The labelled prompt sources of ``../shared/data``, by name, with what each may be used for.

Figures from one distribution say little (a model can learn how one set words
its harmful prompts), so the default model is judged leave-one-source-out:
fitted without a source, measured on it. That needs sources as first-class
names, each with its kind of prompt:

* ``harmful``: should be refused (CoCoNot's safety and other categories, AdvBench, CatQA,
  SimpleSafetyTests);
* ``lookalike``: benign prompts that sound risky (PHTest, CyberSecEval MITRE
  false-refusal, CoCoNot contrast and pref);
* ``ordinary``: plain assistant requests (MT-Bench, Vicuna, self-instruct).

plus the project's own ``corpus`` (``demo/corpus.jsonl``: handwritten and
composed prompts of every category, with benign look-alikes of each, written
to break the shortcuts of length, style and alarming words): always trained
on, never measured, so it is in no source's way. A corpus prompt that a loaded source
also holds (same words, case and punctuation aside: :func:`leaked`) is never trained on:
three generic composed prompts ("How to burn a CD") happen to be in public sets, one of
them in a yardstick, and a written one must not leak a measured prompt either.

``eval_only`` sources are never trained on (their licence or their authors ask
for it, or they are the project's fixed yardsticks). CoCoNot's original test
set is split in two seeded, category-stratified halves: one may be trained on,
the other is held out.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from refusal_plugins.vocab import KEY_OF_CATEGORY


@dataclass(frozen=True)
class Source:
    name: str
    path: str  # relative to the data directory
    kind: str  # harmful | lookalike | ordinary
    eval_only: bool = False


SOURCES: tuple[Source, ...] = (
    Source("coconot", "coconot/coconot_original_test.norm.jsonl", "harmful"),
    Source("coconot-seed", "coconot/coconot_seed_original.norm.jsonl", "harmful"),
    Source("advbench", "extra/advbench.norm.jsonl", "harmful"),
    Source("catqa", "extra/catqa.norm.jsonl", "harmful"),
    Source("simple-safety", "extra/simple_safety_tests.norm.jsonl", "harmful"),
    Source("coconot-pref", "coconot/coconot_pref_train.norm.jsonl", "lookalike"),
    Source("coconot-contrast", "coconot/coconot_contrast_test.norm.jsonl", "lookalike", True),
    Source("phtest", "extra/phtest_harmless.norm.jsonl", "lookalike"),
    Source("mitre-frr", "extra/cyberseceval_mitre_frr.norm.jsonl", "lookalike"),
    Source("mt-bench", "extra/mt_bench_turn1.norm.jsonl", "ordinary"),
    Source("vicuna", "extra/vicuna_bench.norm.jsonl", "ordinary"),
    Source("self-instruct-seed", "self_instruct/self_instruct_seed_train.norm.jsonl", "ordinary"),
    Source(
        "self-instruct-user",
        "self_instruct/self_instruct_user_oriented_test.norm.jsonl",
        "ordinary",
        True,
    ),
)
BY_NAME = {s.name: s for s in SOURCES}


@dataclass(frozen=True)
class Prompt:
    """One labelled prompt: ``key`` is the expected control token's key (``respond`` or a category).

    ``source`` is the set it is loaded as (a name of :data:`SOURCES`, or ``corpus``);
    ``origin`` is the row's own ``source`` field, where it was drawn from: for the
    corpus, the file or family of ``demo/compose.py`` (:data:`PAIRS` for the written
    minimal pairs). Two prompts that differ only by origin are the same prompt.
    """

    prompt: str
    key: str
    source: str
    origin: str = field(default="", compare=False)

    @property
    def refuse(self) -> bool:
        return self.key != "respond"


CORPUS = "corpus"


def read_source(data_dir: Path, source: Source) -> list[Prompt]:
    return read_jsonl(data_dir / source.path, source.name)


def read_jsonl(path: Path, name: str) -> list[Prompt]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        key = "respond" if row["label"] == "respond" else KEY_OF_CATEGORY[row["category"]]
        rows.append(Prompt(row["prompt"], key, name, row.get("source", "")))
    return rows


def halves(rows: list[Prompt], seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Seeded, per-category halves (train, held out) of a source."""
    rng = random.Random(seed)
    train, held = [], []
    for key in sorted({r.key for r in rows}):
        group = [r for r in rows if r.key == key]
        rng.shuffle(group)
        cut = len(group) // 2
        train += group[:cut]
        held += group[cut:]
    return train, held


def load_all(data_dir: Path, seed: int = 0, corpus: bool = True) -> dict[str, list[Prompt]]:
    """Every source's rows by name; CoCoNot's original set as ``coconot`` (trainable
    half) and ``coconot-heldout`` (the other half, never trained on); the
    project's corpus as ``corpus``."""
    out = {s.name: read_source(data_dir, s) for s in SOURCES if (data_dir / s.path).is_file()}
    if corpus:
        from .demo_model import corpus_path

        out[CORPUS] = read_jsonl(corpus_path(), CORPUS)
    if "coconot" in out:
        train, held = halves(out["coconot"], seed)
        out["coconot"] = train
        out["coconot-heldout"] = [replace(r, source="coconot-heldout") for r in held]
    return out


PAIRS = "written-2"  # the corpus's later written rows, mostly minimal pairs (demo/compose.py)


def same_words(text: str) -> str:
    """``text`` with case, punctuation and spacing set aside: how a leak is recognised."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def leaked(data: dict[str, list[Prompt]]) -> set[str]:
    """The corpus's prompts that another source of ``data`` holds too (see the module's docstring)."""
    taken = {same_words(r.prompt) for name, rows in data.items() if name != CORPUS for r in rows}
    return {r.prompt for r in data.get(CORPUS, []) if same_words(r.prompt) in taken}


def trainable(name: str) -> bool:
    return name == CORPUS or (name != "coconot-heldout" and not BY_NAME[name].eval_only)


def measured(name: str) -> bool:
    """Every source but the project's own corpus is a yardstick."""
    return name != CORPUS


def kind(name: str) -> str:
    if name == CORPUS:
        return "mixed"
    return BY_NAME["coconot" if name == "coconot-heldout" else name].kind


def sample(data: dict[str, list], per_source: int, seed: int) -> dict[str, list]:
    """``--max-rows-per-source``: a seeded sample of at most ``per_source`` rows of each
    source, in their order (quick runs; the e2e test of a held-out head draws the same)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {n: [rows[i] for i in sorted(rng.permutation(len(rows))[:per_source])]
            for n, rows in data.items()}  # fmt: skip
