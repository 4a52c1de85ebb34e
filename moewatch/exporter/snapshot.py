"""What the exporter serves between two windows: the last report folded into an immutable
:class:`Snapshot` with the cumulative counters. ``fold`` runs on the training thread once per window; the
scrape thread reads one reference and never touches device tensors or the monitor's buffers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from moewatch.report import WindowReport

__all__ = ["Snapshot", "fold"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    report: WindowReport
    windows: int
    tokens: int
    layer_tokens: tuple[int, ...]
    expert_totals: tuple[tuple[int, ...], ...]
    expert_dead: tuple[frozenset[int], ...]


def fold(prev: Snapshot | None, report: WindowReport) -> Snapshot:
    same_shape = prev is not None and [len(t) for t in prev.expert_totals] == [
        len(layer.loads) for layer in report.layers
    ]
    if prev is None or not same_shape:
        if prev is not None:
            log.warning("moewatch: router set changed between windows; per-expert counters restart")
        return Snapshot(
            report=report,
            windows=(prev.windows if prev else 0) + 1,
            tokens=(prev.tokens if prev else 0) + report.tokens,
            layer_tokens=tuple(layer.tokens for layer in report.layers),
            expert_totals=tuple(tuple(layer.loads) for layer in report.layers),
            expert_dead=tuple(frozenset(layer.dead_expert_ids) for layer in report.layers),
        )
    return Snapshot(
        report=report,
        windows=prev.windows + 1,
        tokens=prev.tokens + report.tokens,
        layer_tokens=tuple(
            t + layer.tokens for t, layer in zip(prev.layer_tokens, report.layers, strict=True)
        ),
        expert_totals=tuple(
            tuple(a + b for a, b in zip(tot, layer.loads, strict=True))
            for tot, layer in zip(prev.expert_totals, report.layers, strict=True)
        ),
        expert_dead=tuple(frozenset(layer.dead_expert_ids) for layer in report.layers),
    )
