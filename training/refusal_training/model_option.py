"""``--model`` and ``--cache-dir`` of the kit's commands that load a model (score, calibrate).

The same contract as ``refusal-gateway serve``'s flags, without importing the
gateway's settings: ``--model`` is a model directory or the name of a model
the kit builds (:mod:`.build`, built once and cached), defaulting to
``REFUSAL_GATEWAY_MODEL`` and then the demo model; ``--cache-dir`` defaults to
``REFUSAL_GATEWAY_CACHE_DIR`` (:mod:`.paths`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

MODEL_ENV = "REFUSAL_GATEWAY_MODEL"
DEFAULT_MODEL = "demo"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--cache-dir``."""
    parser.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV, DEFAULT_MODEL),
        help="refusal-token model directory (with refusal_manifest.json), or the name of a model "
        f"the kit builds on first use, e.g. 'demo' [env {MODEL_ENV}, default {DEFAULT_MODEL}]",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where built models are cached [env REFUSAL_GATEWAY_CACHE_DIR]",
    )


def model_dir_from_args(args: argparse.Namespace) -> Path:
    """The model directory ``--model`` names; a named model is built first if not cached."""
    from .build import BUILDERS, build

    if args.model in BUILDERS:
        return build(args.model, args.cache_dir)
    return Path(args.model).expanduser().resolve()
