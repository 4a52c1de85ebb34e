"""One rule for every test that needs something outside Python's stdlib: a missing tool or package skips
the test locally, with the reason and the fix, and fails it under ``CI=true``, where .ci/run installs it."""

from __future__ import annotations

import importlib
import os
import types
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(msg: str) -> NoReturn:
    if in_ci():
        pytest.fail(msg + "; CI=true so this is a failure, not a skip")
    pytest.skip(msg)


def require_module(name: str, hint: str) -> types.ModuleType:
    """Import ``name``, or :func:`missing` with ``hint`` (how to install it)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install raising anything at import time
        missing(f"{name} is not importable ({type(exc).__name__}: {exc}); {hint}")
