"""Alerting: Alertmanager-style alerts on window reports, sent to Slack, PagerDuty, a generic webhook or
the log, off the training thread. Names load on first use (see :mod:`moewatch._lazy`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moewatch._lazy import lazy_exports

if TYPE_CHECKING:
    from moewatch.alerting.engine import AlertEngine
    from moewatch.alerting.settings import AlertCondition, AlertsConfig, Severity
    from moewatch.alerting.sink import AlertSink, make_alert_sink

__all__ = ["AlertCondition", "AlertEngine", "AlertSink", "AlertsConfig", "Severity", "make_alert_sink"]

__getattr__ = lazy_exports(
    __name__,
    {
        "AlertCondition": "moewatch.alerting.settings",
        "AlertsConfig": "moewatch.alerting.settings",
        "Severity": "moewatch.alerting.settings",
        "AlertEngine": "moewatch.alerting.engine",
        "AlertSink": "moewatch.alerting.sink",
        "make_alert_sink": "moewatch.alerting.sink",
    },
    globals(),
)
