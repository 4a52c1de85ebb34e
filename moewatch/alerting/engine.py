"""The alert engine: Alertmanager's pending / firing / resolved model, evaluated once per window report.

One alert per (run, layer, condition). An alert whose condition holds becomes *pending*, *fires* once it
has held for ``for_windows`` windows, and *resolves* after ``resolve_windows`` consecutive clean windows.
Layers reported as ``insufficient_data`` are not evaluated at all: their alerts neither advance nor resolve
(a layer with non-finite outputs or invalid ids is never ``insufficient_data``, see :mod:`moewatch.health`).
A firing ``collapsed`` alert inhibits the ``warning`` alert of the same layer (Alertmanager's usual
critical-inhibits-warning rule); so do firing ``nonfinite`` and ``invalid_ids`` alerts, which make the
layer ``warning`` by themselves and say more precisely what is wrong. Every evaluation yields at most one :class:`Notification` with everything
that changed, or a repeat of what is still firing once ``repeat_interval`` has passed.

The engine is pure Python and cheap (a few dict operations per layer); it runs on the training thread so
that :meth:`state_dict` is always consistent with the reports seen so far.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any

from moewatch.alerting.model import Alert, MetricValue, Notification, alert_labels, fingerprint, incident_key
from moewatch.alerting.settings import AlertCondition, AlertsConfig
from moewatch.config import Thresholds
from moewatch.health import BOUNDS
from moewatch.report import HealthState, LayerReport, WindowReport

__all__ = ["AlertEngine"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1


@dataclass
class _Track:
    """Engine-side state of one alert (the JSON-able part of a checkpoint)."""

    layer: int
    condition: str
    run: str = ""  # kept from the report that opened the alert, so a renamed resumed run keeps its incident
    status: str = "pending"  # pending | firing
    active: int = 0  # consecutive windows the condition held
    clean: int = 0  # consecutive clean windows while firing
    fired_at: float | None = None
    fired_window: int | None = None
    incident: str = ""
    notified: bool = False
    notified_dead: list[int] = field(default_factory=list)
    module: str = ""
    state: str = ""
    reasons: list[str] = field(default_factory=list)
    metrics: list[MetricValue] = field(default_factory=list)
    dead_ids: list[int] = field(default_factory=list)
    nonfinite: int = 0
    invalid_ids: int = 0
    step: int = 0
    window: int = 0


def _metrics(layer: LayerReport, t: Thresholds) -> list[MetricValue]:
    return [
        MetricValue(b.metric, getattr(layer, b.metric), b.warning(t), b.collapsed(t), b.warning_op, b.collapsed_op)
        for b in BOUNDS
    ]


class AlertEngine:
    """Feed it every :class:`WindowReport`; it returns the notification to send, if any."""

    def __init__(self, config: AlertsConfig, thresholds: Thresholds | None = None) -> None:
        self.config = config
        self.thresholds = thresholds or Thresholds()
        self._tracks: dict[tuple[int, str], _Track] = {}
        self._last_notified: float | None = None

    # --- evaluation -------------------------------------------------------------------------------

    def _active(self, layer: LayerReport, cond: AlertCondition, step_end: int) -> bool:
        if cond is AlertCondition.COLLAPSED:
            return layer.state is HealthState.COLLAPSED
        if cond is AlertCondition.WARNING:
            # Degraded: a collapsed layer is also past warning; the collapsed alert inhibits it.
            return layer.state in (HealthState.WARNING, HealthState.COLLAPSED)
        if cond is AlertCondition.DEAD_EXPERTS:
            return len(layer.dead_expert_ids) >= self.config.dead_experts_min
        if cond is AlertCondition.NONFINITE:
            return layer.nonfinite > 0
        if cond is AlertCondition.INVALID_IDS:
            return layer.invalid_ids > 0
        if cond is AlertCondition.PROJECTED_COLLAPSE:
            step = layer.projected_collapse_step
            return step is not None and step - step_end <= self.config.projected_collapse_horizon_steps
        raise AssertionError(cond)

    def evaluate(self, report: WindowReport) -> Notification | None:
        cfg, now = self.config, report.time_end
        changed: set[tuple[int, str]] = set()
        resolved: list[Alert] = []
        for layer in report.layers:
            if layer.state is HealthState.INSUFFICIENT_DATA:
                continue
            metrics: list[MetricValue] | None = None
            for cond in cfg.conditions:
                key = (layer.index, cond.value)
                track = self._tracks.get(key)
                if self._active(layer, cond, report.step_end):
                    if track is None:
                        track = self._tracks[key] = _Track(layer.index, cond.value, run=report.run)
                    track.active += 1
                    track.clean = 0
                    metrics = metrics or _metrics(layer, self.thresholds)
                    self._observe(track, layer, report, metrics)
                    if track.status == "pending" and track.active >= cfg.for_windows:
                        self._fire(track, report)
                elif track is not None:
                    track.active = 0
                    if track.status == "pending":
                        del self._tracks[key]
                        continue
                    track.clean += 1
                    metrics = metrics or _metrics(layer, self.thresholds)
                    self._observe(track, layer, report, metrics)
                    if track.clean >= cfg.resolve_windows:
                        del self._tracks[key]
                        if track.notified:
                            resolved.append(self._snapshot(track, "resolved", ends_at=now))
                            changed.add(key)

        open_: list[tuple[_Track, tuple[int, ...]]] = []
        for key, track in sorted(self._tracks.items()):
            if track.status != "firing" or self._inhibited(track):
                continue
            new_dead: tuple[int, ...] = ()
            if not track.notified:
                track.notified = True
                new_dead = tuple(track.dead_ids)
                track.notified_dead = list(track.dead_ids)
                changed.add(key)
            elif track.condition == AlertCondition.DEAD_EXPERTS.value:
                new_dead = tuple(sorted(set(track.dead_ids) - set(track.notified_dead)))
                if new_dead:  # more experts died while the alert was firing: tell again
                    changed.add(key)
                track.notified_dead = sorted(set(track.notified_dead) | set(track.dead_ids))
            open_.append((track, new_dead))

        repeat_due = (
            bool(open_)
            and self._last_notified is not None
            and now - self._last_notified >= cfg.repeat_interval
        )
        if not changed and not repeat_due:
            return None
        self._last_notified = now
        firing = [self._snapshot(t, "firing", new_dead=nd) for t, nd in open_]
        alerts = tuple(firing + resolved)
        fps = frozenset(a.fingerprint for a in alerts if (a.layer, a.condition.value) in changed)
        return Notification(
            run=report.run,
            window=report.window,
            step=report.step_end,
            time=now,
            alerts=alerts,
            changed=fps,
            grafana_url=cfg.grafana_url,
            external_url=cfg.external_url or cfg.grafana_url,
        )

    _INHIBITS_WARNING = (AlertCondition.COLLAPSED, AlertCondition.NONFINITE, AlertCondition.INVALID_IDS)

    def _inhibited(self, track: _Track) -> bool:
        if track.condition != AlertCondition.WARNING.value:
            return False
        for cond in self._INHIBITS_WARNING:
            src = self._tracks.get((track.layer, cond.value))
            if src is not None and src.status == "firing":
                return True
        return False

    @staticmethod
    def _observe(track: _Track, layer: LayerReport, report: WindowReport, metrics: list[MetricValue]) -> None:
        track.module = layer.module
        track.state = layer.state.value
        track.reasons = list(layer.reasons)
        if track.condition == AlertCondition.PROJECTED_COLLAPSE.value and layer.projected_collapse_step is not None:
            track.reasons.insert(0, f"{layer.projected_collapse_metric} projected to reach its collapsed threshold at "
                                 f"step {layer.projected_collapse_step} ({layer.projected_collapse_step - report.step_end} "
                                 "steps ahead)")
        track.metrics = metrics
        track.dead_ids = list(layer.dead_expert_ids)
        track.nonfinite = layer.nonfinite
        track.invalid_ids = layer.invalid_ids
        track.step, track.window = report.step_end, report.window

    def _fire(self, track: _Track, report: WindowReport) -> None:
        track.status = "firing"
        track.fired_at = report.time_end
        track.fired_window = report.window
        track.incident = incident_key(
            report.run, track.layer, track.condition, report.window, report.time_end, length=12
        )
        log.debug("alert %s layer %d fired at window %d", track.condition, track.layer, report.window)

    # --- rendering ----------------------------------------------------------------------------------

    def _snapshot(
        self, track: _Track, status: str, ends_at: float | None = None, new_dead: tuple[int, ...] = ()
    ) -> Alert:
        cond = AlertCondition(track.condition)
        run = track.run
        severity = self.config.severity_of(cond)
        labels = alert_labels(cond, run, track.layer, track.module, severity)
        summary, description = self._texts(track, cond, status)
        assert track.fired_at is not None
        return Alert(
            condition=cond,
            severity=severity,
            status=status,
            run=run,
            layer=track.layer,
            module=track.module,
            summary=summary,
            description=description,
            starts_at=track.fired_at,
            ends_at=ends_at,
            step=track.step,
            window=track.window,
            fingerprint=fingerprint(labels),
            incident=track.incident,
            layer_state=track.state,
            reasons=tuple(track.reasons),
            metrics=tuple(track.metrics),
            dead_expert_ids=tuple(track.dead_ids),
            new_dead_expert_ids=new_dead,
            nonfinite=track.nonfinite,
            invalid_ids=track.invalid_ids,
            generator_url=self._link(run, track.layer, track.fired_at, ends_at),
        )

    @staticmethod
    def _texts(track: _Track, cond: AlertCondition, status: str) -> tuple[str, str]:
        where = f"layer {track.layer} ({track.module})"
        if status == "resolved":
            summary = f"{where} recovered from {cond.value.replace('_', ' ')}"
        elif cond is AlertCondition.COLLAPSED:
            summary = f"{where} router collapsed"
        elif cond is AlertCondition.WARNING:
            summary = f"{where} router load is drifting (warning)"
        elif cond is AlertCondition.DEAD_EXPERTS:
            summary = f"{where}: {len(track.dead_ids)} dead experts {track.dead_ids}"
        elif cond is AlertCondition.INVALID_IDS:
            summary = f"{where}: {track.invalid_ids} expert ids out of range (broken router or adapter)"
        elif cond is AlertCondition.NONFINITE:
            summary = f"{where}: {track.nonfinite} non-finite router outputs"
        else:
            summary = f"{where} router heading for collapse"
        detail = "; ".join(track.reasons) if track.reasons else f"layer state {track.state}"
        description = f"{summary}. {detail}. Step {track.step}, window {track.window}."
        return summary, description

    def _link(self, run: str, layer: int, start: float, end: float | None) -> str:
        """The layer dashboard (``/d/moewatch-layer``) around the incident; a URL that already names a
        dashboard (``/d/...``) is used as it is."""
        base = self.config.grafana_url
        if not base:
            return ""
        base = base.rstrip("/")
        if "/d/" not in base:
            base += "/d/moewatch-layer"
        query = {
            "var-run": run,
            "var-layer": str(layer),
            "from": str(int((start - 3600) * 1000)),
            "to": str(int(end * 1000)) if end is not None else "now",
        }
        sep = "&" if "?" in base else "?"
        return base + sep + urllib.parse.urlencode(query)

    # --- checkpointing ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "last_notified": self._last_notified,
            "tracks": [asdict(t) for t in self._tracks.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            log.warning("moewatch: ignoring alert state of unknown version %r", state.get("version"))
            return
        self._last_notified = state.get("last_notified")
        self._tracks = {}
        for raw in state.get("tracks", []):
            t = _Track(**raw)
            t.metrics = [MetricValue(**m) for m in raw.get("metrics", [])]
            self._tracks[(t.layer, t.condition)] = t

    @property
    def firing(self) -> list[tuple[int, str]]:
        """(layer, condition) of every firing alert."""
        return sorted(k for k, t in self._tracks.items() if t.status == "firing")
