"""Find the real ``torch.optim.Optimizer`` behind the wrappers training frameworks put around it.

accelerate's ``AcceleratedOptimizer`` keeps it in ``.optimizer``; DeepSpeed's engine exposes it as
``.optimizer`` and its ZeRO / fp16 wrappers keep the inner one in ``.optimizer`` too; Lightning's
``LightningOptimizer`` in ``._optimizer``. The step post-hook moewatch counts with must sit on the innermost
optimizer, the one whose ``step()`` runs once per real optimizer step (after gradient accumulation).
"""

from __future__ import annotations

from typing import Any

import torch

from moewatch.errors import ConfigError

__all__ = ["unwrap_optimizer"]

# Attribute names under which known wrappers keep the optimizer they wrap, tried in this order.
_INNER_ATTRS = ("optimizer", "_optimizer", "base_optimizer", "inner_optimizer", "optim")
_MAX_DEPTH = 8


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of ``optimizer`` (itself when it already is one).

    Raises ``ValueError`` naming the wrapper chain and the fix when no torch optimizer is found.
    """
    chain = [type(optimizer).__name__]
    current = optimizer
    for _ in range(_MAX_DEPTH):
        inner = _inner(current)
        # A torch optimizer that wraps another torch optimizer (ZeRO-style): keep going to the inner one,
        # whose step() is the one that runs.
        if isinstance(current, torch.optim.Optimizer) and not isinstance(inner, torch.optim.Optimizer):
            return current
        if inner is None or not _looks_like_optimizer(inner):
            break
        current = inner
        chain.append(type(current).__name__)
    if isinstance(current, torch.optim.Optimizer):
        return current
    raise ConfigError(
        f"moewatch: optimizer={' -> '.join(chain)} is not a torch.optim.Optimizer and wraps none moewatch can "
        f"find (looked in .{', .'.join(_INNER_ATTRS)}); pass the underlying torch optimizer "
        "(e.g. accelerate: opt.optimizer, DeepSpeed: engine.optimizer), or omit optimizer= and call "
        "watch.step() once per optimizer step"
    )


def _inner(obj: Any) -> Any:
    for attr in _INNER_ATTRS:
        inner = getattr(obj, attr, None)
        if inner is not None and inner is not obj:
            return inner
    return None


def _looks_like_optimizer(obj: Any) -> bool:
    return isinstance(obj, torch.optim.Optimizer) or callable(getattr(obj, "step", None))
