"""The sink protocol: where window reports go."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from moewatch.report import WindowReport

__all__ = ["Sink"]


@runtime_checkable
class Sink(Protocol):
    """Receives every window report on the training thread; must return quickly and never raise for
    transient trouble (network, disk): log it and carry on. ``close`` releases resources."""

    def emit(self, report: WindowReport) -> None: ...

    def close(self) -> None: ...
