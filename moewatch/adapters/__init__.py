"""Router adapters: find every router in a model (:func:`discover_routers`) and read each call's output
into a :class:`RouterOutput` for the accumulator. Families are recognised by structure, see ``families``.
Names load on first use, so the accumulator importing ``adapters.base`` does not load the families."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moewatch._lazy import lazy_exports

if TYPE_CHECKING:
    from moewatch.adapters.base import RouterInfo, RouterOutput, RouterSpec, ScoreFunc
    from moewatch.adapters.discovery import NoRouterFoundError, discover_routers
    from moewatch.adapters.failures import RouterReadWarning

__all__ = [
    "NoRouterFoundError",
    "RouterInfo",
    "RouterOutput",
    "RouterReadWarning",
    "RouterSpec",
    "ScoreFunc",
    "discover_routers",
]

__getattr__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(("RouterInfo", "RouterOutput", "RouterSpec", "ScoreFunc"), "moewatch.adapters.base"),
        **dict.fromkeys(("NoRouterFoundError", "discover_routers"), "moewatch.adapters.discovery"),
        "RouterReadWarning": "moewatch.adapters.failures",
    },
    globals(),
)
