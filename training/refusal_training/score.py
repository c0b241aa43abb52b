"""``refusal-gateway score``: offline decision quality of a model directory.

    refusal-gateway score --model DIR labelled.jsonl [more.jsonl ...]

AUROC of p(refuse) at the decision position, refusal / over-refusal rates and
category accuracy on labelled JSONL prompts, computed with transformers
(:func:`.scoring.evaluate`); ``refusal-gateway eval`` measures the same
through a running server. The command lives here, apart from
:mod:`.scoring`, so the scoring functions other modules import stay a plain
library.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .model_option import add_model_arguments, model_dir_from_args

DESCRIPTION = (
    "Offline decision quality: AUROC of p(refuse) at the decision position, refusal / "
    "over-refusal rates and category accuracy on labelled JSONL prompts."
)


def parser(prog: str = "refusal-gateway score") -> argparse.ArgumentParser:
    """The flags of ``refusal-gateway score``."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_model_arguments(p)
    p.add_argument("data", nargs="+", help="JSONL files with prompt, label, category")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Score; print the report as JSON."""
    from .scoring import evaluate, read_jsonl

    args = parser().parse_args(argv)
    model_dir = model_dir_from_args(args)
    report = evaluate(model_dir, read_jsonl([Path(p) for p in args.data]))
    print(json.dumps({"model": str(model_dir), **report}, indent=2))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
