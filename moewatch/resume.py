"""What a resumed run needs to continue its history: cumulative per-expert counts, per-expert dead streaks
(windows since the expert last got a token), and the router signature a saved state belongs to."""

from __future__ import annotations

from typing import Any

import numpy as np

from moewatch.adapters.base import RouterInfo
from moewatch.errors import MoEWatchError
from moewatch.report import WindowReport

__all__ = ["RouterHistory", "RouterMismatchError", "router_signature", "signature_difference"]

STATE_VERSION = 2


class RouterMismatchError(MoEWatchError, ValueError):
    """A saved monitor state belongs to a model with other routers."""


def router_signature(routers: list[RouterInfo]) -> list[dict[str, Any]]:
    return [{"module": r.module, "num_experts": r.num_experts, "top_k": r.top_k} for r in routers]


def signature_difference(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> str | None:
    """A one-line description of the first way ``saved`` and ``current`` differ, or None when they match."""
    if len(saved) != len(current):
        return f"the saved state has {len(saved)} routers, this model has {len(current)}"
    for i, (a, b) in enumerate(zip(saved, current, strict=True)):
        if a.get("module") != b["module"]:
            return f"router {i} is {a.get('module')!r} in the saved state, {b['module']!r} in this model"
        if int(a.get("num_experts", -1)) != b["num_experts"]:
            return (
                f"router {i} ({b['module']}) has {a.get('num_experts')} experts in the saved state, "
                f"{b['num_experts']} in this model"
            )
        if int(a.get("top_k", -1)) != b["top_k"]:
            return f"router {i} ({b['module']}) has top_k={a.get('top_k')} in the saved state, {b['top_k']} here"
    return None


class RouterHistory:
    """Cumulative counts and per-expert idle windows (``dead_streaks``: windows since the expert last got
    a token; a window in which the router routed nothing at all does not count), updated on the host from
    each window report (never on the device, never on the hot path). The one owner of both: reports get
    ``idle_windows`` from here.

    Legend: L = layers (routers), E = experts of a layer (layers may differ, so these are lists of arrays).
    """

    def __init__(self, routers: list[RouterInfo]) -> None:
        self.cumulative_LE = [np.zeros(r.num_experts, dtype=np.int64) for r in routers]
        self.dead_streak_LE = [np.zeros(r.num_experts, dtype=np.int64) for r in routers]
        self.windows = 0

    def update(self, report: WindowReport) -> WindowReport:
        """Fold ``report`` in; returns it with each layer's ``idle_windows``."""
        layers = []
        for layer, cum_E, streak_E in zip(report.layers, self.cumulative_LE, self.dead_streak_LE, strict=True):
            loads_E = np.asarray(layer.loads, dtype=np.int64)
            cum_E += loads_E
            if layer.assignments > 0:
                streak_E[:] = np.where(loads_E > 0, 0, streak_E + 1)
            layers.append(layer.model_copy(update={"idle_windows": streak_E.tolist()}))
        self.windows += 1
        return report.model_copy(update={"layers": layers})

    def state_dict(self) -> dict[str, Any]:
        return {
            "cumulative": [c.tolist() for c in self.cumulative_LE],
            "dead_streaks": [s.tolist() for s in self.dead_streak_LE],
            "windows": self.windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what matches by position and width; anything else starts from zero (only reached when the
        caller accepted a router mismatch)."""
        for dst, src in ((self.cumulative_LE, state.get("cumulative", [])),
                         (self.dead_streak_LE, state.get("dead_streaks", []))):
            for i, arr_E in enumerate(dst):
                values = src[i] if i < len(src) else None
                arr_E[:] = values if values is not None and len(values) == arr_E.size else 0
        self.windows = int(state.get("windows", 0))
