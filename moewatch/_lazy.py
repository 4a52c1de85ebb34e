"""PEP 562 lazy exports for package ``__init__`` files: importing one part of moewatch never loads the
others (``import moewatch.health`` must not pull in prometheus_client, requests or rich)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, names: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``names[attr]`` (a module path) on first use of ``attr`` and
    caches the value in the package ``namespace``."""

    def __getattr__(attr: str) -> Any:
        module = names.get(attr)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(module), attr)
        namespace[attr] = value
        return value

    return __getattr__
