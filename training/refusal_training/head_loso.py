"""The decision head's data and figures: every source's rows, leave one source out.

Apart from :mod:`.head_recipe` (which extracts features, fits the shipped head
and writes the artefact) because how a figure is computed is its own job: which
rows a head may train on when a source is measured (never that source's family,
never an augmented copy's original source), which rows are measured (never an
augmented copy), and the pools the README quotes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
from refusal_plugins.vocab import scheme_keys

from .conversations import HELD_OUT as CONVERSATIONS_HELD_OUT
from .conversations import TRAIN as CONVERSATIONS_TRAIN
from .conversations import draw_contexts
from .decision_head import Head, fit_head
from .inline_turns import wrap as wrap_inline
from .scoring import auroc
from .sources import CORPUS, PAIRS, SOURCES, Prompt, kind, leaked, measured, trainable
from .system_prompts import HELD_OUT, TRAIN, Context, draw

logger = logging.getLogger(__name__)

KEYS = scheme_keys("categorical")  # respond first
FAMILIES = {
    "coconot": "coconot", "coconot-seed": "coconot", "coconot-pref": "coconot",
    "coconot-contrast": "coconot", "coconot-heldout": "coconot",
    "self-instruct-seed": "self-instruct", "self-instruct-user": "self-instruct",
}  # fmt: skip


def family(name: str) -> str:
    return FAMILIES.get(name, name)


class Dataset:
    """Every source's prompts with their features and class indices.

    Rows may be followed by augmented copies (:meth:`augment`): prompts of the
    trainable sources again, rendered after a client system message or earlier
    turns of a conversation. They are
    trained on with their source and never measured."""

    def __init__(
        self,
        data: dict[str, list[Prompt]],
        features: np.ndarray,
        corpus_weight: float = 1.0,
        pairs_weight: float = 1.0,
    ):
        self.names = list(data)
        self.source = np.array([n for n in self.names for _ in data[n]])
        self.rows = [r for n in self.names for r in data[n]]
        self.x = features
        self.y = np.array([KEYS.index(r.key) for r in self.rows])
        self.corpus_weight = corpus_weight
        # The project's corpus is written to break the public sets' shortcuts (length,
        # style, alarming words); the public sets at full weight teach the head their own
        # wording, so the corpus's say lifts LOSO AUROC (0.81 at 3x, 0.87 at 100x; docs/quality).
        self.weight = np.where(self.source == CORPUS, corpus_weight, 1.0)
        texts = np.array([r.prompt for r in self.rows], dtype=object)

        def corpus_rows(prompts) -> np.ndarray:
            return (self.source == CORPUS) & np.isin(texts, list(prompts))

        # The later written rows (origin :data:`PAIRS`: mostly minimal pairs, a request and
        # its twin of the other label) teach intent over wording better than the composed
        # rows: at ``pairs_weight`` 10 times the corpus's weight LOSO AUROC on the default
        # rendering went 0.860 -> 0.869 (docs/quality/experiments.md, *Written minimal pairs*).
        origins = np.array([r.origin for r in self.rows], dtype=object)
        self.weight[(self.source == CORPUS) & (origins == PAIRS)] *= pairs_weight
        # A corpus prompt a public source holds is never trained on (weight 0, so the rows
        # and the seeded draws of their copies stay where they were; fit skips them).
        taken = leaked(data)
        if taken:
            logger.info("corpus: %d prompts also in a public source, not trained on", len(taken))
            self.weight[corpus_rows(taken)] = 0.0
        self.augmented = np.zeros(len(self.rows), dtype=bool)

    def mask(self, names) -> np.ndarray:
        return np.isin(self.source, list(names))

    def measured_mask(self, names) -> np.ndarray:
        """The rows of ``names`` a figure is computed on: never an augmented copy."""
        return self.mask(names) & ~self.augmented

    def augment(self, picks: np.ndarray, features: np.ndarray) -> None:
        """Append copies of rows ``picks`` with other ``features`` (same source, label, weight)."""
        self.source = np.concatenate([self.source, self.source[picks]])
        self.rows += [self.rows[i] for i in picks]
        self.x = np.concatenate([self.x, features])
        self.y = np.concatenate([self.y, self.y[picks]])
        self.weight = np.concatenate([self.weight, self.weight[picks]])
        self.augmented = np.concatenate([self.augmented, np.ones(len(picks), dtype=bool)])


def training_mask(ds: Dataset, without: Collection[str] = ()) -> np.ndarray:
    """The rows a head may be fitted on: every trainable source's, copies included, never
    those of a family in ``without``. One definition for both uses, so a head fitted with
    ``head_recipe --hold-out F`` is exactly the leave-one-source-out head that measures F."""
    return ds.mask([n for n in ds.names if trainable(n) and family(n) not in without])


def fit(ds: Dataset, train: np.ndarray, u: np.ndarray, l2: float) -> Head:
    train = train & (ds.weight > 0)
    return fit_head(ds.x[train], ds.y[train], len(KEYS), u, l2=l2, sample_weight=ds.weight[train])


def rates(probs: np.ndarray, refuse: np.ndarray) -> dict:
    """Refusal rates of the greedy decision (the most likely control token, as served)."""
    decided = probs.argmax(axis=1) != 0
    out = {"n": int(len(refuse))}
    if refuse.any():
        out["refused_harmful"] = float(decided[refuse].mean())
    if (~refuse).any():
        out["refused_benign"] = float(decided[~refuse].mean())
    return out


def decisions(probs: np.ndarray, labels: np.ndarray) -> dict:
    """:func:`rates` of rows with class indices ``labels``, and on the should-refuse ones
    how often the decided category is theirs."""
    refuse = labels > 0
    out = rates(probs, refuse)
    if refuse.any():
        out["category_accuracy"] = float((probs[refuse].argmax(axis=1) == labels[refuse]).mean())
    return out


def leave_one_source_out(
    ds: Dataset, u: np.ndarray, l2: float, views: dict[str, np.ndarray] | None = None
) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
    """Per source: figures of a head fitted without its family; every row's control
    probabilities from such a head (NaN for rows never measured); and the same
    heads' probabilities on each of ``views`` (other features of the same rows,
    e.g. rendered after a client system message)."""
    p_rows = np.full((len(ds.rows), len(KEYS)), np.nan)
    p_views = {k: np.full((len(ds.rows), len(KEYS)), np.nan) for k in views or {}}
    figures = {}
    heads: dict[str, Head] = {}  # one fit per left-out family: its sources share the rows
    for name in filter(measured, ds.names):
        if family(name) not in heads:
            heads[family(name)] = fit(ds, training_mask(ds, {family(name)}), u, l2)
        head = heads[family(name)]
        rows = ds.measured_mask([name])
        probs = head.probabilities(ds.x[rows])
        p_rows[rows] = probs
        for key, x in (views or {}).items():
            p_views[key][rows] = head.probabilities(x[rows])
        figures[name] = {"kind": kind(name), "trained_without": sorted({family(name)}),
                         **decisions(probs, ds.y[rows])}  # fmt: skip
        logger.info("LOSO %s: %s", name, figures[name])
    return figures, p_rows, p_views


def pooled(ds: Dataset, probs: np.ndarray, names, keep: np.ndarray | None = None) -> dict:
    """AUROC of p(refuse) = 1 - p(respond), and the greedy rates, over ``names`` together
    (only the rows ``keep`` marks, when given)."""
    rows = ds.measured_mask(names)
    if keep is not None:
        rows &= keep
    refuse = ds.y[rows] > 0
    both = refuse.any() and (~refuse).any()  # AUROC needs both kinds of prompt
    value = auroc(1.0 - probs[rows, 0], refuse) if both else None
    return {"auroc": value, **rates(probs[rows], refuse)}


def pools(ds: Dataset, probs: np.ndarray, names: list[str]) -> dict:
    """The summary pools: every measured source, all but CoCoNot, each kind, and harmful
    requests (the safety category) against benign ones.

    The last because "should refuse" is wider than "harmful": CoCoNot's held-out half also
    asks the head to refuse false premises, unanswerable and humanizing requests, which a
    small model's hidden states separate worst (incomplete requests: AUROC 0.72 against
    benign ones, safety requests 0.89; docs/quality/experiments.md). Both are reported."""
    safety_or_benign = (ds.y == KEYS.index("safety")) | (ds.y == 0)
    out = {"all_sources": pooled(ds, probs, names),
           "without_coconot": pooled(ds, probs, [n for n in names if family(n) != "coconot"]),
           "safety_vs_benign": pooled(ds, probs, names, safety_or_benign)}  # fmt: skip
    for k in ("harmful", "lookalike", "ordinary"):
        out[k] = pooled(ds, probs, [n for n in names if kind(n) == k])
    return out


def per_context(ds: Dataset, probs: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Greedy rates per context label of a view (a system message, or an exchange's first
    user message; its first 60 characters) over ``names``."""
    rows = ds.measured_mask(names)
    out = {}
    for text in dict.fromkeys(labels[rows]):
        these = rows & (labels == text)
        out[text[:60]] = rates(probs[these], ds.y[these] > 0)
    return out


def client_system_view(ds: Dataset, features_of, seed: int) -> tuple[np.ndarray, list[str]]:
    """The features of every measured row after a held-out client system message (one
    seeded draw per row, :data:`.system_prompts.HELD_OUT`), aligned with all the
    dataset's rows: zeros and "" for the corpus and augmented copies, never measured."""
    rows = np.flatnonzero(ds.measured_mask(filter(measured, ds.names)))
    return _view(ds, features_of, rows, draw(HELD_OUT, len(rows), seed + 1))


def earlier_turns_view(ds: Dataset, features_of, seed: int) -> tuple[np.ndarray, list[str]]:
    """:func:`client_system_view` after a held-out earlier exchange instead
    (:data:`.conversations.HELD_OUT`, no client system message); each row is labelled by
    the exchange's first user message."""
    rows = np.flatnonzero(ds.measured_mask(filter(measured, ds.names)))
    return _view(ds, features_of, rows, draw_contexts(CONVERSATIONS_HELD_OUT, len(rows), seed + 51))


def _view(ds: Dataset, features_of, rows: np.ndarray, before: list) -> tuple[np.ndarray, list[str]]:
    x = np.zeros_like(ds.x)
    x[rows] = np.concatenate(features_of([ds.rows[i].prompt for i in rows], before), axis=1)
    labels = [""] * len(ds.rows)
    for i, b in zip(rows, before, strict=True):
        labels[i] = b.earlier[0][0] if isinstance(b, Context) else b
    return x, labels


def augment_with_systems(ds: Dataset, features_of, copies: float, seed: int) -> None:
    """Add the trainable rows again, each copy rendered after a training system message
    (:data:`.system_prompts.TRAIN`, one seeded draw per copy): ``copies`` of them per
    row (a fraction: a seeded share of the rows; 2.0: every row twice)."""
    _augment(ds, features_of, copies, seed, lambda n, s: draw(TRAIN, n, s), "client system messages")


def augment_with_turns(ds: Dataset, features_of, copies: float, seed: int) -> None:
    """:func:`augment_with_systems` after an earlier exchange of a conversation
    (:data:`.conversations.TRAIN`), half of them also after a training system message."""
    _augment(ds, features_of, copies, seed + 50,
             lambda n, s: draw_contexts(CONVERSATIONS_TRAIN, n, s, system_share=0.5), "earlier turns")  # fmt: skip


def augment_with_inline_turns(ds: Dataset, features_of, copies: float, seed: int) -> None:
    """:func:`augment_with_systems` with each prompt inside a transcript written into the
    user's own message (:func:`.inline_turns.wrap`), after the template's default."""
    _augment(ds, features_of, copies, seed + 70, lambda n, s: [None] * n,
             "a transcript inside the user message", rewrite=wrap_inline)  # fmt: skip


def _augment(
    ds: Dataset, features_of, copies: float, seed: int, before_of, what: str, rewrite=None
) -> None:
    """``before_of(n, seed)``: what each copy comes after; ``rewrite(prompts, seed)``: the
    copies' own texts (the prompts themselves when None)."""
    candidates = np.flatnonzero(ds.mask([n for n in ds.names if trainable(n)]) & ~ds.augmented)
    for k in range(int(np.ceil(copies))):
        share = min(1.0, copies - k)
        rng = np.random.default_rng(seed + 2 + 10 * k)
        picks = np.sort(rng.permutation(candidates)[: int(round(share * len(candidates)))])
        before = before_of(len(picks), seed + 3 + 10 * k)
        texts = [ds.rows[i].prompt for i in picks]
        if rewrite is not None:
            texts = rewrite(texts, seed + 4 + 10 * k)
        x = np.concatenate(features_of(texts, before), axis=1)
        ds.augment(picks, x)
        logger.info("copy %d: %d trainable rows after %s", k + 1, len(picks), what)


def yardsticks(ds: Dataset, head: Head, x: np.ndarray, held_out: Collection[str] = ()) -> dict:
    """The :func:`decisions` of ``head`` on each source it never trained on (the sources
    never trainable, and those of the families ``held_out`` of it), from features ``x``
    (aligned with the dataset's rows: its own, or a view of them)."""
    out = {}
    for name in filter(measured, ds.names):
        if not trainable(name) or family(name) in held_out:
            rows = ds.measured_mask([name])
            out[name] = decisions(head.probabilities(x[rows]), ds.y[rows])
    return out


#: The families ``head_recipe --hold-out`` may leave out: those a head trains on and
#: that are measured (the corpus is neither measured nor a public set).
HOLDABLE = sorted({family(s.name) for s in SOURCES if trainable(s.name) and measured(s.name)})
