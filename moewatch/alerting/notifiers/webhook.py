"""Generic JSON webhook carrying Alertmanager's webhook payload (version 4), so any receiver written for
Alertmanager (alertmanager-webhook-*, Grafana OnCall, Opsgenie/Teams bridges, ...) works unchanged."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moewatch.alerting.delivery import HttpRequest
from moewatch.alerting.model import Alert, Notification, rfc3339
from moewatch.alerting.notifiers.common import redacted_target
from moewatch.alerting.settings import AlertCondition

__all__ = ["WebhookNotifier", "alertmanager_payload"]


def _am_alert(a: Alert) -> dict[str, Any]:
    return {
        "status": a.status,
        "labels": a.labels,
        "annotations": a.annotations,
        "startsAt": rfc3339(a.starts_at),
        "endsAt": rfc3339(a.ends_at),
        "generatorURL": a.generator_url,
        "fingerprint": a.fingerprint,
    }


def _common(dicts: list[dict[str, str]]) -> dict[str, str]:
    if not dicts:
        return {}
    first = dicts[0]
    return {k: v for k, v in first.items() if all(d.get(k) == v for d in dicts[1:])}


def _test_alert(n: Notification) -> dict[str, Any]:
    return {
        "status": "firing",
        "labels": {"alertname": "MoEWatchTest", "run": n.run, "severity": "info"},
        "annotations": {"summary": f"moewatch test notification for run {n.run}"},
        "startsAt": rfc3339(n.time),
        "endsAt": rfc3339(None),
        "generatorURL": n.grafana_url or "",
        "fingerprint": "0" * 16,
    }


def alertmanager_payload(n: Notification, receiver: str = "moewatch", max_alerts: int = 0) -> dict[str, Any]:
    if n.test:
        test = _test_alert(n)
        return {
            "version": "4", "groupKey": n.group_key, "truncatedAlerts": 0, "status": "firing",
            "receiver": receiver, "groupLabels": {"run": n.run}, "commonLabels": test["labels"],
            "commonAnnotations": test["annotations"], "externalURL": n.external_url or "", "alerts": [test],
        }
    alerts = list(n.alerts)
    kept = alerts[:max_alerts] if max_alerts else alerts
    return {
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": len(alerts) - len(kept),
        "status": n.status,
        "receiver": receiver,
        "groupLabels": {"run": n.run},
        "commonLabels": _common([a.labels for a in alerts]),
        "commonAnnotations": _common([a.annotations for a in alerts]),
        "externalURL": n.external_url or "",
        "alerts": [_am_alert(a) for a in kept],
    }


class WebhookNotifier:
    """POSTs Alertmanager's webhook JSON to a URL."""

    name = "webhook"
    min_interval = 0.0

    def __init__(
        self,
        url: str,
        conditions: Iterable[AlertCondition],
        receiver: str = "moewatch",
        max_alerts: int = 0,
        bearer_token: str | None = None,
    ) -> None:
        self._url = url
        self._token = bearer_token
        self.conditions = frozenset(conditions)
        self.receiver = receiver
        self.max_alerts = max_alerts

    def render(self, notification: Notification) -> list[HttpRequest]:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        payload = alertmanager_payload(notification, self.receiver, self.max_alerts)
        return [HttpRequest(self._url, payload, label="test" if notification.test else f"window {notification.window}",
                            headers=headers)]

    def secrets(self) -> list[str]:
        return [s for s in (self._url, self._token) if s]

    def target(self) -> str:
        return redacted_target(self._url)

    def __repr__(self) -> str:
        return f"WebhookNotifier(url={self.target()!r})"
