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


def _demo(cache_dir: Path | None, force: bool, artefact: Path | None) -> Path:
    from .demo_model import build_demo_model, demo_model_dir

    if artefact is not None:
        raise ValueError("the demo model is trained, not assembled from a head artefact")
    return build_demo_model(demo_model_dir(cache_dir), force=force)


def _smollm2(cache_dir: Path | None, force: bool, artefact: Path | None) -> Path:
    from .smollm2_model import build_smollm2_refusal

    return build_smollm2_refusal(cache_dir, force=force, artefact=artefact)


ARTEFACT_HELP = ("smollm2: assemble this head artefact (a head_recipe --out run's "
                 "smollm2_refusal.safetensors) instead of the committed one")

#: Name -> builder ((cache directory, rebuild even if cached, head artefact or None for
#: the committed one) -> built model directory).
BUILDERS: dict[str, Callable[[Path | None, bool, Path | None], Path]] = {
    "demo": _demo,
    "smollm2": _smollm2,
}


def build(
    name: str, cache_dir: Path | None = None, force: bool = False, artefact: Path | None = None
) -> Path:
    """The directory of model ``name``, built first if it is not cached yet (or ``force``);
    ``artefact``: the head to assemble instead of the committed one (``head_recipe --out``)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(BUILDERS)}")
    if artefact is not None and not artefact.is_file():
        raise ValueError(f"no head artefact at {artefact}")
    return BUILDERS[name](cache_dir, force, artefact)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refusal_training.build", description=__doc__)
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("--cache-dir", type=Path, help="default: REFUSAL_GATEWAY_CACHE_DIR")
    parser.add_argument("--artefact", type=Path, help=ARTEFACT_HELP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    print(build(args.name, args.cache_dir, artefact=args.artefact), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
