"""PagerDuty Events API v2: one incident per alert group, as Alertmanager's PagerDuty integration does.

The group (one run, the conditions this notifier is subscribed to) opens an incident when its first alert
fires and resolves it when its last alert resolves; the sink hands every notification that incident's
``dedup_key`` (``Notification.incident``), so sixty layers collapsing page once, an expert dying in a
layer while the incident is open updates it without a new page, and a restarted run resolves the incident
it opened. Repeats are not sent: PagerDuty keeps the incident open and escalates on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moewatch.alerting.delivery import HttpRequest
from moewatch.alerting.model import Alert, Notification, rfc3339
from moewatch.alerting.notifiers.common import headline, redacted_target
from moewatch.alerting.settings import PAGERDUTY_EVENTS_URL, AlertCondition, Severity

__all__ = ["DEFAULT_URL", "PagerDutyNotifier", "pagerduty_event"]

DEFAULT_URL = PAGERDUTY_EVENTS_URL
_MAX_DETAIL_ALERTS = 100
_ORDER = list(Severity)  # critical first


def _alert_details(a: Alert) -> dict[str, Any]:
    return {
        "layer": a.layer,
        "module": a.module,
        "condition": a.condition.value,
        "severity": a.severity.value,
        "status": a.status,
        "summary": a.summary,
        "reasons": list(a.reasons),
        "metrics": {m.name: m.value for m in a.metrics},
        "thresholds": [m.describe() for m in a.metrics],
        "dead_expert_ids": list(a.dead_expert_ids),
        "nonfinite": a.nonfinite,
        "invalid_ids": a.invalid_ids,
        "started": rfc3339(a.starts_at),
    }


def pagerduty_event(n: Notification, routing_key: str) -> dict[str, Any]:
    """A ``trigger`` while anything fires, else a ``resolve``, for the group incident ``n.incident``."""
    assert n.incident, "the sink sets the group incident before a PagerDuty notification is rendered"
    if not n.firing and not n.test:
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": n.incident}
    worst = min((a.severity for a in n.firing), key=_ORDER.index, default=Severity.INFO)
    firing = n.firing
    details: dict[str, Any] = {
        "run": n.run,
        "step": n.step,
        "window": n.window,
        "firing_count": len(firing),
        "layers_firing": sorted({a.layer for a in firing}),
        "dead_expert_ids": {
            str(a.layer): list(a.dead_expert_ids) for a in firing if a.condition is AlertCondition.DEAD_EXPERTS
        },
        "firing": [_alert_details(a) for a in firing[:_MAX_DETAIL_ALERTS]],
        "resolved": [_alert_details(a) for a in n.resolved[:_MAX_DETAIL_ALERTS]],
    }
    if len(firing) > _MAX_DETAIL_ALERTS:
        details["truncated_alerts"] = len(firing) - _MAX_DETAIL_ALERTS
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": n.incident,
        "payload": {
            "summary": headline(n, limit=1024),
            "source": f"moewatch/{n.run}",
            "severity": worst.value,
            "timestamp": rfc3339(n.time),
            "component": "moe-router",
            "group": n.run,
            "class": ",".join(sorted({a.condition.value for a in firing})) or "test",
            "custom_details": details,
        },
        "client": "moewatch",
    }
    link = next((a.generator_url for a in firing if a.generator_url), None) or n.grafana_url
    if link:
        event["client_url"] = link
        event["links"] = [{"href": link, "text": "moewatch dashboard (Grafana)"}]
    return event


class PagerDutyNotifier:
    """Sends Events API v2 ``trigger``/``resolve`` events."""

    name = "pagerduty"
    min_interval = 0.0
    sends_repeats = False  # PagerDuty keeps the incident open and escalates by itself

    def __init__(self, routing_key: str, conditions: Iterable[AlertCondition], url: str = DEFAULT_URL) -> None:
        self._key = routing_key
        self._url = url
        self.conditions = frozenset(conditions)

    def render(self, notification: Notification) -> list[HttpRequest]:
        if (notification.is_repeat and not notification.test) or not notification.incident:
            return []
        event = pagerduty_event(notification, self._key)
        return [HttpRequest(self._url, event, label=f"{event['event_action']} {event['dedup_key']}")]

    def resolve_request(self, dedup_key: str) -> HttpRequest:
        event = {"routing_key": self._key, "event_action": "resolve", "dedup_key": dedup_key}
        return HttpRequest(self._url, event, label=f"resolve {dedup_key}")

    def secrets(self) -> list[str]:
        return [self._key]

    def target(self) -> str:
        return redacted_target(self._url)

    def __repr__(self) -> str:
        return f"PagerDutyNotifier(url={self.target()!r}, routing_key=<redacted>)"
