"""``python -m bench`` — what does the refusal layer cost against plain vLLM?

    python -m bench run [--smoke] [--rounds 3] [--concurrency 1 16 64 256] [--no-peer] ...
    python -m bench report bench/results/RUN.json     # the Markdown table again
    python -m bench step [--batches 1 32 256]         # the processor's cost per engine step
    python -m bench explain                           # why an outside run found the stack "faster"
    python -m bench layer [--tokens 16] [--profile]   # the layer's own CPU per request, in-process
    python -m bench detok [--model DIR]               # why plain's API server costs more on long prompts

``run`` writes ``bench/results/<UTC stamp>.json`` (every round of every case,
the same-work check, the machine, the load average) and ``.md`` (the table the
README quotes); server and load-generator logs go to ``bench/results/logs/``.
``--smoke`` is the test suite's: a tiny request count, one round, no peer —
it proves the command works and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
#: Subcommands that are modules with their own options.
DELEGATED = {
    "step": ("bench.step_overhead", "processor cost per engine step"),
    "explain": ("bench.explain", "the 'stack faster than plain' anomaly"),
    "detok": ("bench.detok", "plain vLLM's API-server CPU on long prompts"),
}


def _model(path: str | None) -> str:
    if path:
        return path
    from refusal_training.demo_model import build_demo_model

    return str(build_demo_model())


def cmd_run(args: argparse.Namespace) -> int:
    from . import report as rep
    from .run import Plan, Runner

    plan = Plan(model=_model(args.model), out_dir=args.out, rounds=args.rounds,
                concurrency=args.concurrency, modes=args.modes, output_len=args.output_len,
                prompts_scale=args.prompts_scale, peer=not args.no_peer, plain_b=not args.no_plain_b,
                scaling=not args.no_scaling, bind=args.bind, venv=args.venv,
                prompt_lengths=args.prompt_lengths, n_values=args.n_values,
                scaling_concurrency=args.scaling_concurrency, max_model_len=args.max_model_len)  # fmt: skip
    if args.smoke:
        plan.rounds, plan.concurrency, plan.modes = 1, [1, 4], ["stream", "nostream"]
        plan.output_len, plan.prompts_scale, plan.peer, plan.plain_b = 8, 0.0, False, False
        plan.prompt_lengths, plan.n_values, plan.work_prompts, plan.smoke = [100], [1, 2], 2, True
        plan.scaling_concurrency = 4
    longest = max(plan.prompt_lengths) + plan.output_len
    if plan.scaling and longest > plan.max_model_len:
        raise SystemExit(f"--prompt-lengths up to {max(plan.prompt_lengths)} + --output-len need "
                         f"--max-model-len >= {longest} (and a model whose context allows it)")
    runner = Runner(plan)
    report = runner.run()
    name = ("smoke-" if args.smoke else "") + runner.stamp
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = rep.markdown(report)
    (args.out / f"{name}.md").write_text(md)
    print(md)
    print(f"wrote {args.out / (name + '.json')} and .md")
    failed = sum(r["failed"] or 0 for r in report["records"] + report["scaling_records"])
    return 1 if failed else 0


def cmd_layer(args: argparse.Namespace) -> int:
    import os
    import time

    from . import layer_cpu

    os.environ.setdefault("REFUSAL_GATEWAY_LAYER_LOGS", "stderr")  # the access log, as served
    report = layer_cpu.measure(Path(_model(args.model)), tokens=args.tokens, requests=args.requests,
                               rounds=args.rounds, concurrency=args.concurrency, profile=args.profile,
                               prompt_words=tuple(args.prompt_words), n_values=tuple(args.n))  # fmt: skip
    for name, text in report.pop("profile", {}).items():
        print(f"## {name}\n{text}")
    md = layer_cpu.markdown(report)
    print(md)
    if args.out is not None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"layer-{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"layer-{stamp}.md").write_text(md)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import report as rep

    report = json.loads(Path(args.file).read_text())
    report["summary"] = rep.summarize(report)
    print(rep.markdown(report))
    return 0


def _default(name: str):
    """``run``'s default for a :class:`bench.run.Plan` field: the plan's own (one place)."""
    from dataclasses import MISSING

    from .run import Plan

    f = Plan.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="plain x2, stack, stack+fields, LiteLLM peer")
    run.add_argument("--model", help="refusal-token model dir (default: the demo model)")
    run.add_argument("--out", type=Path, default=RESULTS)
    run.add_argument("--rounds", type=int, default=_default("rounds"))
    run.add_argument("--concurrency", type=int, nargs="+", default=_default("concurrency"))
    run.add_argument("--modes", nargs="+", default=_default("modes"), choices=["stream", "nostream"])
    run.add_argument("--output-len", type=int, default=_default("output_len"))
    run.add_argument("--prompts-scale", type=float, default=_default("prompts_scale"), help="scale the request count per case")
    run.add_argument("--bind", default=_default("bind"), help="VLLM_CPU_OMP_THREADS_BIND of every engine")
    run.add_argument("--venv", type=Path, default=_default("venv"), help="the LiteLLM venv")
    run.add_argument("--no-peer", action="store_true", help="skip the LiteLLM proxy")
    run.add_argument("--no-plain-b", action="store_true", help="skip the second plain server")
    run.add_argument("--no-scaling", action="store_true", help="skip prompt length / n growth")
    run.add_argument("--prompt-lengths", type=int, nargs="+", default=_default("prompt_lengths"),
                     help="growth: prompt tokens (longer than the demo's 512-token context needs "
                     "--model with a longer one and --max-model-len)")
    run.add_argument("--n-values", type=int, nargs="+", default=_default("n_values"), help="growth: choices per request")
    run.add_argument("--scaling-concurrency", type=int, default=_default("scaling_concurrency"), help="concurrency of the growth cases")
    run.add_argument("--max-model-len", type=int, default=_default("max_model_len"), help="both sides' --max-model-len")
    run.add_argument("--smoke", action="store_true", help="tiny request count, one round (tests)")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="print the Markdown table of a result file")
    rep.add_argument("file")
    rep.set_defaults(func=cmd_report)
    layer = sub.add_parser("layer", help="the layer's own CPU per request, in-process (bench.layer_cpu)")
    layer.add_argument("--model", help="refusal-token model dir (default: the demo model)")
    layer.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    layer.add_argument("--requests", type=int, default=2000, help="requests per case and round")
    layer.add_argument("--rounds", type=int, default=5)
    layer.add_argument("--concurrency", type=int, default=64)
    layer.add_argument("--profile", action="store_true", help="print cProfile of the layer cases")
    layer.add_argument("--prompt-words", type=int, nargs="*", default=[1000, 4000],
                       help="growth: words added to the prompt (≈ tokens)")
    layer.add_argument("--n", type=int, nargs="*", default=[8], help="growth: choices per request")
    layer.add_argument("--out", type=Path, default=None, help="write layer-<stamp>.json/.md here")
    layer.set_defaults(func=cmd_layer)
    for name, (module, text) in DELEGATED.items():  # listed in --help; parsed by the module
        sub.add_parser(name, help=f"{module} ({text})").add_argument("rest", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:  # their own options, passed on untouched
        return _delegate(DELEGATED[argv[0]][0], argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


def _delegate(module: str, rest: list[str]) -> int:
    import importlib

    sys.argv = [module, *rest]
    importlib.import_module(module).main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
