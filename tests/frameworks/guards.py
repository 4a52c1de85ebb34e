"""Test-side guard (not a framework replica): fail if moewatch's forward hooks call anything that makes the
host wait for the device (on CUDA), so the hot-path rules are checked on a CPU-only machine too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from torch.overrides import TorchFunctionMode

from moewatch.monitor import Monitor

__all__ = ["no_host_sync_in_hooks"]

#: Tensor functions that copy to the host or need device values to size their output.
_SYNCING = frozenset(
    {
        "item", "tolist", "cpu", "numpy", "nonzero", "argwhere", "masked_select", "bincount", "unique",
        "unique_consecutive", "__bool__", "__int__", "__float__", "__index__",
    }
)  # fmt: skip


class _NoHostSync(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in _SYNCING:
            raise AssertionError(f"moewatch hook called {name}(), a host synchronisation on CUDA")
        return func(*args, **(kwargs or {}))


def _guarded(hook: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        with _NoHostSync():
            return hook(*args)

    return run


@contextmanager
def no_host_sync_in_hooks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Monitors attached inside this block run their router hooks under the guard."""
    make_hook, make_stash = Monitor._make_hook, Monitor._make_stash
    monkeypatch.setattr(Monitor, "_make_hook", lambda self, i, spec: _guarded(make_hook(self, i, spec)))
    monkeypatch.setattr(Monitor, "_make_stash", staticmethod(lambda spec: _guarded(make_stash(spec))))
    yield
    monkeypatch.undo()
