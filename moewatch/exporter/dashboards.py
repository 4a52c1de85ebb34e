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
from moewatch.exporter.grafana import (
    DEAD_MAPPINGS,
    STATE_MAPPINGS,
    STATE_STEPS,
    Grid,
    dashboard,
    panel,
    steps,
    target,
)
from moewatch.health import BOUNDS

__all__ = ["DASHBOARDS", "dashboard_files", "layer_dashboard", "overview_dashboard", "panel_queries"]

_SEL = 'run=~"$run", layer=~"$layer"'
_RUN = 'run=~"$run"'

#: Per-layer gauges are shown one series per (run, layer) whichever exporters serve them: one, the default;
#: one per pipeline stage (each its own layers); one per rank with prometheus.per_rank (each rank's own counts,
#: shown as the worst rank: the highest load CV / dead ratio / top-2 / state, the lowest entropy and effective
#: experts). Counters are summed over ranks, and token throughput is taken from one stage.
_WORST = {"norm_entropy": "min", "effective_experts": "min"}


def _layer(metric: str, selector: str) -> str:
    """``moewatch_layer_<metric>`` one series per run and layer (the worst rank's value under per_rank)."""
    return f"{_WORST.get(metric, 'max')} by (run, layer) (moewatch_layer_{metric}{{{selector}}})"


def _tokens_rate(selector: str) -> str:
    """Tokens per second of each run: summed over ranks, from one pipeline stage (each stage sees them all)."""
    return f"max by (run) (sum by (run, stage) (rate(moewatch_tokens_total{{{selector}}}[$__rate_interval])))"


def _bands(t: Thresholds) -> dict[str, dict[str, Any]]:
    """Grafana threshold steps per metric, from :data:`moewatch.health.BOUNDS` and ``t``."""
    out = {}
    for b in BOUNDS:
        warn, collapse = b.warning(t), b.collapsed(t)
        if not b.warning_inclusive and warn == 0:
            warn = 1e-3  # "> 0" is a warning: a step at 0 would paint the healthy value 0 yellow
        if b.higher_is_worse:
            out[b.metric] = steps(("green", None), ("yellow", warn), ("red", collapse))
        else:
            out[b.metric] = steps(("red", None), ("yellow", collapse), ("green", warn))
    return out


def _band_panel(
    title: str,
    description: str,
    metric: str,
    unit: str,
    selector: str,
    legend: str,
    bands: dict[str, dict[str, Any]],
    minmax: tuple[float | None, float | None],
) -> dict[str, Any]:
    """A per-layer time series of ``moewatch_layer_<metric>`` with the health thresholds as bands."""
    return panel(
        "timeseries",
        title,
        description,
        unit,
        [target(_layer(metric, selector), legend)],
        thresholds=bands[metric],
        bands=True,
        minmax=minmax,
    )


def overview_dashboard(thresholds: Thresholds | None = None) -> dict[str, Any]:
    b, g = _bands(thresholds or Thresholds()), Grid()
    layer_legend = "{{run}} layer {{layer}}"
    p = [
        g.place(
            panel(
                "stat",
                "Run state",
                "Worst layer state of the run in the last window (moewatch_run_state).",
                "none",
                [target(f"max by (run) (moewatch_run_state{{{_RUN}}})", "{{run}}")],
                mappings=STATE_MAPPINGS,
                thresholds=STATE_STEPS,
            ),
            6,
            4,
        ),
        g.place(
            panel(
                "stat",
                "Layers collapsed",
                "MoE layers whose state is collapsed in the last window.",
                "none",
                [target(f"sum by (run) ({_layer('state', _RUN)} == bool 2)", "{{run}}")],
                thresholds=steps(("green", None), ("red", 1)),
            ),
            6,
            4,
        ),
        g.place(
            panel(
                "stat",
                "Dead experts",
                "Dead experts summed over all layers in the last window.",
                "none",
                [target(f"sum by (run) ({_layer('dead_experts', _RUN)})", "{{run}}")],
                thresholds=steps(("green", None), ("yellow", 1)),
            ),
            6,
            4,
        ),
        g.place(
            panel(
                "stat",
                "Tokens per second",
                "Training throughput seen by the first router (rate of moewatch_tokens_total).",
                "suffix: tok/s",
                [
                    target(_tokens_rate(_RUN), "{{run}}")
                ],
                thresholds=steps(("blue", None)),
            ),
            6,
            4,
        ),
        g.place(
            panel(
                "state-timeline",
                "Layer state",
                "Health of every layer per window: healthy, warning, collapsed, or insufficient data "
                "(too few tokens per expert to judge; never alerts).",
                "none",
                [target(_layer("state", _SEL), layer_legend)],
                mappings=STATE_MAPPINGS,
                thresholds=STATE_STEPS,
            ),
            24,
            8,
        ),
        g.place(
            _band_panel(
                "Load CV",
                "Coefficient of variation of expert loads (std/mean); 0 is perfectly even. Bands: healthy, "
                "warning and collapsed thresholds (moewatch Thresholds defaults).",
                "load_cov",
                "none",
                _SEL,
                layer_legend,
                b,
                (0, None),
            ),
            12,
            8,
        ),
        g.place(
            _band_panel(
                "Dead expert ratio",
                "Share of experts receiving less than dead_fraction of their fair share. Any dead expert is a "
                "warning; above the red band the layer is collapsed.",
                "dead_ratio",
                "percentunit",
                _SEL,
                layer_legend,
                b,
                (0, 1),
            ),
            12,
            8,
        ),
        g.place(
            _band_panel(
                "Top-2 share excess",
                "Share of the two busiest experts on a scale from the fair share (0) to the most two experts "
                "can take (1), so one band fits every expert count. Bands: health thresholds.",
                "top2_excess",
                "percentunit",
                _SEL,
                layer_legend,
                b,
                (0, 1),
            ),
            12,
            8,
        ),
        g.place(
            _band_panel(
                "Normalised router entropy",
                "Entropy of the mean router probability vector / ln(experts); 1 is uniform. Low entropy: the "
                "router has settled on few experts. Bands: health thresholds.",
                "norm_entropy",
                "percentunit",
                _SEL,
                layer_legend,
                b,
                (0, 1),
            ),
            12,
            8,
        ),
        g.place(
            panel(
                "timeseries",
                "Top-2 share",
                "Share of assignments taken by the two busiest experts (raw); the fair value is 2/experts.",
                "percentunit",
                [
                    target(_layer("top2_share", _SEL), layer_legend),
                    target(f"2 / {_layer('experts', _SEL)}", "fair {{run}} layer {{layer}}", ref="B"),
                ],
                minmax=(0, 1),
            ),
            12,
            8,
        ),
        g.place(
            panel(
                "timeseries",
                "Effective experts",
                "exp(entropy of the load distribution): how many experts the layer really uses.",
                "none",
                [target(_layer("effective_experts", _SEL), layer_legend)],
                minmax=(0, None),
            ),
            12,
            8,
        ),
        g.place(
            panel(
                "timeseries",
                "Tokens per second",
                "Training throughput seen by the first router of each run.",
                "suffix: tok/s",
                [
                    target(_tokens_rate(_RUN), "{{run}}")
                ],
                minmax=(0, None),
            ),
            12,
            8,
        ),
        g.place(
            panel(
                "timeseries",
                "Monitor health",
                "moewatch itself: router hook errors (a failing router is skipped) and windows reported per "
                "minute.",
                "short",
                [
                    target(f"sum by (run) (moewatch_hook_errors_total{{{_RUN}}})", "hook errors {{run}}"),
                    target(
                        f"max by (run) (rate(moewatch_windows_total{{{_RUN}}}[$__rate_interval])) * 60",
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
    return dashboard(
        "moewatch-overview",
        "moewatch / Router health overview",
        "Router health of MoE training runs: state per layer and the four health metrics with their thresholds.",
        p,
        layer_multi=True,
    )


def layer_dashboard(thresholds: Thresholds | None = None) -> dict[str, Any]:
    b, g = _bands(thresholds or Thresholds()), Grid()
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
            f"min(moewatch_layer_norm_entropy{{{one}}})",
            "percentunit",
            "Normalised router entropy.",
        ),
        (
            "Effective experts",
            f"min(moewatch_layer_effective_experts{{{one}}})",
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
                "thresholds": STATE_STEPS,
            }
        elif title == "Load CV":
            extra = {"thresholds": b["load_cov"]}
        elif title == "Entropy":
            extra = {"thresholds": b["norm_entropy"]}
        else:
            extra = {"thresholds": steps(("blue", None))}
        p.append(g.place(panel("stat", title, desc, unit, [target(expr)], **extra, decimals=None), 4, 4))
    p += [
        g.place(
            panel(
                "timeseries",
                "Per-expert load share",
                "Share of the layer's assignments each expert received (rate over the dashboard's rate "
                "interval); the flat 'fair share' series is 1/experts.",
                "percentunit",
                [
                    target(f"sum by (expert) ({rate}) / on() group_left sum({rate})", "expert {{expert}}"),
                    target(f"1 / max(moewatch_layer_experts{{{one}}})", "fair share", ref="B"),
                ],
                minmax=(0, None),
            ),
            24,
            10,
        ),
        g.place(
            panel(
                "timeseries",
                "Per-expert assignments per second",
                "Token-to-expert assignments per second for each expert of the layer.",
                "suffix: assign/s",
                [target(f"sum by (expert) ({rate})", "expert {{expert}}")],
                minmax=(0, None),
            ),
            12,
            10,
        ),
        g.place(
            panel(
                "state-timeline",
                "Dead experts over time",
                "Per expert and window: dead when it received less than dead_fraction of its fair share.",
                "none",
                [target(f"max by (expert) (moewatch_expert_dead{{{one}}})", "expert {{expert}}")],
                mappings=DEAD_MAPPINGS,
                thresholds=steps(("green", None), ("red", 1)),
            ),
            12,
            10,
        ),
        g.place(
            panel(
                "table",
                "Experts now",
                "Every expert of the layer in the last window: dead or alive, sorted by expert id.",
                "none",
                [target(f"max by (expert) (moewatch_expert_dead{{{one}}})", instant=True)],
                mappings=DEAD_MAPPINGS,
                thresholds=steps(("green", None), ("red", 1)),
            ),
            8,
            10,
        ),
        g.place(
            _band_panel(
                "Load CV (this layer)",
                "Load coefficient of variation with the health bands.",
                "load_cov",
                "none",
                one,
                "load CV",
                b,
                (0, None),
            ),
            8,
            10,
        ),
        g.place(
            panel(
                "timeseries",
                "Entropy and top-2 excess (this layer)",
                "Normalised entropy (healthy high) and top-2 share excess (healthy low).",
                "percentunit",
                [
                    target(_layer("norm_entropy", one), "entropy"),
                    target(_layer("top2_excess", one), "top-2 excess", ref="B"),
                ],
                minmax=(0, 1),
            ),
            8,
            10,
        ),
    ]
    return dashboard(
        "moewatch-layer",
        "moewatch / Layer drill-down",
        "One MoE layer: per-expert load over time and which experts are dead.",
        p,
        layer_multi=False,
    )


#: file name -> builder
DASHBOARDS = {"moewatch-overview.json": overview_dashboard, "moewatch-layer.json": layer_dashboard}


def dashboard_files(thresholds: Thresholds | None = None) -> dict[str, str]:
    """File name -> JSON of every dashboard, with bands at ``thresholds`` (default: the defaults)."""
    return {
        name: json.dumps(build(thresholds), indent=2, sort_keys=False) + "\n" for name, build in DASHBOARDS.items()
    }


def panel_queries(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    for p in dash["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
