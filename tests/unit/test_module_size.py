"""Every module of ours stays under 300 lines: past that, it is doing more than one job.

Data (JSONL corpora, canary prompts, artefacts) lives in non-Python files and
is not counted; a module that grows past the limit is split by job, with
names that say what each part is.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("server", "plugins", "training")
MAX_LINES = 300


def test_every_module_is_under_300_lines():
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*.py")
    }
    assert sizes, "no modules found"
    too_long = {name: n for name, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job): {too_long}"
