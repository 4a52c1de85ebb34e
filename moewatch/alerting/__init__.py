"""Alerting (issue 4): Alertmanager-style alerts on window reports, sent to Slack, PagerDuty, a generic
webhook or the log, off the training thread.

This package is imported by :mod:`moewatch.config` (for :class:`AlertsConfig`), so everything else is
loaded lazily here to keep that import light and free of cycles.
"""

from __future__ import annotations

from typing import Any

from moewatch.alerting.settings import AlertCondition, AlertsConfig, Severity

__all__ = ["AlertCondition", "AlertEngine", "AlertSink", "AlertsConfig", "Severity", "make_alert_sink"]

_LAZY = {
    "AlertEngine": "moewatch.alerting.engine",
    "AlertSink": "moewatch.alerting.sink",
    "make_alert_sink": "moewatch.alerting.sink",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moewatch.alerting' has no attribute {name!r}")
