"""Notifiers: how a notification reaches a service."""

from moewatch.alerting.notifiers.log import LogNotifier
from moewatch.alerting.notifiers.pagerduty import PagerDutyNotifier, pagerduty_event
from moewatch.alerting.notifiers.slack import SlackNotifier, slack_payload
from moewatch.alerting.notifiers.webhook import WebhookNotifier, alertmanager_payload

__all__ = [
    "LogNotifier",
    "PagerDutyNotifier",
    "SlackNotifier",
    "WebhookNotifier",
    "alertmanager_payload",
    "pagerduty_event",
    "slack_payload",
]
