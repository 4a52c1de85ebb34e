"""moewatch: router-health monitoring for Mixture-of-Experts training.

    import moewatch
    watch = moewatch.attach(model, optimizer=opt)   # finds every router, starts counting
"""

from moewatch.adapters.base import RouterInfo, RouterOutput
from moewatch.adapters.discovery import NoRouterFoundError
from moewatch.attach import attach
from moewatch.config import ConfigError, MoEWatchConfig, Thresholds
from moewatch.monitor import AlreadyAttachedError, Monitor
from moewatch.report import HealthState, LayerReport, WindowReport
from moewatch.resume import RouterMismatchError
from moewatch.sinks.base import Sink

__version__ = "0.1.0"

__all__ = [
    "AlreadyAttachedError",
    "ConfigError",
    "HealthState",
    "LayerReport",
    "MoEWatchConfig",
    "Monitor",
    "NoRouterFoundError",
    "RouterInfo",
    "RouterMismatchError",
    "RouterOutput",
    "Sink",
    "Thresholds",
    "WindowReport",
    "attach",
    "__version__",
]
