"""Grafana dashboard JSON building blocks (plain dicts): panels, targets, thresholds, variables, layout."""

from __future__ import annotations

from typing import Any

__all__ = [
    "DEAD_MAPPINGS",
    "DS",
    "STATE_MAPPINGS",
    "STATE_STEPS",
    "Grid",
    "dashboard",
    "panel",
    "steps",
    "target",
]

DS = {"type": "prometheus", "uid": "${datasource}"}

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


def steps(*pairs: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in pairs]}


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        t.update(instant=True, range=False, format="table")
    return t


class Grid:
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


def panel(
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
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
    }


def variables(layer_multi: bool) -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str, multi: bool) -> dict[str, Any]:
        return {
            "type": "query",
            "name": name,
            "label": label,
            "datasource": DS,
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


def dashboard(
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
        "templating": {"list": variables(layer_multi)},
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


STATE_STEPS = steps(("text", None), ("green", 0), ("yellow", 1), ("red", 2))
