"""The decision head: fitted, made exactly linear, lifted above the vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from refusal_training.decision_head import constant_direction, fit_head, fold, needed_offset
from refusal_training.sources import SOURCES, halves, kind, load_all, measured, trainable


def decision_like(n: int, d: int, classes: int, seed: int = 0):
    """Hidden states with a large shared component (as at one template position) + class signal."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=d) * 3.0
    means = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, size=n)
    x = common + means[y] + rng.normal(size=(n, d)) * 0.8
    return x, y


def test_the_head_separates_and_is_exactly_linear():
    x, y = decision_like(1200, 32, 4)
    u = constant_direction(x)
    assert abs(float((x @ u).mean()) - 1.0) < 0.02
    head = fit_head(x[:1000], y[:1000], 4, u, l2=1e-3)
    assert not head.bias.any()  # the intercepts ride on u: logits are rows · h alone
    accuracy = (head.probabilities(x[1000:]).argmax(axis=1) == y[1000:]).mean()
    assert accuracy > 0.9
    rows = fold(head, u, offset=0.0)
    np.testing.assert_allclose(x @ rows.T, head.logits(x), rtol=1e-9, atol=1e-9)


def test_the_offset_lifts_every_control_logit_above_the_vocabulary_and_changes_no_choice():
    x, y = decision_like(400, 16, 3, seed=1)
    u = constant_direction(x)
    head = fit_head(x, y, 3, u)
    vocab_max = np.full(len(x), 40.0)  # ordinary tokens far above the head's logits
    offset = needed_offset(fold(head, u, 0.0), u, x, vocab_max, margin=12.0)
    lifted = x @ fold(head, u, offset).T
    assert (lifted.max(axis=1) >= vocab_max + 12.0 - 1e-6).all()
    assert (lifted.argmax(axis=1) == head.logits(x).argmax(axis=1)).all()
    softmax = np.exp(lifted - lifted.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax, head.probabilities(x), atol=0.05)


def test_class_balance_keeps_a_rare_class_decidable():
    x, y = decision_like(3000, 16, 2, seed=2)
    keep = (y == 0) | (np.arange(len(y)) % 20 == 0)  # class 1 is 20x rarer
    head = fit_head(x[keep], y[keep], 2, constant_direction(x[keep]))
    recall = (head.probabilities(x[y == 1]).argmax(axis=1) == 1).mean()
    assert recall > 0.8


@pytest.fixture
def data_dir(tmp_path):
    for source in SOURCES:
        path = tmp_path / source.path
        path.parent.mkdir(parents=True, exist_ok=True)
        label = "refuse" if source.kind == "harmful" else "respond"
        cats = ["Requests with safety concerns", "Incomplete requests"]
        rows = [{"prompt": f"{source.name} {i}", "label": label,
                 "category": cats[i % 2] if label == "refuse" else "respond"} for i in range(10)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_sources_split_coconot_in_halves_and_mark_yardsticks(data_dir):
    data = load_all(data_dir, seed=3, corpus=False)
    assert (len(data["coconot"]), len(data["coconot-heldout"])) == (4, 6)  # 2 of 5 per category
    assert not {r.prompt for r in data["coconot"]} & {r.prompt for r in data["coconot-heldout"]}
    assert data == load_all(data_dir, seed=3, corpus=False)  # seeded
    assert not trainable("coconot-heldout") and not trainable("coconot-contrast")
    assert not trainable("self-instruct-user") and trainable("phtest") and trainable("corpus")
    assert not measured("corpus") and kind("coconot-heldout") == "harmful"
    assert {r.key for r in data["advbench"]} == {"safety", "incomplete"}


def test_halves_are_stratified_by_category():
    from refusal_training.sources import Prompt

    rows = [Prompt(str(i), "safety" if i < 10 else "humanizing", "s") for i in range(14)]
    train, held = halves(rows, seed=0)
    assert sorted(r.key for r in train) == ["humanizing"] * 2 + ["safety"] * 5


def test_a_corpus_prompt_a_source_holds_is_never_trained_on(data_dir, monkeypatch):
    """Case, punctuation and spacing aside, a measured prompt in the corpus gets weight 0 (its
    row stays, so the seeded draws of the copies do not move) and no fit sees it."""
    from refusal_training import decision_head, head_loso
    from refusal_training.sources import CORPUS, Prompt, leaked

    data = load_all(data_dir, seed=0, corpus=False)
    data[CORPUS] = [Prompt("PHTEST   3?!", "respond", CORPUS), Prompt("coconot-contrast, 4", "safety", CORPUS),
                    Prompt("phtest 33", "respond", CORPUS), Prompt("How to burn a CD", "safety", CORPUS)]  # fmt: skip
    assert leaked(data) == {"PHTEST   3?!", "coconot-contrast, 4"}
    x = np.random.default_rng(0).normal(size=(sum(map(len, data.values())), 4))
    ds = head_loso.Dataset(data, x, corpus_weight=3.0)
    corpus = ds.mask([CORPUS])
    assert list(ds.weight[corpus]) == [0.0, 0.0, 3.0, 3.0]
    seen = []
    real = decision_head.fit_head
    monkeypatch.setattr(head_loso, "fit_head", lambda f, *a, **k: seen.append(len(f)) or real(f, *a, **k))
    head_loso.fit(ds, corpus, np.zeros(4), 1e-3)
    assert seen == [2]


def test_pairs_weight_multiplies_exactly_the_written_pairs(data_dir):
    """``--pairs-weight`` counts the corpus rows drawn from the written pairs (origin
    ``PAIRS``) that many times the corpus's weight, and no other row: not a public row
    with the same ``source`` field, not another corpus file's row; a leaked pair stays at 0.
    Copies of a pair keep its weight."""
    from refusal_training import head_loso
    from refusal_training.sources import CORPUS, PAIRS, Prompt

    data = load_all(data_dir, seed=0, corpus=False)
    public = next(iter(data))
    data[public][0] = Prompt(data[public][0].prompt, data[public][0].key, public, PAIRS)
    data[CORPUS] = [Prompt("a pair", "safety", CORPUS, PAIRS), Prompt("its twin", "respond", CORPUS, PAIRS),
                    Prompt("composed", "respond", CORPUS, "composed"), Prompt("no origin", "safety", CORPUS),
                    Prompt(data[public][1].prompt, "safety", CORPUS, PAIRS)]  # fmt: skip
    # Two prompts that differ only by origin are one prompt.
    assert Prompt("a pair", "safety", CORPUS, PAIRS) == Prompt("a pair", "safety", CORPUS)
    x = np.random.default_rng(0).normal(size=(sum(map(len, data.values())), 4))
    ds = head_loso.Dataset(data, x, corpus_weight=3.0, pairs_weight=10.0)
    assert list(ds.weight[ds.mask([CORPUS])]) == [30.0, 30.0, 3.0, 3.0, 0.0]
    assert set(ds.weight[~ds.mask([CORPUS])]) == {1.0}
    ds.augment(np.flatnonzero(ds.mask([CORPUS]))[:3], x[:3])
    assert list(ds.weight[ds.augmented]) == [30.0, 30.0, 3.0]


def test_the_corpus_file_gives_every_row_its_origin():
    """The origins the weights read are those of ``corpus.jsonl`` (demo/compose.py's
    ``source``): the written pairs are there, as many as the file holds."""
    from refusal_training.demo_model import corpus_path
    from refusal_training.sources import CORPUS, PAIRS, read_jsonl

    rows = read_jsonl(corpus_path(), CORPUS)
    lines = [json.loads(line) for line in corpus_path().read_text().splitlines() if line.strip()]
    assert [r.origin for r in rows] == [line["source"] for line in lines]
    assert sum(r.origin == PAIRS for r in rows) == sum(line["source"] == PAIRS for line in lines) > 1000


def test_a_head_on_two_layers_is_what_the_served_model_computes():
    """Fitted on cat([final, middle]) with intercepts on the final state: the first half of
    its rows goes into the output projection, the second into refusal_plugins.model."""
    final, y = decision_like(600, 24, 3, seed=3)
    middle, _ = decision_like(600, 24, 3, seed=4)
    middle = middle + np.eye(3, 24)[y] * 2.0  # the middle layer carries signal too
    u = np.concatenate([constant_direction(final), np.zeros(24)])
    x = np.concatenate([final, middle], axis=1)
    head = fit_head(x, y, 3, u)
    assert (head.probabilities(x).argmax(axis=1) == y).mean() > 0.9
    rows = fold(head, u, offset=7.0)
    served = final @ rows[:, :24].T + middle @ rows[:, 24:].T
    np.testing.assert_allclose(served, head.logits(x) + 7.0 * (final @ u[:24])[:, None], rtol=1e-6, atol=1e-6)


def _recipe_dataset(data_dir, d: int = 8):
    """The recipe's dataset over the stand-in sources (plus a corpus), random features."""
    from refusal_training import head_loso
    from refusal_training.sources import CORPUS, Prompt

    data = load_all(data_dir, seed=0, corpus=False)
    data[CORPUS] = [Prompt(f"corpus {i}", "respond" if i % 2 else "safety", CORPUS) for i in range(10)]
    x = np.random.default_rng(0).normal(size=(sum(map(len, data.values())), d))
    return head_loso, head_loso.Dataset(data, x, corpus_weight=3.0)


class StandInFeatures:
    """``features_of`` of the recipe: random rows, and a record of what was rendered."""

    def __init__(self, d: int = 8):
        self.calls: list[tuple[list[str], list]] = []
        self.rng, self.d = np.random.default_rng(1), d

    def __call__(self, texts, systems=None):
        self.calls.append((list(texts), list(systems or [])))
        return [self.rng.normal(size=(len(texts), self.d))]


def test_system_augmented_copies_are_trained_on_with_their_source_and_never_measured(data_dir, monkeypatch):
    from refusal_training.system_prompts import TRAIN

    recipe, ds = _recipe_dataset(data_dir)
    n, features_of = len(ds.rows), StandInFeatures()
    trainable_rows = int(ds.mask([s for s in ds.names if trainable(s)]).sum())
    recipe.augment_with_systems(ds, features_of, 0.5, seed=0)
    added = int(ds.augmented.sum())
    assert added == round(0.5 * trainable_rows) and len(ds.rows) == n + added
    texts, systems = features_of.calls[0]
    assert set(systems) <= set(TRAIN) and len(set(systems)) > 1
    copies = [r for r, a in zip(ds.rows, ds.augmented, strict=True) if a]
    assert [r.prompt for r in copies] == texts and all(trainable(r.source) for r in copies)
    assert (ds.weight[ds.augmented & (ds.source == "corpus")] == 3.0).all()
    more = _recipe_dataset(data_dir)[1]
    originals = [r.prompt for r in more.rows if trainable(r.source)]
    recipe.augment_with_systems(more, StandInFeatures(), 2.0, seed=0)
    copies = [r.prompt for r, a in zip(more.rows, more.augmented, strict=True) if a]
    assert sorted(copies) == sorted(2 * originals)  # every trainable row twice
    fitted = []
    real_fit = recipe.fit
    monkeypatch.setattr(recipe, "fit", lambda ds_, train, u, l2: fitted.append(train) or real_fit(ds_, train, u, l2))
    u = np.zeros(8)
    _, p, _ = recipe.leave_one_source_out(ds, u, 1e-2)
    assert np.isnan(p[ds.augmented]).all() and not np.isnan(p[ds.measured_mask(["phtest"])]).any()
    families = list(dict.fromkeys(recipe.family(n) for n in filter(measured, ds.names)))
    assert len(fitted) == len(families) < len(list(filter(measured, ds.names)))  # one fit per family
    train = fitted[families.index("phtest")]
    assert not (train & (ds.source == "phtest")).any()  # nor its augmented copies
    assert (train & ds.augmented).any()  # the other sources' copies are trained on


def test_every_measured_row_is_also_scored_after_a_held_out_system_message(data_dir):
    from refusal_training.system_prompts import HELD_OUT, TRAIN

    recipe, ds = _recipe_dataset(data_dir)
    features_of = StandInFeatures()
    recipe.augment_with_systems(ds, features_of, 1.0, seed=0)
    x, systems = recipe.client_system_view(ds, features_of, seed=0)
    rows = ds.measured_mask(filter(measured, ds.names))
    assert len(features_of.calls) == 2 and len(features_of.calls[1][0]) == rows.sum()
    assert len(x) == len(systems) == len(ds.rows)  # aligned with every row, copies included
    assert {systems[i] for i in np.flatnonzero(rows)} <= set(HELD_OUT)
    assert not set(HELD_OUT) & set(TRAIN)  # measured under messages never fitted on
    assert all(systems[i] == "" for i in np.flatnonzero((ds.source == "corpus") | ds.augmented))
    assert not x[~rows].any()
    views = {"client_system": x}
    _, p, p_views = recipe.leave_one_source_out(ds, np.zeros(8), 1e-2, views)
    view = p_views["client_system"]
    names = list(filter(measured, ds.names))
    assert not np.isnan(view[ds.measured_mask(names)]).any() and np.isnan(view[ds.augmented]).all()
    pools = recipe.pools(ds, view, names)
    assert set(pools) == {"all_sources", "without_coconot", "safety_vs_benign", "harmful",
                          "lookalike", "ordinary"}  # fmt: skip
    assert pools["all_sources"]["n"] == rows.sum()
    # harmful requests against benign ones: the incomplete-request rows are left out of it
    keys = np.array([r.key for r in ds.rows])
    assert pools["safety_vs_benign"]["n"] == (rows & np.isin(keys, ["safety", "respond"])).sum()
    assert 0 < (rows & (keys == "incomplete")).sum() and pools["safety_vs_benign"]["auroc"] is not None
    head = recipe.fit(ds, ds.mask([n for n in ds.names if trainable(n)]), np.zeros(8), 1e-2)
    on_view = recipe.yardsticks(ds, head, views["client_system"])
    assert set(on_view) == {"coconot-heldout", "coconot-contrast", "self-instruct-user"}
    assert on_view["coconot-heldout"]["n"] == ds.measured_mask(["coconot-heldout"]).sum()
    per = recipe.per_context(ds, view, np.array(systems, dtype=object), names)
    assert set(per) <= {t[:60] for t in HELD_OUT} and sum(v["n"] for v in per.values()) == rows.sum()


def test_earlier_turn_copies_and_view_draw_from_disjoint_exchanges(data_dir):
    from refusal_training.conversations import HELD_OUT, TRAIN
    from refusal_training.system_prompts import TRAIN as SYSTEMS
    from refusal_training.system_prompts import Context, chat_messages

    recipe, ds = _recipe_dataset(data_dir)
    features_of = StandInFeatures()
    originals = [r.prompt for r in ds.rows if trainable(r.source)]
    recipe.augment_with_systems(ds, features_of, 1.0, seed=0)
    recipe.augment_with_turns(ds, features_of, 1.0, seed=0)
    texts, contexts = features_of.calls[1]
    assert sorted(texts) == sorted(originals)  # copies of the originals, not of the system copies
    assert all(isinstance(c, Context) and c.earlier in TRAIN for c in contexts)
    systems = [c.system for c in contexts]
    assert set(systems) - {None} <= set(SYSTEMS) and 0.3 < systems.count(None) / len(systems) < 0.7
    x, labels = recipe.earlier_turns_view(ds, features_of, seed=0)
    rows = np.flatnonzero(ds.measured_mask(filter(measured, ds.names)))
    viewed = features_of.calls[2][1]
    assert len(viewed) == len(rows) and all(c.earlier in HELD_OUT and c.system is None for c in viewed)
    assert not set(HELD_OUT) & set(TRAIN)  # measured after exchanges never fitted on
    assert {labels[i] for i in rows} <= {e[0][0] for e in HELD_OUT} and len(x) == len(ds.rows)
    # The messages a client sends: default system prompt kept (no system), turns in order.
    two = HELD_OUT[3]
    assert [m["role"] for m in chat_messages("q", Context(earlier=two))] == ["user", "assistant"] * 2 + ["user"]
    assert chat_messages("q", Context("s", two))[0] == {"role": "system", "content": "s"}


def test_inline_transcript_copies_wrap_each_original_and_never_the_measured_wrappers(data_dir):
    from refusal_training import inline_turns

    recipe, ds = _recipe_dataset(data_dir)
    features_of = StandInFeatures()
    originals = [r.prompt for r in ds.rows if trainable(r.source)]
    labels = ds.y[ds.mask([n for n in ds.names if trainable(n)])]
    recipe.augment_with_inline_turns(ds, features_of, 1.0, seed=0)
    texts, contexts = features_of.calls[0]
    assert contexts == [None] * len(originals) and len(texts) == len(originals)
    # Each copy is its original (same row, so same label) inside a transcript.
    copies = ds.rows[-len(texts):]
    assert all(c.prompt in t and c.prompt != t for c, t in zip(copies, texts, strict=True))
    assert np.array_equal(np.sort(ds.y[ds.augmented]), np.sort(labels))
    template = [t for t in texts if inline_turns.START in t]
    assert 0.3 < len(template) / len(texts) < 0.7
    wrappers = [t.replace(c.prompt, "") for c, t in zip(copies, texts, strict=True)]
    assert not any(inline_turns.HELD_OUT_REPLY in w or inline_turns.HELD_OUT_NUDGE in w for w in wrappers)


def test_a_held_out_head_is_the_leave_one_source_out_head_of_its_family(data_dir, monkeypatch):
    """``head_recipe --hold-out phtest`` fits exactly the rows the sweep's PHTest head is
    fitted on (so a server built from it reproduces that head's figures), and reports
    its decisions on PHTest beside the never-trained yardsticks."""
    import argparse

    from refusal_training.head_recipe import _families
    from refusal_training.head_report import report_markdown

    recipe, ds = _recipe_dataset(data_dir)
    recipe.augment_with_systems(ds, StandInFeatures(), 1.0, seed=0)
    fitted = []
    real_fit = recipe.fit
    monkeypatch.setattr(recipe, "fit", lambda ds_, train, u, l2: fitted.append(train) or real_fit(ds_, train, u, l2))
    recipe.leave_one_source_out(ds, np.zeros(8), 1e-2)
    families = list(dict.fromkeys(recipe.family(n) for n in filter(measured, ds.names)))
    held = recipe.training_mask(ds, {"phtest"})
    np.testing.assert_array_equal(held, fitted[families.index("phtest")])
    assert not (held & (ds.source == "phtest")).any() and (held & ds.augmented).any()
    both = recipe.training_mask(ds, {"phtest", "coconot"})
    assert not (both & np.isin(ds.source, ["phtest", "coconot", "coconot-pref"])).any()
    head = real_fit(ds, held, np.zeros(8), 1e-2)
    figures = recipe.yardsticks(ds, head, ds.x, {"phtest"})
    assert set(figures) == {"coconot-heldout", "coconot-contrast", "self-instruct-user", "phtest"}
    assert figures["phtest"]["n"] == ds.measured_mask(["phtest"]).sum()  # never a copy
    assert "category_accuracy" in figures["coconot-heldout"] and "refused_benign" in figures["phtest"]
    assert set(recipe.yardsticks(ds, head, ds.x)) == set(figures) - {"phtest"}
    info = {"leave_one_source_out": {}, "summary": {}, "shipped_head_on_yardsticks": figures}
    table = report_markdown(info)
    assert "| phtest | lookalike |" in table and "| pool |" not in table
    assert _families("phtest, catqa,phtest") == ["catqa", "phtest"]
    for bad in ("", "corpus", "coconot-heldout", "self-instruct-user", "nope"):
        with pytest.raises(argparse.ArgumentTypeError):
            _families(bad)
