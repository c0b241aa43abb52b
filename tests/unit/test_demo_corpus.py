"""The demo corpus: a fresh, pure function of ``training/refusal_training/demo/sources`` with sane labels."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from refusal_plugins.vocab import COCONOT_CATEGORIES

DEMO = Path(__file__).resolve().parents[2] / "training" / "refusal_training" / "demo"


@pytest.fixture(scope="module")
def compose():
    spec = importlib.util.spec_from_file_location("demo_compose", DEMO / "compose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in (DEMO / "corpus.jsonl").read_text("utf-8").splitlines() if line]


def test_corpus_is_fresh(compose):
    assert compose.main(["--check"]) == 0, "run training/refusal_training/demo/compose.py to refresh corpus.jsonl"


def test_every_category_and_respond_present(rows):
    refuse = {r["category"] for r in rows if r["label"] == "refuse"}
    assert refuse == set(COCONOT_CATEGORIES.values())
    assert any(r["label"] == "respond" for r in rows)
    assert all(r["label"] in ("refuse", "respond") for r in rows)
    assert all(r["prompt"].strip() and r["response"].strip() and r.get("source") for r in rows)


def test_no_prompt_with_two_labels(compose, rows):
    labels: dict[str, str] = {}
    for r in rows:
        key = compose._key(r["prompt"])
        assert labels.setdefault(key, r["label"]) == r["label"], r["prompt"]


def test_size_stays_small(rows):
    assert 1000 < len(rows) < 20000


def test_files_added_later_change_no_earlier_row(compose, monkeypatch):
    """One generator draws every family, so the ``LATER`` files are drawn last: adding one
    keeps every earlier row (and the features cached for it) as it was."""
    rows = compose.compose()
    later = set(compose.LATER)
    first = [p for p in compose._family_files() if p.name not in later]
    monkeypatch.setattr(compose, "_family_files", lambda: first)
    earlier = compose.compose()
    assert 0 < len(earlier) < len(rows) and rows[: len(earlier)] == earlier


def test_short_questions_leave_the_probes_out(rows):
    """The probe questions docs/quality quotes stay a check: no short-question row asks them."""
    short = [r["prompt"].lower() for r in rows if r["source"] == "short-question"]
    assert len(short) > 200
    for word in ("hamlet", "france", "spider", "pancake", "'hello'", "17 times 23", "romeo"):
        assert not [p for p in short if word in p], word


def test_the_demo_model_leaves_the_later_rows_out(rows):
    """They were written for the SmolLM2 head; the demo keeps the stream it was measured on."""
    from refusal_training.demo_model import NOT_FOR_DEMO, load_corpus

    kept = [r for r in rows if r["source"] not in NOT_FOR_DEMO]
    assert {"short-question", "written-2"} <= NOT_FOR_DEMO
    assert {r["source"] for r in rows} >= NOT_FOR_DEMO and len(kept) < len(rows)
    assert [e.prompt for e in load_corpus()] == [r["prompt"] for r in kept]


def test_later_written_rows_keep_their_file_as_source(rows):
    """``written-2.jsonl``'s rows come after every composed row, named by their file, with
    both labels and every refusal category."""
    later = [r for r in rows if r["source"] == "written-2"]
    assert len(later) > 1500 and rows[-len(later):] == later
    assert {r["label"] for r in later} == {"refuse", "respond"}
    refused = {r["category"] for r in later if r["label"] == "refuse"}
    assert refused == set(COCONOT_CATEGORIES.values())


def test_no_written_row_copies_a_shared_prompt(rows, shared_data):
    """Rows written for this project are not prompts of ``../shared/data`` (case and
    punctuation aside); the recipe also never trains on a corpus prompt a source holds."""
    from refusal_training.sources import same_words

    shared = {same_words(json.loads(line)["prompt"]) for path in shared_data.rglob("*.norm.jsonl")
              for line in path.read_text("utf-8").splitlines() if line}  # fmt: skip
    assert len(shared) > 5000
    written = [r["prompt"] for r in rows if r["source"] in ("written", "written-2")]
    assert not [p for p in written if same_words(p) in shared]
