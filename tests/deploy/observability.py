"""Read the deployment's observability files: dashboard queries and rule expressions.

Shared by the offline checks in tests/deploy and by the real-Prometheus proof
in tests/e2e/test_observability.py, so both look at exactly the same queries.
No network, no Prometheus: parsing only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULE_TESTS_DIR = DEPLOY / "prometheus" / "tests"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"
PROVISIONING_DIR = GRAFANA_DIR / "provisioning"
K8S_DIR = DEPLOY / "k8s"

#: The scrape job every rule and dashboard selects on (deploy/prometheus/prometheus.yml).
JOB = "refusal-gateway"
#: Where every alert's ``runbook_url`` points: an absolute URL (Alertmanager
#: and Grafana link it outside this repository), plus ``#<alert name, lower case>``.
RUNBOOK_BASE = "https://github.com/refusal-gateway/refusal-gateway/blob/main/deploy/README.md"

#: How a test stands in for Grafana's own variables when it evaluates a panel
#: query through Prometheus' HTTP API. Windows are wide enough to cover a whole
#: test run; ``$model``, ``$instance`` and ``$profile`` are regex matchers.
DEFAULT_GRAFANA_VARS = {
    "__rate_interval": "5m",
    "__interval": "15s",
    "__range": "1h",
    "model": ".*",
    "instance": ".*",
    "profile": ".*",
}

_COMPARISON = re.compile(
    r"^(?P<lhs>.+?)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<threshold>-?[0-9.]+(?:[eE][+-]?[0-9]+)?)\s*$",
    re.DOTALL,
)
_MODIFIER = re.compile(
    r"^(?:on|ignoring)\s*\([^)]*\)\s*(?:group_(?:left|right)(?:\s*\([^)]*\))?\s*)?"
)


@dataclass(frozen=True)
class PanelQuery:
    """One ``targets[].expr`` of one dashboard panel."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref_id}"


@dataclass(frozen=True)
class RuleExpr:
    """A rule's expression, or the data-carrying part of an alert's comparison."""

    name: str  # recording rule name or alert name (with the clause index for gates)
    kind: str  # "record" or "alert"
    expr: str  # what must return data
    op: str | None = None
    threshold: float | None = None


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels that show data (rows only group others)."""
    return [p for p in iter_panels(dashboard.get("panels") or []) if p.get("type") != "row"]


def panel_queries(path: Path) -> list[PanelQuery]:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    return [
        PanelQuery(dashboard["uid"], panel["title"], target["refId"], target["expr"])
        for panel in data_panels(dashboard)
        for target in panel.get("targets") or []
    ]


def all_panel_queries() -> list[PanelQuery]:
    return [q for path in dashboard_files() for q in panel_queries(path)]


def substitute_grafana_vars(expr: str, values: dict[str, str] | None = None) -> str:
    """``expr`` with Grafana's ``$var`` / ``${var}`` references replaced by ``values``."""
    values = {**DEFAULT_GRAFANA_VARS, **(values or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain")
        if name not in values:
            raise KeyError(f"no test value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(?P<braced>\w+)(?::\w+)?\}|\$(?P<plain>\w+)", replace, expr)


def split_top_level_and(expr: str) -> list[str]:
    """Split ``a and on (x) b`` at ``and`` operators outside parentheses and strings."""
    parts, depth, start, i, quote = [], 0, 0, 0, None
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and re.match(r"\sand\s", expr[i : i + 5]):
            parts.append(expr[start:i])
            start = i + 5
            i += 4
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def alert_clauses(name: str, expr: str) -> list[RuleExpr]:
    """The ``<series> <op> <number>`` clauses of an alert expression.

    Raises ``ValueError`` if a clause does not follow that convention (so a new
    alert cannot silently escape the data check).
    """
    clauses = []
    for index, clause in enumerate(split_top_level_and(" ".join(expr.split()))):
        clause = _MODIFIER.sub("", clause)
        match = _COMPARISON.match(clause)
        if not match:
            raise ValueError(f"alert {name}: clause {clause!r} is not '<series> <op> <number>'")
        label = name if index == 0 else f"{name} (gate {index})"
        clauses.append(
            RuleExpr(label, "alert", match["lhs"].strip(), match["op"], float(match["threshold"]))
        )
    return clauses


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def all_rules() -> list[dict[str, Any]]:
    return [rule for path in rule_files() for rule in rules(path)]


def rule_data_exprs() -> list[RuleExpr]:
    """What must return data: every recording rule, every alert's data side."""
    out: list[RuleExpr] = []
    for rule in all_rules():
        if "record" in rule:
            out.append(RuleExpr(rule["record"], "record", " ".join(rule["expr"].split())))
        else:
            out.extend(alert_clauses(rule["alert"], rule["expr"]))
    return out


def scrape_job() -> dict[str, Any]:
    """The gateway's scrape config in deploy/prometheus/prometheus.yml."""
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [c for c in config["scrape_configs"] if c["job_name"] == JOB]
    return job
