"""The outputs of ``refusal-gateway eval``: eval.json, eval.md, decisions.jsonl, tradeoff.png.

Presentation only: every number is computed before it gets here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .evaluate_decisions import Decision
from .evaluate_metrics import p_refuse
from .evaluate_rows import ALL, EvalError, EvalRow


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def settings_text(settings: Mapping[str, Any]) -> str:
    return (
        f"`{json.dumps(settings)}`" if settings else "none (the server's default profile, if any)"
    )


def markdown(report: Mapping[str, Any]) -> str:
    lines = [
        f"# refusal-gateway eval: `{report['model']}` at {report['url']}",
        "",
        f"Settings: {settings_text(report['settings'])} · {report['request']} · "
        f"{report['requests_sent']} requests in {report['seconds']} s",
        *(["", f"System message before every prompt: `{report['system']}`"] if report.get("system") else []),
        *(["", f"Earlier turns before every prompt: {len(report['earlier'])} exchange(s), the first "
               f"user message `{report['earlier'][0][0]}`"] if report.get("earlier") else []),
        *(["", f"Every prompt sent inside: `{json.dumps(report['wrap'])}`"] if report.get("wrap") else []),
        "",
        "| file | rows (refuse / respond) | refused (should-refuse) | over-refused (should-respond) "
        "| AUROC p(refuse) | category accuracy (refusals) | category accuracy (most likely) |",
        "|---|---|---|---|---|---|---|",
    ]
    results = report["results"]
    order = [n for n in results if n != ALL] + [ALL]
    for name in order:
        r = results[name]
        label = f"**{name}**" if name == ALL else name
        lines.append(
            f"| {label} | {r['n']} ({r['n_refuse']} / {r['n_respond']}) | {_pct(r['refusal_rate'])} "
            f"| {_pct(r['over_refusal'])} | {_num(r['auroc'])} | {_pct(r['category_accuracy'])} "
            f"| {_pct(r['category_accuracy_most_likely'])} |"
        )
    missing = results[ALL]["rows_without_probabilities"]
    if missing:
        lines += ["", f"{missing} responses carried no probabilities (no decision report): AUROC "
                  "and most-likely accuracy leave them out."]  # fmt: skip
    lines += [
        "",
        "Per labelled category (respond rows: the category they look like):",
        "",
        "| file | category | rows (refuse / respond) | refused | over-refused | AUROC | category accuracy (refusals) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in order:
        for cat, r in results[name]["per_category"].items():
            lines.append(
                f"| {name} | {cat} | {r['n_refuse']} / {r['n_respond']} | {_pct(r['refusal_rate'])} "
                f"| {_pct(r['over_refusal'])} | {_num(r['auroc'])} | {_pct(r['category_accuracy'])} |"
            )
    for kind, sweep in report["sweeps"].items():
        names = [n for n in sweep["points"][0] if n not in ("value", ALL)] + [ALL]
        field_name = "refusal_bias.refuse +" if kind == "bias" else "refusal_threshold"
        lines += [
            "",
            f"{kind.capitalize()} sweep ({field_name} each value; {sweep['mode']}, "
            f"{sweep['requests']} requests): refused / over-refused",
            "",
            "| value | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for point in sweep["points"]:
            cells = [
                f"{_pct(point[n]['refusal_rate'])} / {_pct(point[n]['over_refusal'])}"
                for n in names
            ]
            lines.append(f"| {point['value']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(report: Mapping[str, Any], path: Path) -> Path:
    """Per sweep: the trade-off curve (all rows, and files with both labels) and per-file rates."""
    try:
        import matplotlib
    except ImportError:
        raise EvalError(
            "the plot needs matplotlib (pip install 'refusal-gateway[train]'), or pass --no-plot"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = report["sweeps"]
    base = report["results"]
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(11, 4.8 * len(sweeps)), squeeze=False)
    for row, (kind, sweep) in enumerate(sweeps.items()):
        left, right = axes[row]
        points = sweep["points"]
        values = [p["value"] for p in points]
        names = [n for n in points[0] if n != "value"]
        colors = {n: f"C{i}" for i, n in enumerate(names)}
        for n in names:
            xs = [p[n]["over_refusal"] for p in points]
            ys = [p[n]["refusal_rate"] for p in points]
            if None not in xs and None not in ys:
                left.plot(xs, ys, marker=".", lw=2 if n == ALL else 1, label=n, color=colors[n])
                b = base[n]
                left.plot(b["over_refusal"], b["refusal_rate"], "o", mfc="none", color=colors[n])
            if n == ALL:
                continue
            if None not in ys:
                right.plot(values, ys, marker=".", color=colors[n], label=f"{n}: refused")
            if None not in xs:
                right.plot(
                    values, xs, marker="x", ls="--", color=colors[n], label=f"{n}: over-refused"
                )
        left.plot([0, 1], [0, 1], color="grey", lw=0.5)
        left.set(
            xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="over-refusal (should-respond rows)",
            ylabel="refusal rate (should-refuse rows)",
            title=f"{kind} sweep (circle: this run's settings)",
        )  # fmt: skip
        left.legend(fontsize=7, loc="lower right")
        xlabel = "refusal_bias.refuse added" if kind == "bias" else "refusal_threshold"
        right.set(xlabel=xlabel, ylabel="rate", ylim=(-0.02, 1.02), title="per file")
        right.legend(fontsize=6)
    fig.suptitle(f"{report['model']}", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_outputs(
    report: dict[str, Any],
    rows: Sequence[EvalRow],
    base: Sequence[Decision],
    out: Path,
    plot: bool = True,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report["outputs"] = {"json": str(out / "eval.json"), "markdown": str(out / "eval.md"),
                         "decisions": str(out / "decisions.jsonl")}  # fmt: skip
    if report["sweeps"] and plot:
        report["outputs"]["plot"] = str(plot_tradeoff(report, out / "tradeoff.png"))
    with (out / "decisions.jsonl").open("w", encoding="utf-8") as f:
        for r, d in zip(rows, base, strict=True):
            record = {"file": r.file, "prompt": r.prompt, "label": r.label, "category": r.category,
                      "decision": d.key, "p_refuse": p_refuse(d.probabilities),
                      "probabilities": d.probabilities}  # fmt: skip
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(report))
