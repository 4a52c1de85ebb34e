"""What a user sees when moewatch cannot read a router: a :class:`RouterReadWarning` (shown by Python once
per router and call site) and a log record, both naming the router, its family and the error, plus the
``moewatch_hook_errors_total`` counter that the ``MoEWatchHookErrors`` alert rule watches."""

from __future__ import annotations

import logging
import warnings

from moewatch.adapters.base import RouterSpec

__all__ = ["RouterReadWarning", "report_router_failure"]

log = logging.getLogger(__name__)


class RouterReadWarning(RuntimeWarning):
    """moewatch's hook failed to read a router's output; that router is skipped from then on."""


def report_router_failure(spec: RouterSpec, exc: BaseException) -> None:
    """Called once per router, on its first failing call (the router is disabled after it)."""
    msg = (
        f"moewatch: reading router {spec.name!r} ({type(spec.module).__name__}, family {spec.family!r}) failed "
        f"and it is skipped from now on, so its layer is not watched: {type(exc).__name__}: {exc}. "
        "If this router family is not one moewatch reads, pass attach(..., routers=[...], extractor=fn) "
        "returning a moewatch.RouterOutput; strict=True raises instead."
    )
    log.warning("%s", msg)
    try:
        warnings.warn(msg, RouterReadWarning, stacklevel=2)
    except Warning:  # warnings turned into errors (-W error) must still not stop training
        pass
