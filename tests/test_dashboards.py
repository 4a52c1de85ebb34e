"""Grafana dashboards: generated JSON in sync, variables, units/descriptions, queries name real metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from moewatch.config import Thresholds
from moewatch.exporter import PrometheusConfig, PrometheusExporter
from moewatch.exporter.dashboards import DASHBOARDS, dashboard_files, panel_queries
from moewatch.exporter.generate import generated_files
from tests.promhelpers import REPO, layer_report, require_binary, window_report

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


def _panel(title: str, t: Thresholds | None = None) -> dict:
    dash = DASHBOARDS["moewatch-overview.json"](t)
    return next(p for p in dash["panels"] if p["title"] == title)


@pytest.mark.parametrize(
    "t",
    [
        Thresholds(),
        Thresholds(load_cov_warning=0.3, load_cov_collapsed=0.7, top2_excess_warning=0.2, top2_excess_collapsed=0.4,
                   entropy_warning=0.9, entropy_collapsed=0.6, dead_ratio_collapsed=0.4),
    ],
    ids=["defaults", "configured"],
)
def test_health_bands_are_drawn_at_the_thresholds_they_are_generated_for(t: Thresholds) -> None:
    def steps(title: str) -> list:
        p = _panel(title, t)
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


# --- one layer set whatever the export layout: default, pipeline stages, per-rank ------------------------

# The job's (global, all-reduced) values of four layers; layers 0-1 live on stage 0, 2-3 on stage 1.
_GLOBAL = {
    "state": [0, 1, 2, -1],
    "load_cov": [0.25, 0.5, 1.5, 0.125],
    "dead_ratio": [0.0, 0.25, 0.25, 0.0],
    "dead_experts": [0, 1, 1, 0],
    "top2_excess": [0.0, 0.25, 0.75, 0.125],
    "top2_share": [0.5, 0.625, 0.875, 0.5625],
    "norm_entropy": [1.0, 0.75, 0.25, 0.875],
    "effective_experts": [4.0, 3.0, 1.5, 3.5],
    "experts": [4, 4, 4, 4],
}
_LOWER_IS_WORSE = {"norm_entropy", "effective_experts"}
_ASSIGNED_PER_MIN = {0: [60, 30, 0, 90], 1: [0, 30, 0, 30]}  # per rank of a stage; summed: 60, 60, 0, 120
_DEAD_L2 = [0, 0, 1, 0]


def _better(metric: str, v: float) -> float:
    """A value healthier than ``v``: what the other rank of a per-rank pair shows."""
    if metric == "state":
        return max(-1, v - 1)
    if metric in _LOWER_IS_WORSE:
        return 4.0 if metric == "effective_experts" else (v + 1.0) / 2
    return v // 2 if metric == "dead_experts" else v / 2


def _exporters(layout: str) -> list[dict]:
    """Exporters of run r1 as Prometheus would scrape them: their target labels, layers, and for per-rank
    exporters the rank's position in its stage."""
    if layout == "default":
        return [{"labels": {"instance": "t0:9405"}, "layers": [0, 1, 2, 3], "local": None}]
    if layout == "stages":
        return [{"labels": {"stage": str(s), "instance": f"t{s}:9405"}, "layers": [2 * s, 2 * s + 1], "local": None}
                for s in (0, 1)]
    return [{"labels": {"stage": str(s), "rank": str(2 * s + r), "instance": f"t{s}:{9405 + r}"},
             "layers": [2 * s, 2 * s + 1], "local": r} for s in (0, 1) for r in (0, 1)]


def _input_series(layout: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []

    def add(name: str, labels: dict[str, str], values: str) -> None:
        inner = ",".join(f'{k}="{v}"' for k, v in {"run": "r1", "job": "moewatch", **labels}.items())
        out.append({"series": f"{name}{{{inner}}}", "values": values})

    exporters = _exporters(layout)
    for ex in exporters:
        r, base = ex["local"], ex["labels"]
        states = []
        for layer in ex["layers"]:
            lab = {**base, "layer": str(layer), "module": f"layers.{layer}.gate"}
            worst = r is None or (layer + r) % 2 == 0  # which rank of the pair is the worse alternates
            for metric, values in _GLOBAL.items():
                v = values[layer] if worst or metric == "experts" else _better(metric, values[layer])
                states += [v] if metric == "state" else []
                add(f"moewatch_layer_{metric}", lab, f"{v}x20")
            if layer == 2:
                for e in range(4):
                    per_min = sum(_ASSIGNED_PER_MIN.values(), [])[e::4] if r is None else [_ASSIGNED_PER_MIN[r][e]]
                    add("moewatch_expert_assignments_total", {**lab, "expert": str(e)}, f"0+{sum(per_min)}x20")
                    dead = _DEAD_L2[e] if worst else 0
                    add("moewatch_expert_dead", {**lab, "expert": str(e)}, f"{dead}x20")
        tokens = 60 if r is not None else 120  # each stage sees every token; ranks split them
        add("moewatch_tokens_total", base, f"0+{tokens}x20")
        add("moewatch_windows_total", base, "0+60x20")
        hook_errors = {"default": 2, "stages": 2 if base.get("stage") == "0" else 0}.get(
            layout, 1 if base.get("stage") == "0" else 0
        )
        add("moewatch_hook_errors_total", base, f"{hook_errors}x20")
        add("moewatch_run_state", base, f"{max(states)}x20")
    return out


def _expected() -> dict[tuple[str, str, int], list[dict[str, object]]]:
    """(dashboard, panel, target index) -> the samples every layout must give."""

    def per_layer(metric: str, layers=range(4)) -> list[dict[str, object]]:
        return [{"labels": f'{{layer="{i}", run="r1"}}', "value": _GLOBAL[metric][i]} for i in layers]

    run = lambda v: [{"labels": '{run="r1"}', "value": v}]  # noqa: E731
    one = lambda v: [{"labels": "{}", "value": v}]  # noqa: E731
    experts = lambda vs: [{"labels": f'{{expert="{e}"}}', "value": v} for e, v in enumerate(vs)]  # noqa: E731
    ov, la = "moewatch-overview.json", "moewatch-layer.json"
    return {
        (ov, "Run state", 0): run(2),
        (ov, "Layers collapsed", 0): run(1),
        (ov, "Dead experts", 0): run(2),
        (ov, "Tokens per second", 0): run(2),  # 120 tokens a minute, counted once (stat)
        (ov, "Tokens per second", 1): run(2),  # (time series)
        (ov, "Layer state", 0): per_layer("state"),
        (ov, "Load CV", 0): per_layer("load_cov"),
        (ov, "Dead expert ratio", 0): per_layer("dead_ratio"),
        (ov, "Top-2 share excess", 0): per_layer("top2_excess"),
        (ov, "Normalised router entropy", 0): per_layer("norm_entropy"),
        (ov, "Top-2 share", 0): per_layer("top2_share"),
        (ov, "Top-2 share", 1): [{"labels": f'{{layer="{i}", run="r1"}}', "value": 0.5} for i in range(4)],
        (ov, "Effective experts", 0): per_layer("effective_experts"),
        (ov, "Monitor health", 0): run(2),
        (ov, "Monitor health", 1): run(60),
        (la, "State", 0): one(2),
        (la, "Load CV", 0): one(1.5),
        (la, "Dead experts", 0): one(1),
        (la, "Top-2 share", 0): one(0.875),
        (la, "Entropy", 0): one(0.25),
        (la, "Effective experts", 0): one(1.5),
        (la, "Per-expert load share", 0): experts([0.25, 0.25, 0.0, 0.5]),
        (la, "Per-expert load share", 1): one(0.25),
        (la, "Per-expert assignments per second", 0): experts([1.0, 1.0, 0.0, 2.0]),
        (la, "Dead experts over time", 0): experts(_DEAD_L2),
        (la, "Experts now", 0): experts(_DEAD_L2),
        (la, "Load CV (this layer)", 0): per_layer("load_cov", [2]),
        (la, "Entropy and top-2 excess (this layer)", 0): per_layer("norm_entropy", [2]),
        (la, "Entropy and top-2 excess (this layer)", 1): per_layer("top2_excess", [2]),
    }


@pytest.mark.parametrize("layout", ["default", "stages", "per_rank"])
def test_panels_show_one_layer_set_in_every_export_layout(layout: str, tmp_path: Path) -> None:
    """Every panel query, run by promtool over the series of one export layout: one exporter; one per
    pipeline stage (each its own layers, a stage label); one per rank (each rank's own counts, rank and stage
    labels, a different instance each). All three must read the same: one series per layer, the worst rank's
    gauge, counters summed over ranks and tokens counted once across stages."""

    promtool = require_binary("promtool")
    expected = _expected()
    tests = []
    for name, build in DASHBOARDS.items():
        seen: dict[str, int] = {}
        for title, expr in panel_queries(build()):
            i = seen[title] = seen.get(title, -1) + 1  # target i of the panels with this title
            assert (name, title, i) in expected, f"no expectation for {name} / {title} #{i}: {expr}"
            query = (expr.replace('"$run"', '".*"').replace('=~"$layer"', '=~".*"')
                     .replace('="$layer"', '="2"').replace("$__rate_interval", "5m"))
            tests.append({"expr": query, "eval_time": "10m", "exp_samples": expected.pop((name, title, i))})
    assert not expected, f"expectations for panels that are gone: {sorted(expected)}"
    doc = {"evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": _input_series(layout), "promql_expr_test": tests}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    out = subprocess.run([promtool, "test", "rules", "t.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]


def test_generate_draws_bands_at_the_environment_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moewatch.exporter.generate import main

    monkeypatch.setenv("MOEWATCH_THRESHOLDS__LOAD_COV_WARNING", "0.33")
    assert main(["--root", str(tmp_path), "--thresholds-from-env"]) == 0
    dash = json.loads((tmp_path / "dashboards" / "moewatch-overview.json").read_text())
    load = next(p for p in dash["panels"] if p["title"] == "Load CV")
    assert load["fieldConfig"]["defaults"]["thresholds"]["steps"][1] == {"color": "yellow", "value": 0.33}
