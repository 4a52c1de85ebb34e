"""Sinks: where window reports go. The protocols are in :mod:`moewatch.sinks.base` (a leaf: the monitor
imports nothing else of this package); :func:`build_sinks` makes the configured ones. Names load on first
use, so importing the protocols does not load requests, rich or prometheus_client."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moewatch._lazy import lazy_exports

if TYPE_CHECKING:
    from moewatch.sinks.base import Sink
    from moewatch.sinks.console import ConsoleSink
    from moewatch.sinks.factory import SINK_FACTORIES, build_sinks
    from moewatch.sinks.jsonl import JsonlSink

__all__ = ["ConsoleSink", "JsonlSink", "SINK_FACTORIES", "Sink", "build_sinks"]

__getattr__ = lazy_exports(
    __name__,
    {
        "ConsoleSink": "moewatch.sinks.console",
        "JsonlSink": "moewatch.sinks.jsonl",
        "SINK_FACTORIES": "moewatch.sinks.factory",
        "Sink": "moewatch.sinks.base",
        "build_sinks": "moewatch.sinks.factory",
    },
    globals(),
)
