"""The lazily loaded public API stays what it says, whatever submodules were imported first."""

from __future__ import annotations

import importlib
import pkgutil
import types

import moewatch


def test_public_names_are_not_shadowed_by_submodules():
    for info in pkgutil.walk_packages(moewatch.__path__, "moewatch."):
        if ".integrations." in info.name or info.name.endswith("__main__"):
            continue  # optional third-party imports; covered by their own tests
        importlib.import_module(info.name)
    for name in moewatch.__all__:
        value = getattr(moewatch, name)
        assert not isinstance(value, types.ModuleType), f"moewatch.{name} is the module {value.__name__}"
    assert callable(moewatch.attach) and moewatch.attach.__module__ == "moewatch.attaching"


def test_every_exception_moewatch_defines_derives_from_moewatch_error():
    found = []
    for info in pkgutil.walk_packages(moewatch.__path__, "moewatch."):
        if ".integrations." in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Exception)
                and not issubclass(value, Warning)
                and value.__module__ == module.__name__
            ):
                found.append(value)
    assert len(found) >= 7, found  # ConfigError, AlreadyAttached, NoRouterFound, RouterMismatch, StepMismatch...
    assert [e.__name__ for e in found if not issubclass(e, moewatch.MoEWatchError)] == []
