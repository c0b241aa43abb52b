"""Offline checks of the Grafana dashboards and provisioning files.

Grafana loads provisioned dashboards without complaint even when a panel has
no query or a variable is undefined; these checks catch that before anyone
opens the dashboard. Whether each query returns data is proven against a real
Prometheus in tests/e2e/test_observability.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from . import observability as obs

#: Grafana's built-in variables the dashboards may use.
BUILTIN_VARS = {"__rate_interval", "__interval", "__range", "__range_s"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}


def _dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_there_are_dashboards() -> None:
    assert len(obs.dashboard_files()) >= 2


def test_dashboard_uids_and_titles_are_unique() -> None:
    dashboards = [_dashboard(p) for p in obs.dashboard_files()]
    uids = [d["uid"] for d in dashboards]
    titles = [d["title"] for d in dashboards]
    assert len(uids) == len(set(uids)), uids
    assert len(titles) == len(set(titles)), titles
    for uid in uids:
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", uid), uid


@pytest.mark.parametrize("path", obs.dashboard_files(), ids=lambda p: p.name)
def test_every_panel_has_a_datasource_and_queries(path: Path) -> None:
    dashboard = _dashboard(path)
    panels = obs.data_panels(dashboard)
    assert panels
    ids = [p["id"] for p in obs.iter_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for panel in panels:
        where = f"{path.name}: {panel.get('title')!r}"
        assert panel.get("title"), where
        assert panel.get("description"), f"{where} has no description"
        assert panel.get("datasource") == DATASOURCE_REF, where
        assert {"h", "w", "x", "y"} <= set(panel.get("gridPos", {})), where
        targets = panel.get("targets") or []
        assert targets, f"{where} has no targets"
        ref_ids = [t.get("refId") for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in targets:
            assert target.get("datasource") == DATASOURCE_REF, where
            assert target.get("expr", "").strip(), (
                f"{where} target {target.get('refId')} has no expr"
            )


@pytest.mark.parametrize("path", obs.dashboard_files(), ids=lambda p: p.name)
def test_variables_used_are_defined(path: Path) -> None:
    dashboard = _dashboard(path)
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in defined
    texts = [q.expr for q in obs.panel_queries(path)]
    texts += [
        v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        for v in dashboard["templating"]["list"]
    ]
    used = set()
    for text in texts:
        used |= {a or b for a, b in re.findall(r"\$\{(\w+)[^}]*\}|\$(\w+)", text)}
    assert used - BUILTIN_VARS <= defined, f"undefined variables: {used - BUILTIN_VARS - defined}"


@pytest.mark.parametrize("path", obs.dashboard_files(), ids=lambda p: p.name)
def test_queries_select_the_gateway_job(path: Path) -> None:
    """Every query is scoped to the scrape job, so other targets never leak into panels."""
    for query in obs.panel_queries(path):
        assert f'job="{obs.JOB}"' in query.expr, query.name


@pytest.mark.parametrize("path", obs.dashboard_files(), ids=lambda p: p.name)
def test_panels_do_not_overlap(path: Path) -> None:
    """Grafana silently pushes overlapping panels around; the layout in the file is the one meant."""
    taken: dict[tuple[int, int], str] = {}
    for panel in _dashboard(path)["panels"]:  # top level: rows are expanded (not collapsed)
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[x, y]!r}"
                taken[x, y] = panel["title"]


def test_dashboard_links_point_at_existing_dashboards() -> None:
    uids = {_dashboard(p)["uid"] for p in obs.dashboard_files()}
    for path in obs.dashboard_files():
        for link in _dashboard(path).get("links", []):
            if link.get("url", "").startswith("/d/"):
                assert link["url"].removeprefix("/d/") in uids, (path.name, link["url"])


def test_datasource_is_provisioned() -> None:
    config = obs.load_yaml(obs.PROVISIONING_DIR / "datasources" / "prometheus.yml")
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # the compose service
    assert source["isDefault"] is True


def test_dashboard_provider_reads_the_mounted_dashboards() -> None:
    config = obs.load_yaml(obs.PROVISIONING_DIR / "dashboards" / "refusal-gateway.yml")
    (provider,) = config["providers"]
    compose = obs.load_yaml(obs.ROOT / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (obs.DASHBOARDS_DIR / Path(home).name).is_file()


@pytest.mark.parametrize("path", obs.dashboard_files(), ids=lambda p: p.name)
def test_every_query_honours_the_replica_filter(path: Path) -> None:
    """A panel that ignores $instance shows the whole fleet while the user picked one replica."""
    for query in obs.panel_queries(path):
        assert "$instance" in query.expr, query.name


def _panel(uid: str, title: str) -> dict:
    path = next(p for p in obs.dashboard_files() if json.loads(p.read_text())["uid"] == uid)
    (panel,) = [p for p in obs.data_panels(json.loads(path.read_text())) if p["title"] == title]
    return panel


def _uid(name: str) -> str:
    return json.loads((obs.DASHBOARDS_DIR / name).read_text())["uid"]


def test_refused_categories_are_on_an_auto_scaled_axis_without_respond() -> None:
    panel = _panel(_uid("refusal-gateway-refusals.json"), "Refused share per category")
    assert "max" not in panel["fieldConfig"]["defaults"]
    (target,) = panel["targets"]
    assert 'category!~"respond|none"' in target["expr"].split("/")[0]


def test_model_profile_category_table_and_shadow_row() -> None:
    uid = _uid("refusal-gateway-refusals.json")
    table = _panel(uid, "Decisions by model, profile and category")
    assert table["type"] == "table"
    assert all("sum by (model, profile, category)" in t["expr"] for t in table["targets"])
    shadow = _panel(uid, "Refused share: live vs shadow profiles")
    exprs = [t["expr"] for t in shadow["targets"]]
    assert any("refusal_gateway_control_tokens_total" in e for e in exprs)
    assert any("refusal_gateway_shadow_decisions_total" in e and "by (profile, category)" in e for e in exprs)
    matrix = _panel(uid, "Share per category: live vs each shadow profile")
    assert matrix["transformations"][0]["id"] == "groupingToMatrix"


def test_serving_dashboard_has_per_replica_panels() -> None:
    uid = _uid("refusal-gateway-serving.json")
    for title, series in (
        ("Request rate per replica", "http_requests_total"),
        ("Queue time per replica (p90)", "vllm:request_queue_time_seconds_bucket"),
        ("Prefix-cache hit rate per replica", "vllm:prefix_cache_hits_total"),
        ("Preemptions per replica", "vllm:num_preemptions_total"),
        ("Engine up per replica", "refusal_gateway_engine_up"),
        ("Engine restarts and standby 503s", "refusal_gateway_standby_responses_total"),
    ):
        exprs = " ".join(t["expr"] for t in _panel(uid, title)["targets"])
        assert series in exprs and "instance" in exprs, title
