"""A Prometheus Collector that serves every scrape from the last immutable :class:`WindowReport`.

``update(report)`` (training thread, once per window) folds the report into a new immutable
:class:`_Snapshot` (cumulative counters included) and swaps one reference; ``collect()`` (scrape
thread) reads that reference once and never touches device tensors or the monitor's buffers.
"""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from moewatch.exporter.exposition import SPLIT, escape_label, gzip_member, render_family_text
from moewatch.report import STATE_VALUES, LayerReport, WindowReport
from moewatch.sinks.base import DELIVERY_OUTCOMES, MonitorStats

__all__ = ["LAYER_GAUGES", "LAYER_LABELS", "MoEWatchCollector"]

log = logging.getLogger(__name__)

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


_EXPERT_ASSIGNED_HELP = "Assignments (token, expert pairs) routed to the expert, cumulative over windows."
_EXPERT_DEAD_HELP = "1 if the expert was dead (below dead_fraction of fair share) in the last window."
_EXPERT_IDLE_HELP = "Windows since the expert last received a token (0: it received one in the last window)."
_NOISE_HELP = (
    "What a perfectly balanced router's metric reaches by sampling noise alone at false_alarm_rate in the last "
    "window (upper floor; lower floor for norm_entropy)."
)


class _Families:
    """A ready list of families, in the shape ``generate_latest`` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


@dataclass(frozen=True)
class _Snapshot:
    report: WindowReport
    windows: int
    tokens: int
    layer_tokens: tuple[int, ...]
    expert_totals: tuple[tuple[int, ...], ...]
    expert_dead: tuple[frozenset[int], ...]


def _fold(prev: _Snapshot | None, report: WindowReport) -> _Snapshot:
    same_shape = prev is not None and [len(t) for t in prev.expert_totals] == [
        len(layer.loads) for layer in report.layers
    ]
    if prev is None or not same_shape:
        if prev is not None:
            log.warning("moewatch: router set changed between windows; per-expert counters restart")
        return _Snapshot(
            report=report,
            windows=(prev.windows if prev else 0) + 1,
            tokens=(prev.tokens if prev else 0) + report.tokens,
            layer_tokens=tuple(layer.tokens for layer in report.layers),
            expert_totals=tuple(tuple(layer.loads) for layer in report.layers),
            expert_dead=tuple(frozenset(layer.dead_expert_ids) for layer in report.layers),
        )
    return _Snapshot(
        report=report,
        windows=prev.windows + 1,
        tokens=prev.tokens + report.tokens,
        layer_tokens=tuple(
            t + layer.tokens for t, layer in zip(prev.layer_tokens, report.layers, strict=True)
        ),
        expert_totals=tuple(
            tuple(a + b for a, b in zip(tot, layer.loads, strict=True))
            for tot, layer in zip(prev.expert_totals, report.layers, strict=True)
        ),
        expert_dead=tuple(frozenset(layer.dead_expert_ids) for layer in report.layers),
    )


def _stamp(families: Iterable[Metric], labels: dict[str, str]) -> Iterator[Metric]:
    """``families`` with the constant ``labels`` added to every sample (in place: fresh families only)."""
    for fam in families:
        if labels:
            fam.samples = [s._replace(labels={**s.labels, **labels}) for s in fam.samples]
        yield fam


def _without(families: Iterable[Metric], names: tuple[str, ...]) -> Iterator[Metric]:
    """Copies of ``families`` whose samples lack the labels ``names`` (the originals may be cached)."""
    for fam in families:
        out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        out.samples = [
            s._replace(labels={k: v for k, v in s.labels.items() if k not in names}) for s in fam.samples
        ]
        yield out


def _versions() -> dict[str, str]:
    import torch

    from moewatch._version import __version__

    return {
        "version": __version__,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
    }


class MoEWatchCollector(Collector):
    """Serves the moewatch metrics of one run. Register it on any ``CollectorRegistry``.

    Args:
        run: the ``run`` label (the config's ``run_name``); reports carry it too.
        per_expert: export ``moewatch_expert_*`` series (layers x experts each).
        count_scrapes: count ``collect()`` calls in ``moewatch_scrapes_total`` (off for push registries).
        labels: constant labels added to every series (``stage`` of a pipeline stage, ``rank`` of per-rank
            export); pushes leave ``rank`` out, as the Pushgateway group key carries it.
    """

    def __init__(
        self, run: str, *, per_expert: bool = True, count_scrapes: bool = True, labels: dict[str, str] | None = None
    ) -> None:
        self.run = run
        self.per_expert = per_expert
        self.labels = dict(labels or {})
        if {"run", "layer", "module", "expert", "metric", "notifier", "outcome"} & set(self.labels):
            raise ValueError(f"constant labels {sorted(self.labels)} clash with moewatch's own labels")
        self._count_scrapes = count_scrapes
        self._snap: _Snapshot | None = None
        self._lock = threading.Lock()
        self._scrapes = 0
        self._stats = MonitorStats()
        self._push_stats: Callable[[], dict[str, int]] | None = None
        self._build = _versions()
        self._cache: tuple[_Snapshot | None, list[Metric]] | None = None
        self._text_cache: dict[bool, tuple[_Snapshot | None, bytes]] = {}
        self._text_lock = threading.Lock()

    # --- inputs -------------------------------------------------------------------------------

    def update(self, report: WindowReport) -> None:
        """Fold one window report in (called once per window, on the training thread)."""
        with self._lock:
            self._snap = _fold(self._snap, report)

    def update_stats(self, stats: MonitorStats) -> None:
        """The monitor's own counters (hook errors, notification deliveries), served from the next scrape
        on (any thread: one reference swap)."""
        self._stats = stats

    def set_push_stats(self, stats: Callable[[], dict[str, int]]) -> None:
        self._push_stats = stats

    @property
    def windows(self) -> int:
        snap = self._snap
        return 0 if snap is None else snap.windows

    # --- Collector protocol -------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return list(self._families(None, scrapes=0, with_samples=False))

    def collect(self) -> Iterator[Metric]:
        if self._count_scrapes:
            with self._lock:
                self._scrapes += 1
        yield from _stamp(self._live_families(self._snap, scrapes=self._scrapes, with_samples=True), self.labels)
        if not SPLIT.active:  # else our HTTP app appends the per-window families from static_exposition()
            yield from self._report_families(self._snap, with_samples=True)

    def static_exposition(self, gzipped: bool = False) -> bytes:
        """The families that change once per window, in text format 0.0.4, rendered once per window."""
        snap = self._snap
        with self._text_lock:
            cached = self._text_cache.get(gzipped)
            if cached is not None and cached[0] is snap:
                return cached[1]
            plain = self._text_cache.get(False)
            if plain is None or plain[0] is not snap:
                plain = (snap, self._render_static(snap))
                self._text_cache[False] = plain
            result = (snap, gzip_member(plain[1]) if gzipped else plain[1])
            self._text_cache[gzipped] = result
            return result[1]

    def _render_static(self, snap: _Snapshot | None) -> bytes:
        fams = list(_stamp([*self._window_families(snap, True), *self._layer_families(snap, True)], self.labels))
        text = generate_latest(_Families(fams))
        if self.per_expert and snap is not None:
            text += self._expert_text(snap).encode()
        return text

    def _expert_text(self, snap: _Snapshot) -> str:
        # Same bytes as prometheus-client would write for _expert_families(), ~20x faster.
        const = {"run": self.run, **self.labels}
        assigned: list[tuple[str, float]] = []
        dead: list[tuple[str, float]] = []
        idle: list[tuple[str, float]] = []
        for layer, totals, dead_ids in zip(snap.report.layers, snap.expert_totals, snap.expert_dead, strict=True):
            # prometheus-client writes labels sorted by name: expert first, then layer, module, run (and the
            # constant labels) in order.
            names = {"layer": str(layer.index), "module": layer.module, **const}
            rest = '"' + "".join(f',{k}="{escape_label(v)}"' for k, v in sorted(names.items()))
            assigned.extend((f'expert="{e}{rest}', n) for e, n in enumerate(totals))
            dead.extend((f'expert="{e}{rest}', 1.0 if e in dead_ids else 0.0) for e in range(len(totals)))
            idle.extend((f'expert="{e}{rest}', float(n)) for e, n in enumerate(layer.idle_windows))
        return (
            render_family_text("moewatch_expert_assignments", "counter", _EXPERT_ASSIGNED_HELP, assigned, "_total")
            + render_family_text("moewatch_expert_dead", "gauge", _EXPERT_DEAD_HELP, dead)
            + render_family_text("moewatch_expert_idle_windows", "gauge", _EXPERT_IDLE_HELP, idle)
        )

    def peek(self) -> Iterator[Metric]:
        """Like ``collect()`` but not counted as a scrape (for pushes: without the ``rank`` label, which the
        push's group key holds)."""
        fams = self._families(self._snap, scrapes=self._scrapes, with_samples=True)
        yield from _without(fams, ("rank",)) if "rank" in self.labels else fams

    # --- families -----------------------------------------------------------------------------

    def _families(self, snap: _Snapshot | None, scrapes: int, with_samples: bool) -> Iterator[Metric]:
        yield from _stamp(self._live_families(snap, scrapes, with_samples), self.labels)
        yield from self._report_families(snap, with_samples)

    def _live_families(self, snap: _Snapshot | None, scrapes: int, with_samples: bool) -> Iterator[Metric]:
        run = [self.run]
        build = GaugeMetricFamily(
            "moewatch_build_info", "moewatch build information (value 1).", labels=["run", *self._build]
        )
        windows = CounterMetricFamily("moewatch_windows", "Window reports built.", labels=["run"])
        tokens = CounterMetricFamily(
            "moewatch_tokens", "Tokens seen by the first router in counted forwards.", labels=["run"]
        )
        hook_errors = CounterMetricFamily(
            "moewatch_hook_errors",
            "Router hook exceptions swallowed (the router is skipped after).",
            labels=["run"],
        )
        scrape_c = CounterMetricFamily("moewatch_scrapes", "Scrapes served by this exporter.", labels=["run"])
        if with_samples:
            build.add_metric(run + list(self._build.values()), 1)
            windows.add_metric(run, snap.windows if snap else 0)
            tokens.add_metric(run, snap.tokens if snap else 0)
            hook_errors.add_metric(run, self._stats.hook_errors)
            scrape_c.add_metric(run, scrapes)
        yield from (build, windows, tokens, hook_errors, scrape_c)
        yield from self._notifications(with_samples)
        yield from self._pushes(with_samples)

    def _report_families(self, snap: _Snapshot | None, with_samples: bool) -> list[Metric]:
        # Families that depend only on the immutable snapshot are built once per window, not per scrape
        # (60 layers x 256 experts is ~30k samples).
        cached = self._cache
        if with_samples and cached is not None and cached[0] is snap:
            return cached[1]
        fams = [*self._window_families(snap, with_samples), *self._layer_families(snap, with_samples)]
        if self.per_expert:
            fams += self._expert_families(snap, with_samples)
        fams = list(_stamp(fams, self.labels))
        if with_samples:
            self._cache = (snap, fams)
        return fams

    def _notifications(self, with_samples: bool) -> Iterator[Metric]:
        fam = CounterMetricFamily(
            "moewatch_notifications",
            "Alert notifications by notifier and outcome (" + ", ".join(DELIVERY_OUTCOMES) + ").",
            labels=["run", "notifier", "outcome"],
        )
        if with_samples:
            for notifier, outcomes in sorted(self._stats.deliveries.items()):
                for outcome, n in sorted(outcomes.items()):
                    fam.add_metric([self.run, notifier, outcome], n)
        yield fam

    def _pushes(self, with_samples: bool) -> Iterator[Metric]:
        if self._push_stats is None:
            return
        fam = CounterMetricFamily(
            "moewatch_pushgateway_pushes", "Pushes to the Pushgateway by outcome.", labels=["run", "outcome"]
        )
        if with_samples:
            for outcome, n in sorted(self._push_stats().items()):
                fam.add_metric([self.run, outcome], n)
        yield fam

    def _window_families(self, snap: _Snapshot | None, with_samples: bool) -> Iterator[Metric]:
        run_state = GaugeMetricFamily(
            "moewatch_run_state",
            "Worst layer state: 0 healthy, 1 warning, 2 collapsed, -1 insufficient data.",
            labels=["run"],
        )
        step = GaugeMetricFamily(
            "moewatch_step", "Optimizer steps counted at the end of the last window.", labels=["run"]
        )
        end_ts = GaugeMetricFamily(
            "moewatch_window_end_timestamp_seconds", "Unix time the last window closed.", labels=["run"]
        )
        duration = GaugeMetricFamily(
            "moewatch_window_duration_seconds", "Length of the last window.", labels=["run"]
        )
        steps = GaugeMetricFamily(
            "moewatch_window_steps", "Optimizer steps in the last window.", labels=["run"]
        )
        layers = GaugeMetricFamily("moewatch_layers", "Routers (MoE layers) monitored.", labels=["run"])
        if with_samples and snap is not None:
            r, run = snap.report, [self.run]
            run_state.add_metric(run, STATE_VALUES[r.state])
            step.add_metric(run, r.step_end)
            end_ts.add_metric(run, r.time_end)
            duration.add_metric(run, max(0.0, r.time_end - r.time_start))
            steps.add_metric(run, r.steps)
            layers.add_metric(run, len(r.layers))
        yield from (run_state, step, end_ts, duration, steps, layers)

    def _layer_families(self, snap: _Snapshot | None, with_samples: bool) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "moewatch_layer_state",
            "Layer health: 0 healthy, 1 warning, 2 collapsed, -1 insufficient data (never alerts).",
            labels=list(LAYER_LABELS),
        )
        gauges = [
            (GaugeMetricFamily(name, doc, labels=list(LAYER_LABELS)), attr)
            for name, attr, doc in LAYER_GAUGES
        ]
        noise = GaugeMetricFamily("moewatch_layer_noise_floor", _NOISE_HELP, labels=[*LAYER_LABELS, "metric"])
        layer_tokens = CounterMetricFamily(
            "moewatch_layer_tokens",
            "Tokens the router saw, cumulative over windows.",
            labels=list(LAYER_LABELS),
        )
        if with_samples and snap is not None:
            for layer, total in zip(snap.report.layers, snap.layer_tokens, strict=True):
                labels = self._layer_labels(layer)
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

    def _expert_families(self, snap: _Snapshot | None, with_samples: bool) -> Iterator[Metric]:
        labels_e = [*LAYER_LABELS, "expert"]
        assigned = CounterMetricFamily("moewatch_expert_assignments", _EXPERT_ASSIGNED_HELP, labels=labels_e)
        dead = GaugeMetricFamily("moewatch_expert_dead", _EXPERT_DEAD_HELP, labels=labels_e)
        idle = GaugeMetricFamily("moewatch_expert_idle_windows", _EXPERT_IDLE_HELP, labels=labels_e)
        if with_samples and snap is not None:
            for layer, totals, dead_ids in zip(
                snap.report.layers, snap.expert_totals, snap.expert_dead, strict=True
            ):
                base = self._layer_labels(layer)
                for e, n in enumerate(totals):
                    assigned.add_metric([*base, str(e)], n)
                    dead.add_metric([*base, str(e)], 1.0 if e in dead_ids else 0.0)
                for e, n in enumerate(layer.idle_windows):
                    idle.add_metric([*base, str(e)], float(n))
        yield from (assigned, dead, idle)

    def _layer_labels(self, layer: LayerReport) -> list[str]:
        return [self.run, str(layer.index), layer.module]
