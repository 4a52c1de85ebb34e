"""The sink contract: where window reports go, and the optional capabilities a sink may declare.

A leaf module: the monitor imports this and no sink implementation. Sinks never get a reference to the
monitor; what they need beyond the reports comes as arguments (:class:`MonitorStats`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from moewatch.report import WindowReport

__all__ = [
    "DELIVERY_OUTCOMES",
    "AlertSubscribable",
    "Checkpointable",
    "DeliveryReporter",
    "MonitorStats",
    "Sink",
    "StatsConsumer",
    "sink_name",
    "wants_rank_counts",
]


@runtime_checkable
class Sink(Protocol):
    """Receives every window report on the training thread; must return quickly and never raise for
    transient trouble (network, disk): log it and carry on. ``close`` releases resources.

    A sink may set a class attribute ``name`` (e.g. ``"prometheus"``): the stable key of its state in
    ``Monitor.state_dict()``, see :func:`sink_name`. A sink whose ``per_rank`` attribute is True gets, on
    every rank, a report of that rank's own counts instead of the group's (:func:`wants_rank_counts`)."""

    def emit(self, report: WindowReport) -> None: ...

    def close(self) -> None: ...


#: Delivery outcomes a :class:`DeliveryReporter` counts per target: sent, failed, retried, dropped (never
#: delivered: queue full, or left at close), coalesced (merged into a newer notification of its group).
DELIVERY_OUTCOMES = ("sent", "failed", "retried", "dropped", "coalesced")


@dataclass(frozen=True)
class MonitorStats:
    """What the monitor knows about itself, pushed to :class:`StatsConsumer` sinks whenever it changes:
    router hook errors so far and, per notifier, delivery outcomes (``sent``/``failed``/...)."""

    hook_errors: int = 0
    deliveries: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@runtime_checkable
class Checkpointable(Protocol):
    """A sink with state that a resumed run continues (alert incidents, for example)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class StatsConsumer(Protocol):
    """A sink that reports on the monitor itself (the Prometheus exporter). ``update_stats`` may be called
    from any thread (a delivery worker's counters change off the training thread)."""

    def update_stats(self, stats: MonitorStats) -> None: ...


@runtime_checkable
class DeliveryReporter(Protocol):
    """A sink that delivers somewhere and counts outcomes per target. ``on_delivery(callback)`` registers
    a callable it calls (from any thread, without arguments) when those counts change."""

    def delivery_stats(self) -> dict[str, dict[str, int]]: ...

    def on_delivery(self, callback: Callable[[], None]) -> None: ...


@runtime_checkable
class AlertSubscribable(Protocol):
    """A sink that evaluates alerts and can call user code for every alert that fires or resolves."""

    def add_alert_callback(self, callback: Callable[..., Any]) -> None: ...


def wants_rank_counts(sink: object) -> bool:
    """True for a sink that reports each rank's own counts (the exporter with ``prometheus.per_rank``)."""
    return getattr(sink, "per_rank", False) is True


def sink_name(sink: object) -> str:
    """The sink's stable name: its ``name`` attribute, or its class name."""
    name = getattr(sink, "name", None)
    return name if isinstance(name, str) and name else type(sink).__name__
