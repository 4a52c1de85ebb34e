"""The metric families of a :class:`~moewatch.exporter.snapshot.Snapshot`, built with prometheus-client's
metric classes: the library render path (and the reference the fast renderer is pinned to). Pure
functions of a snapshot and the run's labels; ``snap=None`` gives the empty families ``describe()`` needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from moewatch.exporter.snapshot import Snapshot
from moewatch.report import STATE_VALUES, LayerReport

__all__ = [
    "EXPERT_ASSIGNED_HELP",
    "EXPERT_DEAD_HELP",
    "EXPERT_IDLE_HELP",
    "LAYER_GAUGES",
    "LAYER_LABELS",
    "expert_families",
    "layer_families",
    "stamp",
    "window_families",
    "without",
]

LAYER_LABELS = ("run", "layer", "module")

#: (metric name, LayerReport attribute, help). Undefined values (None) are left out of the scrape.
LAYER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("moewatch_layer_load_cov", "load_cov", "Coefficient of variation (std/mean) of expert loads; 0 = even."),
    ("moewatch_layer_dead_experts", "dead_experts", "Experts below dead_fraction of the fair share."),
    ("moewatch_layer_dead_ratio", "dead_ratio", "Dead experts / experts."),
    (
        "moewatch_layer_top2_share",
        "top2_share",
        "Share of assignments taken by the two busiest experts (ratio).",
    ),
    ("moewatch_layer_top2_excess", "top2_excess", "top2_share on the fair (0) .. maximum (1) scale."),
    ("moewatch_layer_norm_entropy", "norm_entropy", "Router entropy / ln(experts); 1 = uniform."),
    ("moewatch_layer_max_violation", "max_violation", "(max load - mean load) / mean load (MaxVio)."),
    ("moewatch_layer_effective_experts", "effective_experts", "exp(entropy of the load distribution)."),
    ("moewatch_layer_z_loss", "z_loss", "Router z-loss: mean over tokens of logsumexp(logits)^2."),
    ("moewatch_layer_nonfinite", "nonfinite", "Non-finite router outputs seen in the window."),
    ("moewatch_layer_invalid_ids", "invalid_ids", "Expert ids outside [0, experts) seen in the window."),
    ("moewatch_layer_dropped_ratio", "dropped_ratio", "Estimated share of assignments over expert capacity."),
    (
        "moewatch_layer_ep_load_cov",
        "ep_load_cov",
        "Coefficient of variation of load per expert-parallel rank.",
    ),
    (
        "moewatch_layer_fair_share",
        "fair_share",
        "Assignments per expert if perfectly balanced, in the window.",
    ),
    ("moewatch_layer_window_tokens", "tokens", "Tokens the router saw in the window."),
    ("moewatch_layer_window_assignments", "assignments", "Expert assignments in the window."),
    ("moewatch_layer_experts", "num_experts", "Experts of the router."),
    ("moewatch_layer_top_k", "top_k", "Experts chosen per token."),
    (
        "moewatch_layer_projected_collapse_step",
        "projected_collapse_step",
        "Step at which the layer's trend crosses a collapsed threshold (absent: not heading there).",
    ),
)


EXPERT_ASSIGNED_HELP = "Assignments (token, expert pairs) routed to the expert, cumulative over windows."
EXPERT_DEAD_HELP = "1 if the expert was dead (below dead_fraction of fair share) in the last window."
EXPERT_IDLE_HELP = "Windows since the expert last received a token (0: it received one in the last window)."
_NOISE_HELP = (
    "What a perfectly balanced router's metric reaches by sampling noise alone at false_alarm_rate in the last "
    "window (upper floor; lower floor for norm_entropy)."
)


def stamp(families: Iterable[Metric], labels: dict[str, str]) -> Iterator[Metric]:
    """``families`` with the constant ``labels`` added to every sample (in place: fresh families only)."""
    for fam in families:
        if labels:
            fam.samples = [s._replace(labels={**s.labels, **labels}) for s in fam.samples]
        yield fam


def without(families: Iterable[Metric], names: tuple[str, ...]) -> Iterator[Metric]:
    """Copies of ``families`` whose samples lack the labels ``names`` (the originals may be cached)."""
    for fam in families:
        out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        out.samples = [
            s._replace(labels={k: v for k, v in s.labels.items() if k not in names}) for s in fam.samples
        ]
        yield out


def window_families(snap: Snapshot | None, run: str) -> Iterator[Metric]:
    run_state = GaugeMetricFamily(
        "moewatch_run_state",
        "Worst layer state: 0 healthy, 1 warning, 2 collapsed, -1 insufficient data.",
        labels=["run"],
    )
    step = GaugeMetricFamily("moewatch_step", "Optimizer steps counted at the end of the last window.", labels=["run"])
    end_ts = GaugeMetricFamily(
        "moewatch_window_end_timestamp_seconds", "Unix time the last window closed.", labels=["run"]
    )
    duration = GaugeMetricFamily("moewatch_window_duration_seconds", "Length of the last window.", labels=["run"])
    steps = GaugeMetricFamily("moewatch_window_steps", "Optimizer steps in the last window.", labels=["run"])
    layers = GaugeMetricFamily("moewatch_layers", "Routers (MoE layers) monitored.", labels=["run"])
    if snap is not None:
        r = snap.report
        run_state.add_metric([run], STATE_VALUES[r.state])
        step.add_metric([run], r.step_end)
        end_ts.add_metric([run], r.time_end)
        duration.add_metric([run], max(0.0, r.time_end - r.time_start))
        steps.add_metric([run], r.steps)
        layers.add_metric([run], len(r.layers))
    yield from (run_state, step, end_ts, duration, steps, layers)


def _layer_labels(run: str, layer: LayerReport) -> list[str]:
    return [run, str(layer.index), layer.module]


def layer_families(snap: Snapshot | None, run: str) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "moewatch_layer_state",
        "Layer health: 0 healthy, 1 warning, 2 collapsed, -1 insufficient data (never alerts).",
        labels=list(LAYER_LABELS),
    )
    gauges = [(GaugeMetricFamily(name, doc, labels=list(LAYER_LABELS)), attr) for name, attr, doc in LAYER_GAUGES]
    noise = GaugeMetricFamily("moewatch_layer_noise_floor", _NOISE_HELP, labels=[*LAYER_LABELS, "metric"])
    layer_tokens = CounterMetricFamily(
        "moewatch_layer_tokens", "Tokens the router saw, cumulative over windows.", labels=list(LAYER_LABELS)
    )
    if snap is not None:
        for layer, total in zip(snap.report.layers, snap.layer_tokens, strict=True):
            labels = _layer_labels(run, layer)
            state.add_metric(labels, STATE_VALUES[layer.state])
            for fam, attr in gauges:
                value = getattr(layer, attr)
                if value is not None:
                    fam.add_metric(labels, float(value))
            layer_tokens.add_metric(labels, total)
            for metric, floor in layer.noise_floor.items():
                if floor is not None:
                    noise.add_metric([*labels, metric], float(floor))
    yield state
    yield from (fam for fam, _ in gauges)
    yield noise
    yield layer_tokens


def expert_families(snap: Snapshot | None, run: str) -> Iterator[Metric]:
    """``moewatch_expert_*``: what :func:`moewatch.exporter.fasttext.expert_text` writes ~20x faster."""
    labels_e = [*LAYER_LABELS, "expert"]
    assigned = CounterMetricFamily("moewatch_expert_assignments", EXPERT_ASSIGNED_HELP, labels=labels_e)
    dead = GaugeMetricFamily("moewatch_expert_dead", EXPERT_DEAD_HELP, labels=labels_e)
    idle = GaugeMetricFamily("moewatch_expert_idle_windows", EXPERT_IDLE_HELP, labels=labels_e)
    if snap is not None:
        for layer, totals, dead_ids in zip(snap.report.layers, snap.expert_totals, snap.expert_dead, strict=True):
            base = _layer_labels(run, layer)
            for e, n in enumerate(totals):
                assigned.add_metric([*base, str(e)], n)
                dead.add_metric([*base, str(e)], 1.0 if e in dead_ids else 0.0)
            for e, n in enumerate(layer.idle_windows):
                idle.add_metric([*base, str(e)], float(n))
    yield from (assigned, dead, idle)
