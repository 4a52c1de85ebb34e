"""A watched model stays a plain model: copies and pickles carry no moewatch hook, and compiled frames of
other instances are never reused for a watched one.

Each module moewatch hooks gets two instance attributes while it is watched, both removed by ``close()``:

* ``__reduce_ex__``: ``copy.deepcopy``, ``copy.copy``, ``pickle`` and ``torch.save`` look it up on the
  instance. It reduces the module as its class would, minus moewatch's hooks (marked with
  :data:`HOOK_MARK`) and these two attributes: a copy or a pickle is an unwatched plain module (hooks of
  other libraries are kept), so a deep-copied reference model (TRL's ``create_reference_model``) counts
  nothing into the policy's monitor.
* ``forward``: the class's own ``forward`` bound to the module, so calls behave exactly as before. Dynamo
  guards every module it inlines on ``'forward' not in module.__dict__``; with the attribute, a compiled
  frame traced for another instance of the same class (which never saw this module's hooks) fails its
  guards for this module, and so does a frame of this module compiled before ``attach``. Those frames
  recompile once, for this model only, with the hooks in the graph; other models keep their compiled code,
  and nothing calls ``torch.compiler.reset()``. After ``close()`` the attribute is gone and the frames
  compiled without hooks serve the model again.
"""

from __future__ import annotations

import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["HOOK_MARK", "mark_hook", "release", "watch_module"]

HOOK_MARK = "_moewatch_hook"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_KWARG_DICTS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")

F = TypeVar("F", bound=Callable[..., Any])


def mark_hook(fn: F) -> F:
    """Mark ``fn`` as a moewatch hook (a function attribute: the call itself costs nothing more)."""
    setattr(fn, HOOK_MARK, True)
    return fn


def _is_ours(hook: Any) -> bool:
    return bool(getattr(hook, HOOK_MARK, False))


class _PlainReduce:
    """The instance ``__reduce_ex__`` of a watched module: its class's reduction, without moewatch."""

    __slots__ = ("_ref",)

    def __init__(self, module: nn.Module) -> None:
        self._ref = weakref.ref(module)

    def __call__(self, protocol: int) -> Any:
        module = self._ref()
        if module is None:  # unreachable while the module is being copied; kept for a clear error
            raise RuntimeError("moewatch: the module of this reducer is gone")
        rv = type(module).__reduce_ex__(module, protocol)
        if not isinstance(rv, tuple) or len(rv) < 3:
            return rv
        state = rv[2]
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = (_plain_state(module, state[0]), state[1])
        elif isinstance(state, dict):
            state = _plain_state(module, state)
        return (*rv[:2], state, *rv[3:])


def _plain_state(module: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    if isinstance(out.get("__reduce_ex__"), _PlainReduce):
        del out["__reduce_ex__"]
    own = out.pop("_moewatch_forward", None)
    if own is not None and out.get("forward") is own:
        del out["forward"]
    dropped: set[int] = set()
    for name in _HOOK_DICTS:
        hooks = out.get(name)
        if isinstance(hooks, dict) and any(_is_ours(h) for h in hooks.values()):
            dropped.update(k for k, h in hooks.items() if _is_ours(h))
            out[name] = OrderedDict((k, h) for k, h in hooks.items() if not _is_ours(h))
    for name in _KWARG_DICTS:
        d = out.get(name)
        if dropped and isinstance(d, dict) and dropped & d.keys():
            out[name] = OrderedDict((k, v) for k, v in d.items() if k not in dropped)
    return out


def watch_module(module: nn.Module, *, forward: bool = True) -> None:
    """Give ``module`` the two instance attributes (idempotent). ``forward=False`` for the root's pre-hook
    only: the root's own compiled frames are not the ones that trace router hooks."""
    d = module.__dict__
    if "__reduce_ex__" not in d:  # ours already, or a user's own instance reducer: left as it is
        object.__setattr__(module, "__reduce_ex__", _PlainReduce(module))
    cls_forward = getattr(type(module), "forward", None)
    if forward and "forward" not in d and isinstance(cls_forward, types.FunctionType):
        # An instance forward set by someone else (accelerate's hooks) is left alone: it already makes
        # dynamo's guards instance-specific.
        bound = types.MethodType(cls_forward, module)
        object.__setattr__(module, "forward", bound)
        object.__setattr__(module, "_moewatch_forward", bound)


def release(module: nn.Module) -> None:
    """Remove the attributes once no moewatch hook is left on ``module`` (another monitor may still own
    one on a shared module)."""
    if any(_is_ours(h) for name in _HOOK_DICTS for h in getattr(module, name, {}).values()):
        return
    d = module.__dict__
    if isinstance(d.get("__reduce_ex__"), _PlainReduce):
        del d["__reduce_ex__"]
    own = d.pop("_moewatch_forward", None)
    if own is not None and d.get("forward") is own:
        del d["forward"]
