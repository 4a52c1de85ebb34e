"""Slack incoming webhooks: ``text`` (fallback, notifications) plus ``blocks`` (the message itself).

Limits respected: header text 150 chars, section text 3000 chars, 50 blocks per message.
"""

from __future__ import annotations

from collections.abc import Iterable

from moewatch.alerting.delivery import HttpRequest
from moewatch.alerting.model import Alert, Notification
from moewatch.alerting.notifiers.common import (
    CONDITION_TITLES,
    headline,
    layer_ranges,
    redacted_target,
    truncate,
)
from moewatch.alerting.settings import AlertCondition, Severity

__all__ = ["SlackNotifier", "slack_payload"]

_SECTION_CHARS = 2900
_MAX_BLOCKS = 48
_MAX_LINES_PER_CONDITION = 20
_OPS = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}
_EMOJI = {
    Severity.CRITICAL: ":rotating_light:",
    Severity.ERROR: ":red_circle:",
    Severity.WARNING: ":warning:",
    Severity.INFO: ":information_source:",
}


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _section(text: str) -> dict[str, object]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": truncate(text, 3000)}}


def _chunks(header: str, lines: Iterable[str]) -> list[str]:
    """Pack ``header`` and ``lines`` into section texts under the Slack limit."""
    out, cur = [], header
    for line in lines:
        if len(cur) + len(line) + 1 > _SECTION_CHARS:
            out.append(cur)
            cur = line
        else:
            cur = f"{cur}\n{line}" if cur else line
    if cur:
        out.append(cur)
    return out


def _detail(a: Alert) -> str:
    bits = [f"• *layer {a.layer}* `{_esc(a.module)}`"]
    if a.status == "resolved":
        bits.append("recovered" + (f" (now: {_esc('; '.join(a.reasons))})" if a.reasons else ""))
    elif a.condition is AlertCondition.DEAD_EXPERTS:
        new = set(a.new_dead_expert_ids)
        ids = ", ".join(f"*{i}*" if i in new and new != set(a.dead_expert_ids) else str(i) for i in a.dead_expert_ids)
        bits.append(f"{len(a.dead_expert_ids)} dead experts: [{ids}]" + (" (new in bold)" if "*" in ids else ""))
    elif a.condition is AlertCondition.NONFINITE:
        bits.append(f"{a.nonfinite} non-finite router outputs")
    else:
        if a.reasons:
            bits.append(_esc("; ".join(a.reasons)))
        if a.dead_expert_ids:
            bits.append(f"dead experts {list(a.dead_expert_ids)}")
    return " — ".join(bits)


def _group_blocks(title: str, alerts: list[Alert]) -> list[dict[str, object]]:
    by_cond: dict[AlertCondition, list[Alert]] = {}
    for a in alerts:
        by_cond.setdefault(a.condition, []).append(a)
    blocks: list[dict[str, object]] = []
    for cond, group in by_cond.items():
        sev = group[0].severity
        layers = [a.layer for a in group]
        head = (
            f"{_EMOJI[sev] if title != 'Resolved' else ':white_check_mark:'} *{title}: "
            f"{CONDITION_TITLES[cond]}* ({sev.value}) — layer{'s' if len(layers) > 1 else ''} {layer_ranges(layers)}"
        )
        lines = [_detail(a) for a in group[:_MAX_LINES_PER_CONDITION]]
        if len(group) > _MAX_LINES_PER_CONDITION:
            lines.append(f"… and {len(group) - _MAX_LINES_PER_CONDITION} more layers")
        blocks.extend(_section(t) for t in _chunks(head, lines))
    return blocks


def _thresholds_line(alerts: list[Alert]) -> str | None:
    for a in alerts:
        if a.metrics:
            return "Thresholds: " + ", ".join(
                f"{m.name} warning {_OPS[m.warning_op]} {m.warning:g} / collapsed {_OPS[m.collapsed_op]} "
                f"{m.collapsed:g}"
                for m in a.metrics
            )
    return None


def slack_payload(n: Notification) -> dict[str, object]:
    text = headline(n, limit=3000)
    if n.test:
        return {
            "text": text,
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": "moewatch test notification"}},
                _section(f"This is a test from `moewatch alert-test` for run `{_esc(n.run)}`. Alerts will arrive here."),
            ],
        }
    firing_new = [a for a in n.changed_alerts if a.status == "firing"]
    still = [a for a in n.firing if a.fingerprint not in n.changed]
    resolved = n.resolved
    worst = min((a.severity for a in n.firing), key=list(Severity).index, default=None)
    if n.firing:
        title = f"{_EMOJI[worst] if worst else ''} moewatch: {len(n.firing)} alert{'s' if len(n.firing) != 1 else ''} firing"
        if resolved:
            title += f", {len(resolved)} resolved"
    else:
        title = f":white_check_mark: moewatch: {len(resolved)} alert{'s' if len(resolved) != 1 else ''} resolved"
    blocks: list[dict[str, object]] = [
        {"type": "header", "text": {"type": "plain_text", "text": truncate(title, 150), "emoji": True}},
        _section(f"*Run* `{_esc(n.run)}` · *step* {n.step} · *window* {n.window}"
                 + (" · _repeat: still firing_" if n.is_repeat else "")),
    ]
    blocks += _group_blocks("Firing", firing_new)
    if still:
        blocks += _group_blocks("Still firing", still)
    blocks += _group_blocks("Resolved", resolved)
    context: list[str] = []
    thr = _thresholds_line(firing_new or still)
    if thr:
        context.append(thr)
    if n.grafana_url:
        link = next((a.generator_url for a in n.alerts if a.generator_url), n.grafana_url)
        context.append(f"<{link}|Open in Grafana>")
    if len(blocks) > _MAX_BLOCKS:
        omitted = len(blocks) - _MAX_BLOCKS
        blocks = blocks[:_MAX_BLOCKS] + [_section(f"… {omitted} more sections omitted")]
    if context:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": truncate(c, 3000)} for c in context]})
    return {"text": text, "blocks": blocks}


class SlackNotifier:
    """Posts one message per notification to a Slack incoming webhook."""

    name = "slack"

    def __init__(self, url: str, conditions: Iterable[AlertCondition], min_interval: float = 1.0) -> None:
        self._url = url
        self.conditions = frozenset(conditions)
        self.min_interval = min_interval

    def render(self, notification: Notification) -> list[HttpRequest]:
        return [HttpRequest(self._url, slack_payload(notification), label="test" if notification.test else f"window {notification.window}")]

    def secrets(self) -> list[str]:
        return [self._url]

    def target(self) -> str:
        return redacted_target(self._url)

    def __repr__(self) -> str:
        return f"SlackNotifier(url={self.target()!r})"
