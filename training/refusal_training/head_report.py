"""The Markdown report of a ``head_recipe`` run (``<out>/report.md``, and printed).

Apart from the recipe because what a run computes and how it is shown are two jobs:
the leave-one-source-out table and pools, then the artefact's head on every source it
never trained on (for a ``--hold-out`` head, the figures a server must reproduce).
"""

from __future__ import annotations

from .sources import kind


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f} %"


def report_markdown(info: dict) -> str:
    """The leave-one-source-out table and pools (none for a ``--hold-out`` head), then the
    head's decisions on every source it never trained on."""
    lines = []
    if info["leave_one_source_out"]:
        lines += _decisions_table("source (left out with its family)", info["leave_one_source_out"])
        lines += ["", "| pool | AUROC | harmful refused | benign refused |", "|---|---|---|---|"]
        for name, s in info["summary"].items():
            value = "–" if s["auroc"] is None else f"{s['auroc']:.3f}"
            lines.append(f"| {name} | {value} | {_pct(s.get('refused_harmful'))} "
                         f"| {_pct(s.get('refused_benign'))} |")  # fmt: skip
        lines.append("")
    never = {n: {"kind": kind(n), **f} for n, f in info["shipped_head_on_yardsticks"].items()}
    lines += _decisions_table("source never trained on (the artefact's head)", never)
    return "\n".join(lines) + "\n"


def _decisions_table(title: str, figures: dict) -> list[str]:
    lines = [f"| {title} | kind | n | refused | category accuracy |", "|---|---|---|---|---|"]
    for name, f in figures.items():
        refused = f.get("refused_harmful", f.get("refused_benign"))
        lines.append(f"| {name} | {f['kind']} | {f['n']} | {_pct(refused)} "
                     f"| {_pct(f.get('category_accuracy'))} |")  # fmt: skip
    return lines
