"""Router adapters: find every router in a model (:func:`discover_routers`) and read each call's output
into a :class:`RouterOutput` for the accumulator. Families are recognised by structure, see ``families``."""

from moewatch.adapters.base import RouterInfo, RouterOutput, RouterSpec, ScoreFunc
from moewatch.adapters.discovery import NoRouterFoundError, discover_routers
from moewatch.adapters.failures import RouterReadWarning

__all__ = ["NoRouterFoundError", "RouterInfo", "RouterOutput", "RouterReadWarning", "RouterSpec", "ScoreFunc", "discover_routers"]
