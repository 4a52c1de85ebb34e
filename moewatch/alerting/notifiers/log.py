"""The log notifier: every notification as log records on ``moewatch.alerts`` (the default receiver)."""

from __future__ import annotations

import logging

from moewatch.alerting.model import Notification
from moewatch.alerting.notifiers.common import alert_line, headline

__all__ = ["ALERTS_LOGGER", "LogNotifier"]

#: A receiver, not a module logger: route or silence alert lines apart from moewatch's own diagnostics.
ALERTS_LOGGER = "moewatch.alerts"


class LogNotifier:
    """Logs firing alerts at WARNING and resolved ones at INFO, on the calling thread (cheap)."""

    name = "log"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger(ALERTS_LOGGER)

    def notify(self, n: Notification) -> None:
        level = logging.WARNING if n.firing else logging.INFO
        self.log.log(level, "moewatch alert: %s", headline(n, limit=4000))
        for a in n.changed_alerts:
            self.log.log(logging.WARNING if a.status == "firing" else logging.INFO, "  %s", alert_line(a))
