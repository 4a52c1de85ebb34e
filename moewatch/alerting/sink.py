"""The alert sink: engine on the training thread, delivery on one worker thread per notifier."""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from moewatch.alerting.callbacks import AlertCallback, CallbackDispatcher
from moewatch.alerting.delivery import DeliveryWorker, HttpNotifier, RetryPolicy
from moewatch.alerting.engine import AlertEngine
from moewatch.alerting.model import Notification, incident_key
from moewatch.alerting.notifiers import LogNotifier, PagerDutyNotifier, SlackNotifier, WebhookNotifier
from moewatch.alerting.security import check_url, register_secrets
from moewatch.alerting.settings import AlertsConfig
from moewatch.config import MoEWatchConfig, Thresholds
from moewatch.errors import ConfigError
from moewatch.report import WindowReport

__all__ = ["AlertSink", "build_notifiers", "callback_alert_sink", "make_alert_sink"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1


def build_notifiers(cfg: AlertsConfig) -> list[HttpNotifier]:
    """The HTTP notifiers ``cfg`` configures, after checking their URLs (ConfigError names the field)."""
    out: list[HttpNotifier] = []
    insecure = cfg.allow_insecure_http
    if cfg.slack_webhook_url is not None:
        url = cfg.slack_webhook_url.get_secret_value()
        check_url("alerts.slack_webhook_url", url, insecure)
        out.append(SlackNotifier(url, cfg.slack_conditions, cfg.slack_min_interval))
    if cfg.pagerduty_routing_key is not None:
        check_url("alerts.pagerduty_url", cfg.pagerduty_url, insecure)
        key = cfg.pagerduty_routing_key.get_secret_value().strip()
        if not key:
            raise ConfigError(
                "alerts.pagerduty_routing_key is empty; set MOEWATCH_ALERTS__PAGERDUTY_ROUTING_KEY to the "
                "integration key of an Events API v2 integration, or unset it"
            )
        out.append(PagerDutyNotifier(key, cfg.pagerduty_conditions, cfg.pagerduty_url))
    if cfg.webhook_url is not None:
        url = cfg.webhook_url.get_secret_value()
        check_url("alerts.webhook_url", url, insecure)
        token = cfg.webhook_bearer_token.get_secret_value() if cfg.webhook_bearer_token else None
        out.append(WebhookNotifier(url, cfg.webhook_conditions, cfg.receiver, cfg.webhook_max_alerts, token))
    register_secrets([s for n in out for s in n.secrets()])
    return out


class AlertSink:
    """A moewatch sink that evaluates alerts on every window report, sends notifications and calls the
    ``on_alert`` callbacks.

    ``emit`` costs the training loop one engine evaluation and a queue append per notifier; it never
    waits on the network. ``state_dict``/``load_state_dict`` carry open incidents across a restart.
    ``log_notifications`` overrides ``config.log_notifications`` (None: the config decides).
    """

    name = "alerts"

    def __init__(
        self,
        config: AlertsConfig,
        thresholds: Thresholds | None = None,
        *,
        notifiers: list[HttpNotifier] | None = None,
        log_notifications: bool | None = None,
    ) -> None:
        self.config = config
        self.engine = AlertEngine(config, thresholds)
        http = build_notifiers(config) if notifiers is None else notifiers
        policy = RetryPolicy.from_config(config)
        self.workers = [DeliveryWorker(n, policy, config.queue_size) for n in http]
        if log_notifications is None:
            log_notifications = config.log_notifications
        use_log = log_notifications if log_notifications is not None else not http
        self.log_notifier = LogNotifier() if use_log else None
        self.callbacks: CallbackDispatcher | None = None
        self._incidents: dict[str, str] = {}
        self._closed = False
        self._atexit = None
        if self.workers:
            # A script that never closes its monitor still gets its last alerts out (bounded by close_timeout).
            ref = weakref.ref(self)

            def _close_at_exit() -> None:
                sink = ref()
                if sink is not None:
                    sink.close()

            self._atexit = _close_at_exit
            atexit.register(_close_at_exit)

    def emit(self, report: WindowReport) -> None:
        if self._closed:
            return
        try:
            notification = self.engine.evaluate(report)
        except Exception:  # noqa: BLE001 - alerting must never reach the training loop
            log.exception("moewatch: evaluating alerts for window %d failed", report.window)
            return
        if notification is not None:
            self.dispatch(notification)
            if self.callbacks is not None:
                self.callbacks.submit(notification, report)

    def add_alert_callback(self, callback: AlertCallback) -> None:
        """Call ``callback(alert, layer_report)`` for every alert that fires or resolves (worker thread)."""
        if self.callbacks is None:
            self.callbacks = CallbackDispatcher()
        self.callbacks.add(callback)

    def dispatch(self, notification: Notification) -> None:
        """Hand ``notification`` to every notifier subscribed to something in it (non-blocking)."""
        if self.log_notifier is not None:
            try:
                self.log_notifier.notify(notification)
            except Exception:  # noqa: BLE001
                log.exception("moewatch: logging a notification failed")
        for worker in self.workers:
            part = notification.only(worker.notifier.conditions)
            if part is not None and part.is_repeat and not getattr(worker.notifier, "sends_repeats", True):
                continue
            if part is not None:
                worker.submit(self._with_incident(worker.name, part))

    def _with_incident(self, name: str, part: Notification) -> Notification:
        """Attach the notifier's group incident: opened by the first firing alert, closed when none fire."""
        key = self._incidents.get(name, "")
        if part.firing:
            if not key:
                key = "moewatch-" + incident_key(part.run, name, part.window, part.time, length=24)
            self._incidents[name] = key
        else:
            self._incidents.pop(name, None)
        return replace(part, incident=key)

    def delivery_stats(self) -> dict[str, dict[str, int]]:
        """Per notifier: messages sent and failed, retries, notifications dropped (queue full or closed)."""
        return {w.name: w.stats.as_dict() for w in self.workers}

    def on_delivery(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on a delivery thread) whenever a delivery counter changes."""
        for w in self.workers:
            w.stats.listeners.append(callback)

    def close(self) -> None:
        """Deliver what is queued within ``alerts.close_timeout`` seconds, then return regardless."""
        if self._closed:
            return
        self._closed = True
        if self._atexit is not None:
            atexit.unregister(self._atexit)
        if self.callbacks is not None:
            self.callbacks.close(self.config.close_timeout)
        deadline = time.monotonic() + self.config.close_timeout
        for w in self.workers:
            w.request_close(deadline)
        for w in self.workers:
            if not w.close(deadline):
                log.warning("moewatch: %s delivery still busy at close timeout; abandoning it", w.name)

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "engine": self.engine.state_dict(), "incidents": dict(self._incidents)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            log.warning("moewatch: ignoring alert sink state of unknown version %r", state.get("version"))
            return
        self.engine.load_state_dict(state.get("engine", {}))
        self._incidents = dict(state.get("incidents", {}))

    def __repr__(self) -> str:
        targets = ", ".join(f"{w.name}={w.notifier.target()}" for w in self.workers) or "log"
        return f"AlertSink({targets})"


def make_alert_sink(cfg: MoEWatchConfig) -> AlertSink | None:
    """Sink factory for :data:`moewatch.sinks.SINK_FACTORIES`; None when alerts are disabled."""
    if not cfg.alerts.enabled:
        return None
    return AlertSink(cfg.alerts, cfg.thresholds)


def callback_alert_sink(cfg: MoEWatchConfig) -> AlertSink:
    """The sink ``watch.on_alert`` adds when alerts are disabled: the same engine and rules, no notifier
    and no log lines, only the callbacks."""
    return AlertSink(cfg.alerts, cfg.thresholds, notifiers=[], log_notifications=False)
