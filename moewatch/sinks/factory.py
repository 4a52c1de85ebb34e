"""Build the configured sinks: one factory per sink kind, in emit order."""

from __future__ import annotations

import logging
from collections.abc import Callable

from moewatch.alerting.sink import make_alert_sink
from moewatch.config import MoEWatchConfig
from moewatch.exporter.sink import prometheus_sink
from moewatch.sinks.base import Sink
from moewatch.sinks.console import ConsoleSink
from moewatch.sinks.jsonl import JsonlSink

__all__ = ["SINK_FACTORIES", "build_sinks"]

log = logging.getLogger(__name__)


def _jsonl(cfg: MoEWatchConfig) -> Sink | None:
    return JsonlSink(cfg.jsonl_path) if cfg.jsonl.enabled else None


def _console(cfg: MoEWatchConfig) -> Sink | None:
    return ConsoleSink(live=cfg.console.live, max_layers=cfg.console.max_layers) if cfg.console.enabled else None


#: Each factory returns a sink for the config, or None when that sink is off. Order is emit order.
SINK_FACTORIES: list[Callable[[MoEWatchConfig], Sink | None]] = [_jsonl, _console]
SINK_FACTORIES.append(prometheus_sink)  # Prometheus /metrics + Pushgateway (moewatch.exporter)
SINK_FACTORIES.append(make_alert_sink)  # alerts to Slack / PagerDuty / webhook / log (moewatch.alerting)


def build_sinks(cfg: MoEWatchConfig) -> list[Sink]:
    """Build every configured sink; if one fails to start, close those already built and re-raise."""
    sinks: list[Sink] = []
    try:
        for factory in SINK_FACTORIES:
            sink = factory(cfg)
            if sink is not None:
                sinks.append(sink)
    except BaseException:
        for s in sinks:
            try:
                s.close()
            except Exception:  # noqa: BLE001 - best effort while unwinding
                log.exception("moewatch: closing sink %r failed", s)
        raise
    return sinks
