"""A Prometheus Collector that serves every scrape from the last immutable window snapshot.

``update(report)`` (training thread, once per window) folds the report into a new
:class:`~moewatch.exporter.snapshot.Snapshot` (cumulative counters included) and swaps one reference;
``collect()`` (scrape thread) reads that reference once. The families that depend only on the snapshot
(:mod:`moewatch.exporter.families`) are built once per window; the small live ones (scrapes, hook errors,
notifications, pushes) per scrape. :meth:`MoEWatchCollector.fast_path` is what the /metrics server needs to
render the per-window part once per window as text (:mod:`moewatch.exporter.exposition`).
"""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from moewatch.exporter.exposition import FastPath, expert_text, gzip_member
from moewatch.exporter.families import (
    LAYER_GAUGES,
    LAYER_LABELS,
    expert_families,
    layer_families,
    stamp,
    window_families,
    without,
)
from moewatch.exporter.snapshot import Snapshot, fold
from moewatch.report import WindowReport
from moewatch.sinks.base import DELIVERY_OUTCOMES, MonitorStats

__all__ = ["LAYER_GAUGES", "LAYER_LABELS", "MoEWatchCollector"]

log = logging.getLogger(__name__)


class _Families:
    """A ready list of families, in the shape ``generate_latest`` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class _Deferred(Metric):
    """A per-window family whose samples are built on first read, for the whole window at once (the fast
    path leaves these families out by name and never reads them: on a 60x256 model building them costs
    more than the scrape it serves)."""

    def __init__(self, template: Metric, build: Callable[[], dict[str, Metric]]) -> None:
        super().__init__(template.name, template.documentation, template.type, template.unit)
        self._build = build

    @property  # type: ignore[override]
    def samples(self) -> list[Any]:
        return self._build()[self.name].samples

    @samples.setter
    def samples(self, value: list[Any]) -> None:
        pass  # Metric.__init__ sets [] and nothing else writes to a deferred family


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
        self._snap: Snapshot | None = None
        self._lock = threading.Lock()
        self._scrapes = 0
        self._stats = MonitorStats()
        self._push_stats: Callable[[], dict[str, int]] | None = None
        self._build = _versions()
        self._cache: tuple[Snapshot | None, list[Metric]] | None = None
        self._built: tuple[Snapshot | None, dict[str, Metric]] | None = None
        self._built_lock = threading.Lock()
        self._templates = self._per_window(None)
        self._text_cache: dict[bool, tuple[Snapshot | None, bytes]] = {}
        self._text_lock = threading.Lock()

    # --- inputs -------------------------------------------------------------------------------

    def update(self, report: WindowReport) -> None:
        """Fold one window report in (called once per window, on the training thread)."""
        with self._lock:
            self._snap = fold(self._snap, report)

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

    @property
    def snapshot(self) -> Snapshot | None:
        """The folded last window (None before the first)."""
        return self._snap

    # --- Collector protocol -------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return [*self._live_families(None, scrapes=0, with_samples=False), *self._per_window(None)]

    def collect(self) -> Iterator[Metric]:
        if self._count_scrapes:
            with self._lock:
                self._scrapes += 1
        yield from stamp(self._live_families(self._snap, scrapes=self._scrapes, with_samples=True), self.labels)
        yield from self._report_families(self._snap)

    def peek(self) -> Iterator[Metric]:
        """Like ``collect()`` but not counted as a scrape (for pushes: without the ``rank`` label, which the
        push's group key holds)."""
        fams = [
            *stamp(self._live_families(self._snap, scrapes=self._scrapes, with_samples=True), self.labels),
            *self._report_families(self._snap),
        ]
        yield from without(fams, ("rank",)) if "rank" in self.labels else fams

    # --- the fast path ------------------------------------------------------------------------

    def fast_path(self) -> FastPath:
        """For the /metrics server: the per-window families' names and their text, once per window."""
        return FastPath(frozenset(f.name for f in self._per_window(None)), self.static_exposition)

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

    def _render_static(self, snap: Snapshot | None) -> bytes:
        fams = list(stamp([*window_families(snap, self.run), *layer_families(snap, self.run)], self.labels))
        text = generate_latest(_Families(fams))
        if self.per_expert and snap is not None:
            text += expert_text(snap, self.run, self.labels).encode()
        return text

    # --- families -----------------------------------------------------------------------------

    def _per_window(self, snap: Snapshot | None) -> list[Metric]:
        fams = [*window_families(snap, self.run), *layer_families(snap, self.run)]
        if self.per_expert:
            fams += expert_families(snap, self.run)
        return list(stamp(fams, self.labels))

    def _report_families(self, snap: Snapshot | None) -> list[Metric]:
        # Families that depend only on the immutable snapshot are built once per window, not per scrape
        # (60 layers x 256 experts is ~30k samples), and only when a render reads them.
        cached = self._cache
        if cached is not None and cached[0] is snap:
            return cached[1]

        def build() -> dict[str, Metric]:
            with self._built_lock:
                built = self._built
                if built is None or built[0] is not snap:
                    built = (snap, {f.name: f for f in self._per_window(snap)})
                    self._built = built
                return built[1]

        fams: list[Metric] = [_Deferred(t, build) for t in self._templates]
        self._cache = (snap, fams)
        return fams

    def _live_families(self, snap: Snapshot | None, scrapes: int, with_samples: bool) -> Iterator[Metric]:
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
        notifications = CounterMetricFamily(
            "moewatch_notifications",
            "Alert notifications by notifier and outcome (" + ", ".join(DELIVERY_OUTCOMES) + ").",
            labels=["run", "notifier", "outcome"],
        )
        if with_samples:
            build.add_metric(run + list(self._build.values()), 1)
            windows.add_metric(run, snap.windows if snap else 0)
            tokens.add_metric(run, snap.tokens if snap else 0)
            hook_errors.add_metric(run, self._stats.hook_errors)
            scrape_c.add_metric(run, scrapes)
            for notifier, outcomes in sorted(self._stats.deliveries.items()):
                for outcome, n in sorted(outcomes.items()):
                    notifications.add_metric([self.run, notifier, outcome], n)
        yield from (build, windows, tokens, hook_errors, scrape_c, notifications)
        if self._push_stats is not None:
            pushes = CounterMetricFamily(
                "moewatch_pushgateway_pushes", "Pushes to the Pushgateway by outcome.", labels=["run", "outcome"]
            )
            if with_samples:
                for outcome, n in sorted(self._push_stats().items()):
                    pushes.add_metric([self.run, outcome], n)
            yield pushes
