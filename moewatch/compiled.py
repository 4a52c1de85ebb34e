"""torch.compile and hooks added after a compiled model has run.

Dynamo does not guard on module hooks by default (``torch._dynamo.config.skip_nnmodule_hook_guards``):
once a compiled frame of a model has run, hooks registered later are never called by it, and a monitor
attached then would count nothing. :func:`refresh_compiled` finds such frames among the model's modules
(the cache of each module class's ``forward``, and ``_call_impl`` for ``module.compile()``) and resets
torch.compile's caches, so that the next call recompiles with the hooks in the graph.
"""

from __future__ import annotations

import logging
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


def refresh_compiled(model: nn.Module) -> bool:
    """Reset torch.compile's caches when ``model`` has compiled frames that would not call hooks added
    now. Returns whether it did. A no-op when dynamo guards on hooks (it then recompiles by itself)."""
    if not torch._dynamo.config.skip_nnmodule_hook_guards or not has_compiled_frames(model):
        return False
    # torch.compiler.reset() is process-wide: every compiled function recompiles on its next call. Dynamo has
    # no public per-model reset, and resetting only the forward's code would leave the resume functions of a
    # graph break running their old graphs without the hooks.
    torch.compiler.reset()
    log.warning(
        "moewatch: %s had already run under torch.compile, whose compiled graphs do not call hooks added "
        "later; moewatch reset torch.compile's caches (torch.compiler.reset()), so the next call recompiles "
        "(once) with the router hooks. Attach before the first compiled call to avoid the recompile",
        type(model).__name__,
    )
    return True
