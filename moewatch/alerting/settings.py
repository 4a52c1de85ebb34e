"""Config section for alerting (``MoEWatchConfig.alerts``, env ``MOEWATCH_ALERTS__*``).

URLs and routing keys are :class:`~pydantic.SecretStr`: they never show in reprs, dumps or logs. Which
URLs are acceptable (``https``, or ``http`` to loopback unless ``allow_insecure_http``) is checked when the
alert sink is built, not here, because pydantic puts the raw input into its validation errors.
"""

from __future__ import annotations

import re
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

__all__ = ["AlertCondition", "AlertsConfig", "Severity", "parse_duration"]


#: PagerDuty Events API v2 endpoint (the default of ``alerts.pagerduty_url``).
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"


class AlertCondition(str, Enum):
    """What an alert is about; one alert per (run, layer, condition)."""

    COLLAPSED = "collapsed"
    WARNING = "warning"
    DEAD_EXPERTS = "dead_experts"
    NONFINITE = "nonfinite"
    PROJECTED_COLLAPSE = "projected_collapse"
    INVALID_IDS = "invalid_ids"


class Severity(str, Enum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


ALL_CONDITIONS = list(AlertCondition)
_DEFAULT_SEVERITY = {
    AlertCondition.COLLAPSED: Severity.CRITICAL,
    AlertCondition.WARNING: Severity.WARNING,
    AlertCondition.DEAD_EXPERTS: Severity.WARNING,
    AlertCondition.NONFINITE: Severity.CRITICAL,
    AlertCondition.PROJECTED_COLLAPSE: Severity.WARNING,
    # Expert ids outside [0, E): the layer's counts come from a broken router or adapter. Training goes on
    # (a real out-of-range id would have crashed the expert dispatch), the monitoring of the layer does not.
    AlertCondition.INVALID_IDS: Severity.WARNING,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> object:
    """Seconds as a number, or an Alertmanager-style duration string such as ``"4h"``, ``"1h30m"``, ``"90s"``."""
    if not isinstance(value, str):
        return value
    text = value.strip().replace(" ", "")
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration; use seconds or e.g. '90s', '30m', '4h', '1h30m'")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _conditions_field(default: list[AlertCondition], who: str) -> object:
    return Field(
        default_factory=lambda: list(default),
        description=f"Conditions {who} is told about (JSON list in the environment, e.g. "
        '\'["collapsed","dead_experts"]\').',
    )


class AlertsConfig(BaseModel):
    """Alert rules evaluated on every window report, and where notifications go."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Evaluate alerts on every window.")

    # --- rules ---------------------------------------------------------------------------------
    conditions: list[AlertCondition] = Field(
        default_factory=lambda: list(ALL_CONDITIONS),
        description="Conditions that raise alerts: collapsed, warning, dead_experts, nonfinite, projected_collapse, "
        'invalid_ids (JSON list in the environment, e.g. \'["collapsed","nonfinite"]\').',
    )
    severities: dict[AlertCondition, Severity] = Field(
        default_factory=lambda: dict(_DEFAULT_SEVERITY),
        description="Severity per condition (critical, error, warning, info); unnamed conditions keep "
        "their default (collapsed/nonfinite critical; warning, dead_experts, projected_collapse and invalid_ids "
        "warning).",
    )
    for_windows: int = Field(
        1, ge=1, description="Windows a condition must hold (pending) before its alert fires."
    )
    resolve_windows: int = Field(
        2, ge=1, description="Consecutive clean windows after which a firing alert resolves."
    )
    repeat_interval: float = Field(
        4 * 3600.0,
        ge=0,
        description="Re-send still-firing alerts this long after the last notification (seconds, or "
        "'30m', '4h'; 0 re-sends at every window). PagerDuty is not re-sent: it keeps its incident open.",
    )
    projected_collapse_horizon_steps: int = Field(
        500,
        ge=1,
        description="The projected_collapse alert fires when a layer's trend reaches a collapsed threshold "
        "within this many optimizer steps of the window's end (see early_warning).",
    )
    dead_experts_min: int = Field(
        1, ge=1, description="Dead experts in a layer needed for the dead_experts alert."
    )

    # --- notifiers -----------------------------------------------------------------------------
    slack_webhook_url: SecretStr | None = Field(
        None, description="Slack incoming-webhook URL (secret); unset = no Slack notifications."
    )
    slack_conditions: list[AlertCondition] = _conditions_field(ALL_CONDITIONS, "Slack")  # type: ignore[assignment]
    slack_min_interval: float = Field(
        1.0, ge=0, description="Seconds between two Slack messages (Slack allows about one per second)."
    )
    pagerduty_routing_key: SecretStr | None = Field(
        None, description="PagerDuty Events API v2 integration (routing) key (secret); unset = no paging."
    )
    pagerduty_url: str = Field(PAGERDUTY_EVENTS_URL, description="PagerDuty Events API v2 endpoint.")
    pagerduty_conditions: list[AlertCondition] = _conditions_field(  # type: ignore[assignment]
        [AlertCondition.COLLAPSED, AlertCondition.DEAD_EXPERTS, AlertCondition.NONFINITE], "PagerDuty"
    )
    webhook_url: SecretStr | None = Field(
        None, description="Generic webhook URL (secret) that receives Alertmanager's webhook payload (version 4)."
    )
    webhook_bearer_token: SecretStr | None = Field(
        None, description="Sent as 'Authorization: Bearer <token>' to webhook_url, when set (secret)."
    )
    webhook_conditions: list[AlertCondition] = _conditions_field(ALL_CONDITIONS, "the generic webhook")  # type: ignore[assignment]
    webhook_max_alerts: int = Field(
        0, ge=0, description="Most alerts per webhook message (Alertmanager's max_alerts); 0 = all."
    )
    receiver: str = Field("moewatch", min_length=1, description="Receiver name put into webhook payloads.")
    log_notifications: bool | None = Field(
        None,
        description="Also log every notification (logger 'moewatch.alerts'); default: only when no "
        "Slack/PagerDuty/webhook is configured.",
    )

    # --- links ---------------------------------------------------------------------------------
    grafana_url: str | None = Field(
        None,
        description="Grafana base URL (e.g. https://grafana.example.com); notifications link to the "
        "moewatch-layer dashboard there with var-run, var-layer and the incident's time range. A URL "
        "containing /d/ is taken as the dashboard itself.",
    )
    external_url: str | None = Field(
        None, description="Sent as externalURL in webhook payloads; default: grafana_url."
    )

    # --- delivery ------------------------------------------------------------------------------
    allow_insecure_http: bool = Field(
        False, description="Allow plain http:// notification URLs to non-loopback hosts (secrets in clear text)."
    )
    queue_size: int = Field(
        100, ge=1, description="Notifications queued per notifier; when full the oldest is dropped and counted."
    )
    connect_timeout: float = Field(3.05, gt=0, description="Seconds to wait for a TCP/TLS connection.")
    read_timeout: float = Field(10.0, gt=0, description="Seconds to wait for the service to answer.")
    max_retries: int | None = Field(
        None, ge=0,
        description="Retries after connection errors, 5xx and 429 (never after other 4xx). None (the default): "
        "retry while the process lives, so an outage of any length loses nothing; queued notifications of one "
        "alert group are coalesced into its latest state meanwhile.",
    )
    backoff_initial: float = Field(1.0, ge=0, description="First retry delay in seconds; doubles each retry, with jitter.")
    backoff_max: float = Field(
        300.0, ge=0, description="Longest retry delay in seconds (the cap of the exponential backoff)."
    )
    retry_after_max: float = Field(
        300.0, ge=0, description="Longest Retry-After (seconds) honoured from a 429/503 answer."
    )
    close_timeout: float = Field(
        5.0, ge=0,
        description="Seconds close() waits to deliver what is queued before giving up; what is still undelivered "
        "then is logged with its count and counted as dropped.",
    )

    @field_validator("repeat_interval", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value)

    @field_validator("severities", mode="after")
    @classmethod
    def _fill_severities(cls, value: dict[AlertCondition, Severity]) -> dict[AlertCondition, Severity]:
        return {**_DEFAULT_SEVERITY, **value}

    def severity_of(self, condition: AlertCondition) -> Severity:
        return self.severities.get(condition, _DEFAULT_SEVERITY[condition])

    @property
    def http_configured(self) -> bool:
        return any(x is not None for x in (self.slack_webhook_url, self.pagerduty_routing_key, self.webhook_url))
