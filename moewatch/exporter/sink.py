"""The Prometheus sink: a /metrics server and/or Pushgateway pushes, fed one report per window."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from moewatch.exporter.collector import MoEWatchCollector
from moewatch.exporter.push import Pusher, default_rank, local_rank
from moewatch.exporter.server import MetricsServer, start_metrics_server
from moewatch.exporter.settings import PrometheusConfig, PushgatewayConfig
from moewatch.report import WindowReport
from moewatch.sinks.base import MonitorStats

if TYPE_CHECKING:
    from moewatch.config import MoEWatchConfig

__all__ = ["PrometheusExporter", "prometheus_sink"]

log = logging.getLogger(__name__)


class _Peek(Collector):
    def __init__(self, collector: MoEWatchCollector) -> None:
        self._c = collector

    def collect(self) -> Iterator[Metric]:
        return self._c.peek()


class PrometheusExporter:
    """Exports every window report to Prometheus.

    Serves ``/metrics`` (when ``prometheus.enabled``) from ``registry`` (a fresh ``CollectorRegistry`` by
    default, so two monitors in one process do not clash) and pushes to a Pushgateway after every window
    and at close (when ``pushgateway.url`` is set). ``url``/``port`` are the actual address once serving
    (``port=0`` picks a free one), else ``None``. Only the reporting rank builds sinks, so a job group
    serves one endpoint; with ``per_rank`` every rank builds this one (``per_rank`` is True: the monitor
    hands it that rank's own counts) and every series gets a ``rank`` label. ``stage`` (pipeline
    parallelism) adds a ``stage`` label. With either, several exporters may share a node, so the port is
    ``port + local_rank()`` (``port=0`` stays "any free port").
    """

    name = "prometheus"

    def __init__(
        self,
        run: str,
        config: PrometheusConfig | None = None,
        pushgateway: PushgatewayConfig | None = None,
        *,
        registry: CollectorRegistry | None = None,
        rank: int | None = None,
        stage: int | None = None,
    ) -> None:
        self.config = config or PrometheusConfig()
        rank = default_rank() if rank is None else rank
        self.per_rank = self.config.per_rank
        labels: dict[str, str] = {}
        if stage is not None:
            labels["stage"] = str(stage)
        if self.per_rank:
            labels["rank"] = str(rank)
        if labels and self.config.port != 0:
            port = self.config.port + local_rank()
            if port > 65535:
                from moewatch.config import ConfigError

                raise ConfigError(
                    f"moewatch: prometheus.port {self.config.port} + local rank {port - self.config.port} is past "
                    "65535; lower prometheus.port (MOEWATCH_PROMETHEUS__PORT)"
                )
            self.config = self.config.model_copy(update={"port": port})
        self.registry = registry if registry is not None else CollectorRegistry()
        self.collector = MoEWatchCollector(run, per_expert=self.config.per_expert, labels=labels)
        self.registry.register(self.collector)
        self._server: MetricsServer | None = None
        self._pusher: Pusher | None = None
        try:
            if self.config.enabled:
                self._server = start_metrics_server(self.config, self.registry, self.collector.fast_path())
            if pushgateway is not None and pushgateway.url:
                push_registry = CollectorRegistry()
                push_registry.register(_Peek(self.collector))
                self._pusher = Pusher(pushgateway, push_registry, run, rank)
                self.collector.set_push_stats(lambda: dict(self._pusher.stats) if self._pusher else {})
        except BaseException:
            self.registry.unregister(self.collector)
            raise

    @classmethod
    def from_config(
        cls, cfg: MoEWatchConfig, registry: CollectorRegistry | None = None
    ) -> PrometheusExporter:
        return cls(cfg.run_name, cfg.prometheus, cfg.pushgateway, registry=registry, stage=cfg.pipeline_stage)

    @property
    def url(self) -> str | None:
        return self._server.url if self._server else None

    @property
    def port(self) -> int | None:
        return self._server.port if self._server else None

    @property
    def bind_address(self) -> str | None:
        """The address the server really listens on, e.g. ``0.0.0.0:9405`` (``url`` is one to reach it by)."""
        if self._server is None:
            return None
        host = str(self._server.httpd.server_address[0])
        return f"[{host}]:{self._server.port}" if ":" in host else f"{host}:{self._server.port}"

    @property
    def pushgateway_url(self) -> str | None:
        return self._pusher.display_url if self._pusher else None  # password masked

    def update_stats(self, stats: MonitorStats) -> None:
        self.collector.update_stats(stats)

    def emit(self, report: WindowReport) -> None:
        self.collector.update(report)
        if self._pusher is not None:
            self._pusher.request()

    def close(self) -> None:
        if self._pusher is not None:
            self._pusher.close()
            self._pusher = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        try:
            self.registry.unregister(self.collector)
        except KeyError:
            pass

    def __repr__(self) -> str:
        return f"PrometheusExporter(run={self.collector.run!r}, url={self.url!r}, pushgateway={self.pushgateway_url!r})"


def prometheus_sink(cfg: MoEWatchConfig) -> PrometheusExporter | None:
    """SINK_FACTORIES entry: the exporter when serving or pushing is configured, else None."""
    if not cfg.prometheus.enabled and not cfg.pushgateway.url:
        return None
    return PrometheusExporter.from_config(cfg)
