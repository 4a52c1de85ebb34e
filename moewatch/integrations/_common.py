"""What the framework callbacks share: flattening a window report into log keys, and the rollback trigger."""

from __future__ import annotations

from typing import Any

from moewatch.config import MoEWatchConfig
from moewatch.report import STATE_VALUES, HealthState, WindowReport

__all__ = ["DegradeTrigger", "STATE_FILE", "CallbackBase", "log_keys"]

STATE_FILE = "moewatch_state.pt"
LAYER_METRICS = ("load_cov", "dead_experts", "top2_share", "norm_entropy", "max_violation", "effective_experts")


def _state_value(state: HealthState) -> int:
    return STATE_VALUES[state]  # -1: insufficient data


def log_keys(report: WindowReport, prefix: str = "moewatch") -> dict[str, float]:
    """``{prefix}/layer_03/load_cov``-style scalars for a trainer's own logs (TensorBoard, W&B, MLflow...).
    Layers are numbered by ``LayerReport.index``, zero-padded to two digits; ``None`` metrics are left out."""
    keys: dict[str, float] = {
        f"{prefix}/window": float(report.window),
        f"{prefix}/state": float(_state_value(report.state)),
        f"{prefix}/dead_experts": float(sum(layer.dead_experts for layer in report.layers)),
    }
    for layer in report.layers:
        base = f"{prefix}/layer_{layer.index:02d}"
        for name in LAYER_METRICS:
            value = getattr(layer, name)
            if value is not None:
                keys[f"{base}/{name}"] = float(value)
        keys[f"{base}/state"] = float(_state_value(layer.state))
    return keys


class DegradeTrigger:
    """True once: the first window in which some layer that was healthy in an earlier window is warning or
    collapsed, or some layer is collapsed for the first time (a run that collapses inside its first window
    had no healthy window to compare with; its first window end is the earliest rollback point there is).

    A warning with no healthy window before it (an untrained router's warm-up) does not count; windows with
    insufficient data change nothing. Resumed runs carry ``fired`` in the callback state, so a rollback point is requested
    once per run, not once per restart.
    """

    def __init__(self) -> None:
        self.healthy_seen: set[int] = set()
        self.fired = False

    def update(self, report: WindowReport) -> bool:
        if self.fired:
            return False
        bad = {HealthState.WARNING, HealthState.COLLAPSED}
        degraded = any(
            layer.state is HealthState.COLLAPSED or (layer.state in bad and layer.index in self.healthy_seen)
            for layer in report.layers
        )
        self.healthy_seen |= {layer.index for layer in report.layers if layer.state == HealthState.HEALTHY}
        if degraded:
            self.fired = True
        return degraded

    def state_dict(self) -> dict[str, object]:
        return {"healthy_seen": sorted(self.healthy_seen), "fired": self.fired}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.healthy_seen = {int(i) for i in state.get("healthy_seen", [])}  # type: ignore[union-attr]
        self.fired = bool(state.get("fired", False))


class CallbackBase:
    """What both framework callbacks take and hold (their docstrings say what differs: how a rollback
    checkpoint is saved).

    Args:
        config: a :class:`MoEWatchConfig` (default: from ``MOEWATCH_*`` environment variables).
        save_on_degrade: save one rollback checkpoint per run, the first time a layer that was healthy is
            warning or collapsed, or a layer is collapsed for the first time (dead experts are not revived
            by training on from a later checkpoint).
        log_prefix: prefix of the keys added to the trainer's logs.
        **overrides: top-level config fields, as for :func:`moewatch.attach` (``window_steps=50``).
    """

    def _init_common(
        self, config: MoEWatchConfig | None, save_on_degrade: bool, log_prefix: str, overrides: dict[str, Any]
    ) -> None:
        self.config = config
        self.overrides = overrides
        self.save_on_degrade = save_on_degrade
        self.log_prefix = log_prefix
        self.trigger = DegradeTrigger()
        self._seen: WindowReport | None = None  # last report handled
