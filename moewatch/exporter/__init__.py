"""Prometheus exporter: a custom Collector over the last window report, a /metrics server, optional
Pushgateway pushes, and the generators of the Grafana dashboards and alert rules.

Names load on first use, so importing ``moewatch.exporter.settings`` (as :mod:`moewatch.config` does)
does not load prometheus_client or the HTTP server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moewatch._lazy import lazy_exports

if TYPE_CHECKING:
    from moewatch.exporter.collector import MoEWatchCollector
    from moewatch.exporter.settings import PrometheusConfig, PushgatewayConfig
    from moewatch.exporter.sink import PrometheusExporter, prometheus_sink

__all__ = [
    "MoEWatchCollector",
    "PrometheusConfig",
    "PrometheusExporter",
    "PushgatewayConfig",
    "prometheus_sink",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "MoEWatchCollector": "moewatch.exporter.collector",
        "PrometheusConfig": "moewatch.exporter.settings",
        "PushgatewayConfig": "moewatch.exporter.settings",
        "PrometheusExporter": "moewatch.exporter.sink",
        "prometheus_sink": "moewatch.exporter.sink",
    },
    globals(),
)
