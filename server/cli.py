"""The ``refusal-gateway`` command: ``serve``, ``build-model``, and the training kit's
``score``, ``eval``, ``calibrate``, ``train`` and ``recipe smollm2``.

Heavy imports (torch, transformers, vLLM) happen inside the subcommands, so
``refusal-gateway --help`` is instant. The kit's commands are only listed
here: their arguments go untouched to the kit module's own ``main(argv)``
(which owns its flags and ``--help``), so serving imports nothing of the kit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .settings import BUILT_MODELS, DEMO_MODEL, add_settings_arguments, settings_from_args

BANNER = """
refusal-gateway is serving {model!r} at {url}

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{{
    "model": "{model}",
    "messages": [{{"role": "user", "content": "How do I pick a lock?"}}],
    "refusal_bias": {{"safety": 5.0}}
  }}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='none'); \\
r = c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi!'}}], \\
extra_body={{'refusal_bias': {{'safety': -5.0}}}}); print(r.choices[0].message)"
"""


def _serve(args: argparse.Namespace, vllm_args: list[str]) -> int:
    from .launcher import serve

    settings = settings_from_args(args)
    model = settings.model_name()

    def ready(url: str) -> None:
        print(BANNER.format(url=url, model=model), flush=True)

    return serve(settings, vllm_args, on_ready=ready)


def _build_model(args: argparse.Namespace, extra: list[str]) -> int:
    """Build (or find) a named model in this process; print its directory."""
    from refusal_training.build import build

    name = getattr(args, "name", DEMO_MODEL)  # build-demo: the demo model
    try:
        path = build(name, args.cache_dir, force=args.force, artefact=getattr(args, "artefact", None))
    except ValueError as e:
        raise SystemExit(f"build-model: {e}") from None
    print(path)
    return 0


#: The training kit's commands: (words, module, help). The gateway only lists
#: them; their arguments go to the module's ``main(argv)``, which owns its
#: parser, so ``refusal-gateway serve`` imports nothing of the kit.
KIT_COMMANDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("score",), "refusal_training.score",
     "offline decision quality: AUROC of p(refuse) at the decision position, "
     "refusal / over-refusal rates and category accuracy on labelled JSONL prompts"),
    (("eval",), "refusal_training.evaluate",
     "decision quality of a running server over HTTP: refusal / over-refusal rates, "
     "AUROC, category accuracy per file and category; bias / threshold trade-off curves"),
    (("calibrate",), "refusal_training.calibrate",
     "fit refusal thresholds on labelled prompts; writes a policy file and plots"),
    (("train",), "refusal_training.train",
     "make a local Hugging Face causal LM a refusal-token model (SFT on labelled JSONL)"),
    (("recipe", "smollm2"), "refusal_training.smollm2_recipe",
     "SmolLM2-135M-Instruct -> refusal-token model, scored beside the demo model"),
)  # fmt: skip


def _kit_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, the module's argv) when ``argv`` names a kit command."""
    for words, module, _ in KIT_COMMANDS:
        if argv[: len(words)] == list(words):
            return module, argv[len(words) :]
    return None


def _add_kit_commands(sub: argparse._SubParsersAction) -> None:
    """List the kit's commands in ``--help`` (their flags: ``refusal-gateway CMD --help``)."""
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module, text in KIT_COMMANDS:
        parent = sub
        if len(words) > 1:
            if words[0] not in groups:
                group = sub.add_parser(words[0], help="end-to-end recipes: convert, train, score")
                groups[words[0]] = group.add_subparsers(dest=words[0], required=True)
            parent = groups[words[0]]
        parent.add_parser(words[-1], help=text, description=f"{text}. See {module}.", add_help=False)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="refusal-gateway", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a refusal-token model with vLLM and the gateway layer",
        description="Start vLLM's OpenAI server with the refusal gateway layer and logits "
        "processor. Arguments not listed here are passed to vLLM unchanged "
        "(e.g. --max-num-seqs 64 --api-server-count 2).",
    )
    add_settings_arguments(serve)
    serve.set_defaults(func=_serve)
    build = sub.add_parser(
        "build-model",
        help="build (or find) a model the training kit builds by name, e.g. 'demo'",
        description="Build a named model once (cached under --cache-dir) and print its "
        "directory; `serve --model NAME` does the same on first use.",
    )
    build.add_argument("name", help=f"the model's name, e.g. {', '.join(sorted(BUILT_MODELS))}")
    build.add_argument("--artefact", type=Path,
                       help="smollm2: assemble this head artefact (a head_recipe --out run's "
                            "smollm2_refusal.safetensors) instead of the committed one")  # fmt: skip
    build_demo = sub.add_parser("build-demo", help="build-model demo (kept for old scripts)")
    for command in (build, build_demo):
        command.add_argument(
            "--cache-dir", type=Path, help="where models are cached [env REFUSAL_GATEWAY_CACHE_DIR]"
        )
        command.add_argument("--force", action="store_true", help="rebuild even if cached")
        command.set_defaults(func=_build_model)
    _add_kit_commands(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    kit = _kit_command(argv)
    if kit is not None:
        module, rest = kit
        return importlib.import_module(module).main(rest)
    args, extra = parser().parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if extra and args.command != "serve":
        parser().error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args, extra)


if __name__ == "__main__":
    sys.exit(main())
