"""The Grafana dashboards as code (plain dicts): an overview and a per-layer drill-down.

``dashboards/*.json`` are generated from here (``python -m moewatch.exporter.generate``); a test keeps
the committed files equal to the output, and the e2e test runs every panel query against a real
Prometheus. Health bands come from the defaults of :class:`moewatch.config.Thresholds`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from moewatch.config import Thresholds

__all__ = ["DASHBOARDS", "dashboard_files", "layer_dashboard", "overview_dashboard", "panel_queries"]

_DS = {"type": "prometheus", "uid": "${datasource}"}
_SEL = 'run=~"$run", layer=~"$layer"'
_RUN = 'run=~"$run"'

STATE_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "-1": {"text": "insufficient data", "color": "text", "index": 0},
            "0": {"text": "healthy", "color": "green", "index": 1},
            "1": {"text": "warning", "color": "yellow", "index": 2},
            "2": {"text": "collapsed", "color": "red", "index": 3},
        },
    }
]
DEAD_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "alive", "color": "green", "index": 0},
            "1": {"text": "dead", "color": "red", "index": 1},
        },
    }
]


def _steps(*pairs: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in pairs]}


def _bands() -> dict[str, dict[str, Any]]:
    t = Thresholds()
    return {
        "load_cov": _steps(("green", None), ("yellow", t.load_cov_warning), ("red", t.load_cov_collapsed)),
        # dead_ratio: any dead expert is a warning, so the yellow band starts just above the warning bound
        "dead_ratio": _steps(
            ("green", None), ("yellow", t.dead_ratio_warning + 1e-3), ("red", t.dead_ratio_collapsed)
        ),
        "top2_excess": _steps(
            ("green", None), ("yellow", t.top2_excess_warning), ("red", t.top2_excess_collapsed)
        ),
        "norm_entropy": _steps(("red", None), ("yellow", t.entropy_collapsed), ("green", t.entropy_warning)),
    }


def _target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": _DS, "refId": ref, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        t.update(instant=True, range=False, format="table")
    return t


class _Grid:
    """Places panels left to right on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def place(self, panel: dict[str, Any], w: int, h: int) -> dict[str, Any]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        panel["id"] = self.next_id
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)
        return panel


def _panel(
    kind: str,
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    *,
    thresholds: dict[str, Any] | None = None,
    bands: bool = False,
    mappings: list[dict[str, Any]] | None = None,
    minmax: tuple[float | None, float | None] = (None, None),
    decimals: int | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if thresholds is not None:
        defaults["thresholds"] = thresholds
    if mappings is not None:
        defaults["mappings"] = mappings
        defaults["color"] = {"mode": "thresholds"}
    if minmax[0] is not None:
        defaults["min"] = minmax[0]
    if minmax[1] is not None:
        defaults["max"] = minmax[1]
    if decimals is not None:
        defaults["decimals"] = decimals
    options: dict[str, Any] = {}
    if kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 0,
            "showPoints": "never",
            "spanNulls": True,
            "thresholdsStyle": {"mode": "line+area" if bands else "off"},
        }
        options = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    elif kind == "state-timeline":
        options = {
            "showValue": "never",
            "mergeValues": True,
            "rowHeight": 0.9,
            "legend": {"showLegend": True},
        }
    elif kind == "stat":
        options = {
            "colorMode": "background",
            "graphMode": "none",
            "reduceOptions": {"calcs": ["lastNotNull"]},
        }
    elif kind == "table":
        options = {"showHeader": True, "sortBy": [{"displayName": "expert", "desc": False}]}
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": _DS,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
    }


def _variables(layer_multi: bool) -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str, multi: bool) -> dict[str, Any]:
        return {
            "type": "query",
            "name": name,
            "label": label,
            "datasource": _DS,
            "query": {"query": query, "refId": f"{name}-var"},
            "definition": query,
            "refresh": 2,
            "sort": 3,
            "multi": multi,
            "includeAll": multi,
            "current": {},
        }

    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "current": {},
        },
        query_var("run", "Run", "label_values(moewatch_build_info, run)", layer_multi),
        query_var("layer", "Layer", 'label_values(moewatch_layer_state{run=~"$run"}, layer)', layer_multi),
    ]


def _dashboard(
    uid: str, title: str, description: str, panels: list[dict[str, Any]], layer_multi: bool
) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["moewatch", "moe"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "templating": {"list": _variables(layer_multi)},
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["moewatch"],
                "asDropdown": False,
                "title": "moewatch",
                "includeVars": True,
            }
        ],
        "panels": panels,
    }


def overview_dashboard() -> dict[str, Any]:
    b, g = _bands(), _Grid()
    layer_legend = "{{run}} layer {{layer}}"
    p = [
        g.place(
            _panel(
                "stat",
                "Run state",
                "Worst layer state of the run in the last window (moewatch_run_state).",
                "none",
                [_target(f"max by (run) (moewatch_run_state{{{_RUN}}})", "{{run}}")],
                mappings=STATE_MAPPINGS,
                thresholds=_steps(("text", None), ("green", 0), ("yellow", 1), ("red", 2)),
            ),
            6,
            4,
        ),
        g.place(
            _panel(
                "stat",
                "Layers collapsed",
                "MoE layers whose state is collapsed in the last window.",
                "none",
                [_target(f"sum by (run) (moewatch_layer_state{{{_RUN}}} == bool 2)", "{{run}}")],
                thresholds=_steps(("green", None), ("red", 1)),
            ),
            6,
            4,
        ),
        g.place(
            _panel(
                "stat",
                "Dead experts",
                "Dead experts summed over all layers in the last window.",
                "none",
                [_target(f"sum by (run) (moewatch_layer_dead_experts{{{_RUN}}})", "{{run}}")],
                thresholds=_steps(("green", None), ("yellow", 1)),
            ),
            6,
            4,
        ),
        g.place(
            _panel(
                "stat",
                "Tokens per second",
                "Training throughput seen by the first router (rate of moewatch_tokens_total).",
                "suffix: tok/s",
                [
                    _target(
                        f"sum by (run) (rate(moewatch_tokens_total{{{_RUN}}}[$__rate_interval]))", "{{run}}"
                    )
                ],
                thresholds=_steps(("blue", None)),
            ),
            6,
            4,
        ),
        g.place(
            _panel(
                "state-timeline",
                "Layer state",
                "Health of every layer per window: healthy, warning, collapsed, or insufficient data "
                "(too few tokens per expert to judge; never alerts).",
                "none",
                [_target(f"moewatch_layer_state{{{_SEL}}}", layer_legend)],
                mappings=STATE_MAPPINGS,
                thresholds=_steps(("text", None), ("green", 0), ("yellow", 1), ("red", 2)),
            ),
            24,
            8,
        ),
        g.place(
            _panel(
                "timeseries",
                "Load CV",
                "Coefficient of variation of expert loads (std/mean); 0 is perfectly even. Bands: healthy, "
                "warning and collapsed thresholds (moewatch Thresholds defaults).",
                "none",
                [_target(f"moewatch_layer_load_cov{{{_SEL}}}", layer_legend)],
                thresholds=b["load_cov"],
                bands=True,
                minmax=(0, None),
            ),
            12,
            8,
        ),
        g.place(
            _panel(
                "timeseries",
                "Dead expert ratio",
                "Share of experts receiving less than dead_fraction of their fair share. Any dead expert is a "
                "warning; above the red band the layer is collapsed.",
                "percentunit",
                [_target(f"moewatch_layer_dead_ratio{{{_SEL}}}", layer_legend)],
                thresholds=b["dead_ratio"],
                bands=True,
                minmax=(0, 1),
            ),
            12,
            8,
        ),
        g.place(
            _panel(
                "timeseries",
                "Top-2 share excess",
                "Share of the two busiest experts on a scale from the fair share (0) to the most two experts "
                "can take (1), so one band fits every expert count. Bands: health thresholds.",
                "percentunit",
                [_target(f"moewatch_layer_top2_excess{{{_SEL}}}", layer_legend)],
                thresholds=b["top2_excess"],
                bands=True,
                minmax=(0, 1),
            ),
            12,
            8,
        ),
        g.place(
            _panel(
                "timeseries",
                "Normalised router entropy",
                "Entropy of the mean router probability vector / ln(experts); 1 is uniform. Low entropy: the "
                "router has settled on few experts. Bands: health thresholds.",
                "percentunit",
                [_target(f"moewatch_layer_norm_entropy{{{_SEL}}}", layer_legend)],
                thresholds=b["norm_entropy"],
                bands=True,
                minmax=(0, 1),
            ),
            12,
            8,
        ),
        g.place(
            _panel(
                "timeseries",
                "Top-2 share",
                "Share of assignments taken by the two busiest experts (raw); the fair value is 2/experts.",
                "percentunit",
                [
                    _target(f"moewatch_layer_top2_share{{{_SEL}}}", layer_legend),
                    _target(f"2 / moewatch_layer_experts{{{_SEL}}}", "fair {{run}} layer {{layer}}", ref="B"),
                ],
                minmax=(0, 1),
            ),
            12,
            8,
        ),
        g.place(
            _panel(
                "timeseries",
                "Effective experts",
                "exp(entropy of the load distribution): how many experts the layer really uses.",
                "none",
                [_target(f"moewatch_layer_effective_experts{{{_SEL}}}", layer_legend)],
                minmax=(0, None),
            ),
            12,
            8,
        ),
        g.place(
            _panel(
                "timeseries",
                "Tokens per second",
                "Training throughput seen by the first router of each run.",
                "suffix: tok/s",
                [
                    _target(
                        f"sum by (run) (rate(moewatch_tokens_total{{{_RUN}}}[$__rate_interval]))", "{{run}}"
                    )
                ],
                minmax=(0, None),
            ),
            12,
            8,
        ),
        g.place(
            _panel(
                "timeseries",
                "Monitor health",
                "moewatch itself: router hook errors (a failing router is skipped) and windows reported per "
                "minute.",
                "short",
                [
                    _target(f"moewatch_hook_errors_total{{{_RUN}}}", "hook errors {{run}}"),
                    _target(
                        f"rate(moewatch_windows_total{{{_RUN}}}[$__rate_interval]) * 60",
                        "windows/min {{run}}",
                        ref="B",
                    ),
                ],
                minmax=(0, None),
            ),
            12,
            8,
        ),
    ]
    return _dashboard(
        "moewatch-overview",
        "moewatch / Router health overview",
        "Router health of MoE training runs: state per layer and the four health metrics with their thresholds.",
        p,
        layer_multi=True,
    )


def layer_dashboard() -> dict[str, Any]:
    b, g = _bands(), _Grid()
    one = 'run=~"$run", layer="$layer"'
    rate = f"rate(moewatch_expert_assignments_total{{{one}}}[$__rate_interval])"
    stats = [
        ("State", f"max(moewatch_layer_state{{{one}}})", "none", "Layer state in the last window."),
        (
            "Load CV",
            f"max(moewatch_layer_load_cov{{{one}}})",
            "none",
            "Load coefficient of variation, last window.",
        ),
        (
            "Dead experts",
            f"max(moewatch_layer_dead_experts{{{one}}})",
            "none",
            "Dead experts in the last window.",
        ),
        (
            "Top-2 share",
            f"max(moewatch_layer_top2_share{{{one}}})",
            "percentunit",
            "Two busiest experts' share.",
        ),
        (
            "Entropy",
            f"max(moewatch_layer_norm_entropy{{{one}}})",
            "percentunit",
            "Normalised router entropy.",
        ),
        (
            "Effective experts",
            f"max(moewatch_layer_effective_experts{{{one}}})",
            "none",
            "exp(load entropy).",
        ),
    ]
    p = []
    for title, expr, unit, desc in stats:
        extra: dict[str, Any] = {}
        if title == "State":
            extra = {
                "mappings": STATE_MAPPINGS,
                "thresholds": _steps(("text", None), ("green", 0), ("yellow", 1), ("red", 2)),
            }
        elif title == "Load CV":
            extra = {"thresholds": b["load_cov"]}
        elif title == "Entropy":
            extra = {"thresholds": b["norm_entropy"]}
        else:
            extra = {"thresholds": _steps(("blue", None))}
        p.append(g.place(_panel("stat", title, desc, unit, [_target(expr)], **extra, decimals=None), 4, 4))
    p += [
        g.place(
            _panel(
                "timeseries",
                "Per-expert load share",
                "Share of the layer's assignments each expert received (rate over the dashboard's rate "
                "interval); the flat 'fair share' series is 1/experts.",
                "percentunit",
                [
                    _target(f"sum by (expert) ({rate}) / on() group_left sum({rate})", "expert {{expert}}"),
                    _target(f"1 / max(moewatch_layer_experts{{{one}}})", "fair share", ref="B"),
                ],
                minmax=(0, None),
            ),
            24,
            10,
        ),
        g.place(
            _panel(
                "timeseries",
                "Per-expert assignments per second",
                "Token-to-expert assignments per second for each expert of the layer.",
                "suffix: assign/s",
                [_target(f"sum by (expert) ({rate})", "expert {{expert}}")],
                minmax=(0, None),
            ),
            12,
            10,
        ),
        g.place(
            _panel(
                "state-timeline",
                "Dead experts over time",
                "Per expert and window: dead when it received less than dead_fraction of its fair share.",
                "none",
                [_target(f"max by (expert) (moewatch_expert_dead{{{one}}})", "expert {{expert}}")],
                mappings=DEAD_MAPPINGS,
                thresholds=_steps(("green", None), ("red", 1)),
            ),
            12,
            10,
        ),
        g.place(
            _panel(
                "table",
                "Experts now",
                "Every expert of the layer in the last window: dead or alive, sorted by expert id.",
                "none",
                [_target(f"max by (expert) (moewatch_expert_dead{{{one}}})", instant=True)],
                mappings=DEAD_MAPPINGS,
                thresholds=_steps(("green", None), ("red", 1)),
            ),
            8,
            10,
        ),
        g.place(
            _panel(
                "timeseries",
                "Load CV (this layer)",
                "Load coefficient of variation with the health bands.",
                "none",
                [_target(f"moewatch_layer_load_cov{{{one}}}", "load CV")],
                thresholds=b["load_cov"],
                bands=True,
                minmax=(0, None),
            ),
            8,
            10,
        ),
        g.place(
            _panel(
                "timeseries",
                "Entropy and top-2 excess (this layer)",
                "Normalised entropy (healthy high) and top-2 share excess (healthy low).",
                "percentunit",
                [
                    _target(f"moewatch_layer_norm_entropy{{{one}}}", "entropy"),
                    _target(f"moewatch_layer_top2_excess{{{one}}}", "top-2 excess", ref="B"),
                ],
                minmax=(0, 1),
            ),
            8,
            10,
        ),
    ]
    return _dashboard(
        "moewatch-layer",
        "moewatch / Layer drill-down",
        "One MoE layer: per-expert load over time and which experts are dead.",
        p,
        layer_multi=False,
    )


#: file name -> builder
DASHBOARDS = {"moewatch-overview.json": overview_dashboard, "moewatch-layer.json": layer_dashboard}


def dashboard_files() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2, sort_keys=False) + "\n" for name, build in DASHBOARDS.items()}


def panel_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
