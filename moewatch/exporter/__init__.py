"""Prometheus exporter (issue 3): a custom Collector over the last window report, a /metrics server,
optional Pushgateway pushes, and the generators of the Grafana dashboards and alert rules."""

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
