"""Text helpers shared by the notifiers."""

from __future__ import annotations

from urllib.parse import urlsplit

from moewatch.alerting.model import Alert, Notification
from moewatch.alerting.settings import AlertCondition

__all__ = ["CONDITION_TITLES", "alert_line", "headline", "layer_ranges", "redacted_target", "truncate"]

CONDITION_TITLES = {
    AlertCondition.COLLAPSED: "collapsed",
    AlertCondition.WARNING: "drifting (warning)",
    AlertCondition.DEAD_EXPERTS: "dead experts",
    AlertCondition.NONFINITE: "non-finite router outputs",
    AlertCondition.PROJECTED_COLLAPSE: "heading for collapse",
    AlertCondition.INVALID_IDS: "invalid expert ids",
}


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def layer_ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out: list[str] = []
    xs = sorted(set(layers))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


def _by_condition(alerts: list[Alert]) -> dict[AlertCondition, list[Alert]]:
    out: dict[AlertCondition, list[Alert]] = {}
    for a in alerts:
        out.setdefault(a.condition, []).append(a)
    return out


def headline(n: Notification, limit: int = 1024) -> str:
    """One line: ``[FIRING:3] moewatch run-x step 300: layers 0-2 collapsed; layer 4 dead experts [1, 5]``."""
    if n.test:
        return truncate(f"[TEST] moewatch test notification for run {n.run}", limit)
    parts: list[str] = []
    firing = n.changed_alerts if not n.is_repeat else n.firing
    for cond, alerts in _by_condition([a for a in firing if a.status == "firing"]).items():
        layers = [a.layer for a in alerts]
        noun = "layer" if len(layers) == 1 else "layers"
        text = f"{noun} {layer_ranges(layers)} {CONDITION_TITLES[cond]}"
        if cond is AlertCondition.DEAD_EXPERTS:
            text += " " + ", ".join(f"L{a.layer}:{list(a.dead_expert_ids)}" for a in alerts)
        parts.append(text)
    resolved = [a for a in n.resolved]
    if resolved:
        parts.append("resolved: " + ", ".join(f"layer {a.layer} {a.condition.value}" for a in resolved))
    tag = f"[FIRING:{len(n.firing)}]" if n.firing else "[RESOLVED]"
    if n.is_repeat:
        tag += " (still firing)"
    return truncate(f"{tag} moewatch run {n.run} step {n.step}: " + "; ".join(parts), limit)


def alert_line(a: Alert) -> str:
    """Plain-text detail for one alert: metrics against thresholds, dead experts, non-finite count."""
    bits = [f"layer {a.layer} ({a.module}) {a.condition.value} [{a.severity.value}]"]
    if a.status == "resolved":
        bits.append("resolved")
    if a.reasons:
        bits.append("; ".join(a.reasons))
    if a.dead_expert_ids:
        bits.append(f"dead experts {list(a.dead_expert_ids)}")
    if a.nonfinite:
        bits.append(f"{a.nonfinite} non-finite router outputs")
    if a.invalid_ids:
        bits.append(f"{a.invalid_ids} expert ids outside [0, experts)")
    return " - ".join(bits)


def redacted_target(url: str) -> str:
    """``https://hooks.slack.com/<redacted>``: scheme and host only, safe to print."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/<redacted>"
