"""``python -m refusal_training.build NAME``: build a named model once, print its directory.

The gateway's launcher runs this in a child process when ``--model`` names a
model instead of a directory, so ``refusal-gateway serve`` imports nothing of
the training kit (and none of its heavy dependencies). Builds are cached under
the cache directory (:mod:`.paths`) and keyed by everything that shapes them,
so a later start only finds the directory. Progress goes to stderr; stdout
holds the directory alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _demo(cache_dir: Path | None, force: bool) -> Path:
    from .demo_model import build_demo_model, demo_model_dir

    return build_demo_model(demo_model_dir(cache_dir), force=force)


def _smollm2(cache_dir: Path | None, force: bool) -> Path:
    from .smollm2_model import build_smollm2_refusal

    return build_smollm2_refusal(cache_dir, force=force)


#: Name -> builder ((cache directory, rebuild even if cached) -> built model directory).
BUILDERS: dict[str, Callable[[Path | None, bool], Path]] = {"demo": _demo, "smollm2": _smollm2}


def build(name: str, cache_dir: Path | None = None, force: bool = False) -> Path:
    """The directory of model ``name``, built first if it is not cached yet (or ``force``)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[name](cache_dir, force)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refusal_training.build", description=__doc__)
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("--cache-dir", type=Path, help="default: REFUSAL_GATEWAY_CACHE_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    print(build(args.name, args.cache_dir), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
