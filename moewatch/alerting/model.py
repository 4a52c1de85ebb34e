"""What the engine hands to notifiers: immutable alert snapshots grouped into one notification."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from moewatch.alerting.settings import AlertCondition, Severity

__all__ = ["Alert", "MetricValue", "Notification", "alert_labels", "fingerprint", "incident_key", "rfc3339"]

ALERT_NAMES = {
    AlertCondition.COLLAPSED: "MoEWatchLayerCollapsed",
    AlertCondition.WARNING: "MoEWatchLayerWarning",
    AlertCondition.DEAD_EXPERTS: "MoEWatchDeadExperts",
    AlertCondition.NONFINITE: "MoEWatchRouterNonFinite",
    AlertCondition.PROJECTED_COLLAPSE: "MoEWatchProjectedCollapse",
    AlertCondition.INVALID_IDS: "MoEWatchRouterInvalidIds",
}


def alert_labels(
    condition: AlertCondition, run: str, layer: int, module: str, severity: Severity
) -> dict[str, str]:
    """The identifying labels of an alert (Alertmanager's ``labels``; the fingerprint hashes them)."""
    return {
        "alertname": ALERT_NAMES[condition],
        "run": run,
        "layer": str(layer),
        "module": module,
        "condition": condition.value,
        "severity": severity.value,
    }


def incident_key(*parts: object, length: int) -> str:
    """A hex digest of ``parts`` for an incident or dedup key: the same parts give the same key."""
    return hashlib.sha256("\0".join(f"{p}" for p in parts).encode()).hexdigest()[:length]


def fingerprint(labels: dict[str, str]) -> str:
    """16 hex digits identifying a label set (like Alertmanager's fingerprint)."""
    text = "\xff".join(f"{k}\xfe{labels[k]}" for k in sorted(labels))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rfc3339(ts: float | None) -> str:
    """Alertmanager's time format; ``None`` is Go's zero time (an alert still firing)."""
    if ts is None:
        return "0001-01-01T00:00:00Z"
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class MetricValue:
    """One metric against its thresholds: warning when ``value warning_op warning``, collapsed when
    ``value collapsed_op collapsed``."""

    name: str
    value: float | None
    warning: float
    collapsed: float
    warning_op: str = ">="
    collapsed_op: str = ">"

    def describe(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.3g}"
        return (
            f"{self.name} {value} (warning {self.warning_op} {self.warning:g}, "
            f"collapsed {self.collapsed_op} {self.collapsed:g})"
        )


@dataclass(frozen=True)
class Alert:
    """One alert at one evaluation. ``status`` is ``firing`` or ``resolved``."""

    condition: AlertCondition
    severity: Severity
    status: str
    run: str
    layer: int
    module: str
    summary: str
    description: str
    starts_at: float
    ends_at: float | None
    step: int
    window: int
    fingerprint: str
    incident: str
    layer_state: str = ""
    reasons: tuple[str, ...] = ()
    metrics: tuple[MetricValue, ...] = ()
    dead_expert_ids: tuple[int, ...] = ()
    new_dead_expert_ids: tuple[int, ...] = ()
    nonfinite: int = 0
    invalid_ids: int = 0
    generator_url: str = ""

    @property
    def name(self) -> str:
        return ALERT_NAMES[self.condition]

    @property
    def dedup_key(self) -> str:
        """Stable for one incident (fire .. resolve) of this alert; a later incident gets a new one."""
        return f"moewatch-{self.fingerprint}-{self.incident}"

    @property
    def labels(self) -> dict[str, str]:
        return alert_labels(self.condition, self.run, self.layer, self.module, self.severity)

    @property
    def annotations(self) -> dict[str, str]:
        out = {"summary": self.summary, "description": self.description}
        if self.metrics:
            out["metrics"] = "; ".join(m.describe() for m in self.metrics)
        if self.dead_expert_ids:
            out["dead_expert_ids"] = ",".join(map(str, self.dead_expert_ids))
        return out


@dataclass(frozen=True)
class Notification:
    """Everything one evaluation has to say about one run: the group's firing alerts plus the ones that
    resolved now. ``changed`` holds the fingerprints that are new, updated or resolved in this evaluation;
    when it is empty the notification is a repeat of still-firing alerts."""

    run: str
    window: int
    step: int
    time: float
    alerts: tuple[Alert, ...]
    changed: frozenset[str] = field(default_factory=frozenset)
    grafana_url: str | None = None
    external_url: str | None = None
    test: bool = False
    incident: str = ""  # the receiving notifier's group incident (PagerDuty dedup_key), set by the sink

    @property
    def firing(self) -> list[Alert]:
        return [a for a in self.alerts if a.status == "firing"]

    @property
    def resolved(self) -> list[Alert]:
        return [a for a in self.alerts if a.status == "resolved"]

    @property
    def changed_alerts(self) -> list[Alert]:
        return [a for a in self.alerts if a.fingerprint in self.changed]

    @property
    def is_repeat(self) -> bool:
        return not self.changed

    @property
    def status(self) -> str:
        return "firing" if self.firing else "resolved"

    @property
    def group_key(self) -> str:
        return f'{{}}:{{run="{self.run}"}}'

    def only(self, conditions: list[AlertCondition] | set[AlertCondition]) -> Notification | None:
        """The part of this notification a notifier subscribed to ``conditions`` receives, or None."""
        wanted = set(conditions)
        alerts = tuple(a for a in self.alerts if a.condition in wanted)
        if not alerts:
            return None
        changed = frozenset(a.fingerprint for a in alerts if a.fingerprint in self.changed)
        if self.changed and not changed:
            return None  # nothing this notifier cares about changed, and it is not a repeat
        return replace(self, alerts=alerts, changed=changed)
