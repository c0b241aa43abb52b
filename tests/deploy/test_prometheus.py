"""Offline checks of the Prometheus config and rules with Prometheus' own promtool.

promtool parses PromQL exactly as the server does, so a typo in a rule fails
here rather than at deploy time; `promtool test rules` fires every alert on
synthetic series. The checks that need no promtool tie the rules to the
metrics the gateway really exports and to the runbook in deploy/README.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests.tools import unless_available

from . import observability as obs

PROMTOOL = shutil.which("promtool")
needs_promtool = unless_available(
    PROMTOOL is not None, "promtool not installed (Debian: apt-get install prometheus)"
)


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_promtool_check_config() -> None:
    # --syntax-only: the rule_files glob names container paths (/etc/prometheus/rules).
    result = _promtool("check", "config", "--syntax-only", obs.PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("path", obs.rule_files(), ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    result = _promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("path", sorted(obs.RULE_TESTS_DIR.glob("*.yml")), ids=lambda p: p.name)
def test_promtool_rule_unit_tests(path: Path) -> None:
    """Each alert fires on synthetic series that should trigger it, and stays quiet otherwise."""
    result = _promtool("test", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    """Every dashboard query parses in Prometheus (as a rule), with Grafana's variables filled in."""
    queries = obs.all_panel_queries()
    rules = [
        {"record": f"panel_query_{i}", "expr": obs.substitute_grafana_vars(q.expr)}
        for i, q in enumerate(queries)
    ]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = _promtool("check", "rules", path)
    names = "\n".join(f"panel_query_{i}: {q.name}" for i, q in enumerate(queries))
    assert result.returncode == 0, result.stdout + result.stderr + "\n" + names


def test_rule_files_exist_and_are_loaded_by_the_config() -> None:
    assert obs.rule_files(), "no rule files in deploy/prometheus/rules"
    config = obs.load_yaml(obs.PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]


def test_scrape_job_name_is_the_one_rules_and_dashboards_use() -> None:
    config = obs.load_yaml(obs.PROMETHEUS_CONFIG)
    jobs = [c["job_name"] for c in config["scrape_configs"]]
    assert obs.JOB in jobs


def test_every_alert_follows_the_threshold_convention() -> None:
    """The e2e proof evaluates each alert's data side; a free-form expr would escape it."""
    alerts = [r for r in obs.all_rules() if "alert" in r]
    assert alerts
    for rule in alerts:
        clauses = obs.alert_clauses(rule["alert"], rule["expr"])  # raises if not
        assert clauses[0].threshold is not None


def test_alerts_carry_severity_summary_and_a_runbook_section() -> None:
    readme = (obs.DEPLOY / "README.md").read_text(encoding="utf-8")
    anchors = {_anchor(h) for h in re.findall(r"^#+\s+(.+?)\s*$", readme, re.MULTILINE)}
    names = [r["alert"] for r in obs.all_rules() if "alert" in r]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in obs.all_rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        runbook = rule["annotations"]["runbook_url"]
        assert runbook == f"{obs.RUNBOOK_BASE}#{rule['alert'].lower()}", rule["alert"]
        assert "runbook" not in rule["annotations"], "relative runbook paths are gone"
        assert rule["alert"].lower() in anchors, f"deploy/README.md has no section {rule['alert']}"


def test_recording_rules_used_are_defined() -> None:
    defined = {r["record"] for r in obs.all_rules() if "record" in r}
    used = set()
    for expr in [r["expr"] for r in obs.all_rules()] + [q.expr for q in obs.all_panel_queries()]:
        used |= set(re.findall(r"\b(refusal_gateway:[a-z0-9_:]+)", expr))
    assert used <= defined, f"undefined recording rules: {sorted(used - defined)}"


#: The sample names Prometheus sees for each metric type of prometheus-client.
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
#: Labels Prometheus adds to every scraped series.
_TARGET_LABELS = {"job", "instance"}


def _exported_series() -> dict[str, set[str]]:
    """``{sample name: label names}`` of every series server/metrics.py exports."""
    from prometheus_client.metrics import MetricWrapperBase
    from refusal_gateway.launcher_metrics import LauncherMetrics
    from refusal_gateway.metrics import get_metrics

    metrics = get_metrics(CollectorRegistry())
    launcher = LauncherMetrics("m")  # the launcher's own series (standby and state file)
    exported: dict[str, set[str]] = {}
    for collector in [*vars(metrics).values(), *vars(launcher).values()]:
        if not isinstance(collector, MetricWrapperBase):
            continue
        labels = set(collector._labelnames) | _TARGET_LABELS
        for suffix in _SAMPLE_SUFFIXES[collector._type]:
            exported[collector._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return exported


def _used_series() -> list[tuple[str, str, str]]:
    """``(expr, series name, selector body)`` for each refusal_gateway_* series read."""
    exprs = [r["expr"] for r in obs.all_rules()] + [q.expr for q in obs.all_panel_queries()]
    return [
        (expr, match[1], match[2] or "")
        for expr in exprs
        for match in re.finditer(r"\b(refusal_gateway_[a-z0-9_]+)(?:\{([^}]*)\})?", expr)
    ]


def test_gateway_series_used_exist_in_the_gateway() -> None:
    """Every refusal_gateway_* series a rule or panel reads is one server/metrics.py exports."""
    exported = _exported_series()
    used = {name for _, name, _ in _used_series()}
    assert used, "no gateway series referenced at all"
    assert used <= set(exported), (
        f"not exported by refusal_gateway.metrics: {sorted(used - set(exported))}"
    )


def test_gateway_series_are_selected_by_labels_they_have() -> None:
    """A matcher on a label the series lacks selects nothing (or everything, with !=)."""
    exported = _exported_series()
    for expr, name, selector in _used_series():
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            assert label in exported.get(name, set()), f"{name} has no label {label!r}: {expr}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _firing_in_rule_tests() -> set[str]:
    """Alert names some promtool test expects firing (ALERTS or alert_rule_test)."""
    names: set[str] = set()
    for path in obs.RULE_TESTS_DIR.glob("*.yml"):
        for test in obs.load_yaml(path)["tests"]:
            for check in test.get("promql_expr_test") or []:
                for sample in check.get("exp_samples") or []:
                    names |= set(re.findall(r'alertname="([^"]+)"', sample["labels"]))
            for check in test.get("alert_rule_test") or []:
                if check.get("exp_alerts"):
                    names.add(check["alertname"])
    return names


def test_every_alert_is_seen_firing_in_a_promtool_test() -> None:
    alerts = {r["alert"] for r in obs.all_rules() if "alert" in r}
    assert alerts <= _firing_in_rule_tests(), sorted(alerts - _firing_in_rule_tests())


def test_rule_tests_cover_model_loads_and_one_bad_replica_of_eight() -> None:
    """The two scenarios that paged wrongly before: named, and quiet / firing as they should."""
    tests = {t.get("name"): t for p in obs.RULE_TESTS_DIR.glob("*.yml") for t in obs.load_yaml(p)["tests"]}
    load = tests["does not fire during a model load"]
    assert all(not c.get("exp_samples") for c in load["promql_expr_test"])
    assert any("engine_up" in s["series"] and "0x" in s["values"] for s in load["input_series"])
    bad = tests["one bad replica of eight"]
    instances = {re.search(r'instance="([^"]+)"', s["series"])[1] for s in bad["input_series"]}
    assert len(instances) == 8
    fired = [s["labels"] for c in bad["promql_expr_test"] for s in c.get("exp_samples") or []]
    assert fired and all('instance="i8:8000"' in f for f in fired)


def test_vllm_model_name_is_copied_into_model_at_scrape_time() -> None:
    """Rules and panels join vLLM's series with ours on `model`."""
    (relabel,) = obs.scrape_job()["metric_relabel_configs"]
    assert relabel["source_labels"] == ["__name__", "model_name"]
    assert relabel["target_label"] == "model" and relabel["replacement"] == "$1"
    assert re.fullmatch(relabel["regex"], "vllm:num_requests_waiting;m")
    assert not re.fullmatch(relabel["regex"], "refusal_gateway_requests_total;m")
    exprs = [r["expr"] for r in obs.all_rules()] + [q.expr for q in obs.all_panel_queries()]
    assert not [e for e in exprs if "model_name" in e], "join on model, not model_name"
