"""Grafana dashboards: generated JSON in sync, variables, units/descriptions, queries name real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from promhelpers import REPO, layer_report, window_report

from moewatch.config import Thresholds
from moewatch.exporter import PrometheusConfig, PrometheusExporter
from moewatch.exporter.dashboards import DASHBOARDS, dashboard_files, panel_queries
from moewatch.exporter.generate import generated_files

DASH_DIR = REPO / "dashboards"


def test_committed_files_equal_generated() -> None:
    stale = [
        rel for rel, text in generated_files().items() if (REPO / rel).read_text(encoding="utf-8") != text
    ]
    assert not stale, f"run `python -m moewatch.exporter.generate`; out of date: {stale}"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_structure(name: str) -> None:
    dash = json.loads((DASH_DIR / name).read_text())
    assert "__inputs" not in dash
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for var in ("run", "layer"):
        assert variables[var]["type"] == "query"
        assert variables[var]["definition"].startswith("label_values(")
        assert variables[var]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        assert panel["description"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not (cells & mine), f"panel {panel['title']} overlaps another"
        cells |= mine


def _panel(title: str) -> dict:
    dash = DASHBOARDS["moewatch-overview.json"]()
    return next(p for p in dash["panels"] if p["title"] == title)


def test_health_bands_come_from_threshold_defaults() -> None:
    t = Thresholds()

    def steps(title: str) -> list:
        p = _panel(title)
        assert p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line+area"
        return [(s["color"], s["value"]) for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]

    assert steps("Load CV") == [
        ("green", None),
        ("yellow", t.load_cov_warning),
        ("red", t.load_cov_collapsed),
    ]
    assert steps("Top-2 share excess")[1:] == [
        ("yellow", t.top2_excess_warning),
        ("red", t.top2_excess_collapsed),
    ]
    assert steps("Normalised router entropy") == [
        ("red", None),
        ("yellow", t.entropy_collapsed),
        ("green", t.entropy_warning),
    ]
    assert steps("Dead expert ratio")[-1] == ("red", t.dead_ratio_collapsed)


def test_layer_dashboard_has_per_expert_and_dead_panels() -> None:
    dash = DASHBOARDS["moewatch-layer.json"]()
    exprs = " ".join(q for _, q in panel_queries(dash))
    assert "moewatch_expert_assignments_total" in exprs and "moewatch_expert_dead" in exprs
    layer_var = next(v for v in dash["templating"]["list"] if v["name"] == "layer")
    assert layer_var["multi"] is False  # one layer at a time


def test_queries_name_only_exported_metrics() -> None:
    ex = PrometheusExporter("r1", PrometheusConfig(host="127.0.0.1", port=0))
    try:
        full = layer_report(
            0,
            [4, 3, 2, 1],
            load_cov=0.4,
            top2_share=0.7,
            top2_excess=0.1,
            norm_entropy=0.9,
            max_violation=0.6,
            effective_experts=3.5,
        )
        ex.emit(window_report([full]))
        import requests

        text = requests.get(ex.url, timeout=5).text
    finally:
        ex.close()
    exported = set(re.findall(r"^(moewatch_\w+)", text, re.M))
    for build in DASHBOARDS.values():
        for title, expr in panel_queries(build()):
            for metric in re.findall(r"\bmoewatch_\w+", expr):
                assert metric in exported, (
                    f"panel {title!r} queries {metric}, which the exporter does not serve"
                )


def test_provisioning_yaml() -> None:
    prov = yaml.safe_load((DASH_DIR / "provisioning" / "dashboards.yaml").read_text())
    assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file"
    ds = yaml.safe_load((DASH_DIR / "provisioning" / "datasources.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert set(dashboard_files()) == {p.name for p in DASH_DIR.glob("*.json")}


def test_generate_check_mode(tmp_path: Path) -> None:
    from moewatch.exporter.generate import main

    assert main(["--root", str(tmp_path), "--check"]) == 1
    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--root", str(tmp_path), "--check"]) == 0
