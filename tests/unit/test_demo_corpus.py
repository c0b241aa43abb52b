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
