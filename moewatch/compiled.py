"""torch.compile and hooks added after a compiled model has run.

Dynamo does not guard on module hooks by default (``torch._dynamo.config.skip_nnmodule_hook_guards``):
once a compiled frame of a model has run, hooks registered later are never called by it, and a monitor
attached then would count nothing. A frame's guards do not name the instance either: a frame compiled for
one model serves a fresh model of the same classes. :func:`refresh_compiled` finds such frames (the cache of
each module class's ``forward``, and ``_call_impl`` for ``module.compile()``); :mod:`moewatch.plain` makes
them miss for the watched model only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from types import CodeType

import torch
from torch import nn

__all__ = ["has_compiled_frames", "refresh_compiled"]

log = logging.getLogger(__name__)


def _cache_entries() -> Callable[[CodeType], list[object]] | None:
    try:  # private since torch 2.1 (dynamo's own tests use it); None if it moves
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return None
    return _debug_get_cache_entry_list


def has_compiled_frames(model: nn.Module) -> bool:
    """Whether torch.compile holds compiled code for a forward of ``model`` or of one of its modules, i.e.
    a compiled call of it has already run. When the private cache API is missing, a module compiled in
    place (``module.compile()``) counts as run."""
    entries = _cache_entries()
    in_place = any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    if entries is None:
        return in_place
    codes = {type(m).forward.__code__ for m in model.modules() if hasattr(type(m).forward, "__code__")}
    if in_place:
        codes.add(nn.Module._call_impl.__code__)
    return any(entries(code) for code in codes)


def _inlines_modules() -> bool:
    # Deprecated (always True) in newer torch, where reading it warns; gone later, hence the default.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return bool(getattr(torch._dynamo.config, "inline_inbuilt_nn_modules", True))


def refresh_compiled(model: nn.Module) -> bool:
    """Make sure compiled frames that ran before ``attach`` cannot serve ``model`` without its hooks.
    Returns whether torch.compile's caches were reset (process-wide).

    With dynamo inlining nn modules (``torch._dynamo.config.inline_inbuilt_nn_modules``, torch's default),
    nothing is reset: :mod:`moewatch.plain` gives each hooked module an instance ``forward``, which fails the
    ``'forward' not in module.__dict__`` guard of every frame traced before, for this model only. Such frames
    (this model's own, or another instance's of the same classes) recompile once on their next call with
    this model; other models keep their compiled code. Without inlining, dynamo specialises on module
    identity and rebuilds frames whose modules changed less reliably, so the caches are reset as before.
    A no-op when dynamo guards on hooks (it then recompiles by itself)."""
    if not torch._dynamo.config.skip_nnmodule_hook_guards or not has_compiled_frames(model):
        return False
    if _inlines_modules():
        log.info(
            "moewatch: %s's module classes have compiled frames in this process (of this model or of another "
            "instance); a frame that runs this model's routers recompiles once, for this model only, with the "
            "router hooks in the graph. Nothing is reset: other models keep their compiled code",
            type(model).__name__,
        )
        return False
    # torch.compiler.reset() is process-wide: every compiled function recompiles on its next call.
    torch.compiler.reset()
    log.warning(
        "moewatch: %s's module classes had run under torch.compile with "
        "torch._dynamo.config.inline_inbuilt_nn_modules=False, whose compiled graphs do not call hooks added "
        "later; moewatch reset torch.compile's caches (torch.compiler.reset(), every compiled function in the "
        "process recompiles once). Attach before the first compiled call to avoid it",
        type(model).__name__,
    )
    return True
