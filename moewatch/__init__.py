"""moewatch: router-health monitoring for Mixture-of-Experts training.

    import moewatch
    watch = moewatch.attach(model, optimizer=opt)   # finds every router, starts counting

Names are imported on first use (PEP 562), so ``import moewatch`` (and the ``moewatch`` command's
``--help``) does not pay for torch until something needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moewatch._lazy import lazy_exports
from moewatch._version import __version__

if TYPE_CHECKING:
    from moewatch.adapters.base import RouterInfo, RouterOutput
    from moewatch.adapters.discovery import NoRouterFoundError
    from moewatch.adapters.failures import RouterReadWarning
    from moewatch.agreement import LayerAgreement, RouteAgreement, decode_sglang_routes, route_agreement
    from moewatch.attaching import attach
    from moewatch.capture import RouteCapture, RouteCaptureError, RouteCaptureFullError
    from moewatch.config import MoEWatchConfig, Thresholds
    from moewatch.errors import ConfigError, MoEWatchError, UnreadableRouterError
    from moewatch.flush import StepMismatchError
    from moewatch.monitor import AlreadyAttachedError, Monitor
    from moewatch.report import HealthState, LayerReport, WindowReport
    from moewatch.resume import RouterMismatchError
    from moewatch.sinks.base import MonitorStats, Sink

_LAZY = {
    "RouterInfo": "moewatch.adapters.base",
    "RouterOutput": "moewatch.adapters.base",
    "LayerAgreement": "moewatch.agreement",
    "RouteAgreement": "moewatch.agreement",
    "decode_sglang_routes": "moewatch.agreement",
    "route_agreement": "moewatch.agreement",
    "NoRouterFoundError": "moewatch.adapters.discovery",
    "RouterReadWarning": "moewatch.adapters.failures",
    "attach": "moewatch.attaching",  # not moewatch.attach: importing that submodule would shadow the function
    "RouteCapture": "moewatch.capture",
    "RouteCaptureError": "moewatch.capture",
    "RouteCaptureFullError": "moewatch.capture",
    "ConfigError": "moewatch.errors",
    "MoEWatchError": "moewatch.errors",
    "UnreadableRouterError": "moewatch.errors",
    "StepMismatchError": "moewatch.flush",
    "MoEWatchConfig": "moewatch.config",
    "Thresholds": "moewatch.config",
    "AlreadyAttachedError": "moewatch.monitor",
    "Monitor": "moewatch.monitor",
    "HealthState": "moewatch.report",
    "LayerReport": "moewatch.report",
    "WindowReport": "moewatch.report",
    "RouterMismatchError": "moewatch.resume",
    "MonitorStats": "moewatch.sinks.base",
    "Sink": "moewatch.sinks.base",
}

__all__ = [
    "AlreadyAttachedError",
    "ConfigError",
    "HealthState",
    "LayerAgreement",
    "LayerReport",
    "MoEWatchConfig",
    "MoEWatchError",
    "Monitor",
    "MonitorStats",
    "NoRouterFoundError",
    "RouterInfo",
    "RouteAgreement",
    "RouteCapture",
    "RouteCaptureError",
    "RouteCaptureFullError",
    "RouterReadWarning",
    "RouterMismatchError",
    "RouterOutput",
    "Sink",
    "StepMismatchError",
    "Thresholds",
    "UnreadableRouterError",
    "WindowReport",
    "attach",
    "decode_sglang_routes",
    "route_agreement",
    "__version__",
]


__getattr__ = lazy_exports(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)
