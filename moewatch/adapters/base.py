"""What an adapter hands to the accumulator, and what discovery found.

Shape legend: ``T`` tokens in one forward call, ``E`` experts, ``K`` experts chosen per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["RouterInfo", "RouterOutput", "RouterSpec", "ScoreFunc", "find_int_attr", "map_choices"]

ScoreFunc = Literal["softmax", "sigmoid"]


@dataclass(frozen=True, slots=True)
class RouterOutput:
    """One router call, as moewatch reads it. Give ``indices_TK``, ``routing_map_TE``, or ``counts_E``
    with ``num_tokens``; optionally ``logits_TE`` (probabilities are derived with ``score_func``) or ready
    ``probs_TE``, or ``logits_fn`` when the logits cost work to get: it is called only on the calls that
    sample the probabilities (``probs_every``)."""

    indices_TK: torch.Tensor | None = None
    routing_map_TE: torch.Tensor | None = None
    #: Assignments per expert of this call (DeepSpeed's ``exp_counts``); needs ``num_tokens``.
    counts_E: torch.Tensor | None = None
    num_tokens: int | None = None
    logits_TE: torch.Tensor | None = None
    probs_TE: torch.Tensor | None = None
    score_func: ScoreFunc = "softmax"
    #: Assignments the framework dropped for capacity (a 0-dim tensor), when it reports them.
    dropped: torch.Tensor | None = None
    #: Computes ``logits_TE`` on demand (for example recomputed from the router's input and weight).
    logits_fn: Callable[[], torch.Tensor | None] | None = None
    #: The per-token choice ``[T, K]`` (-1 for an empty slot), for calls that give only ``counts_E``; called
    #: only by ``capture_routes``.
    choice_fn: Callable[[], torch.Tensor] | None = None


@dataclass(frozen=True, slots=True)
class RouterInfo:
    """A router moewatch found: ``Monitor.routers`` lists these in layer order."""

    index: int
    module: str
    family: str
    num_experts: int
    top_k: int
    score_func: ScoreFunc = "softmax"


Extract = Callable[[nn.Module, tuple[Any, ...], Any], RouterOutput]


@dataclass(slots=True)
class RouterSpec:
    """Internal: how to hook one router. ``hook_module`` may be a child of the router (DeepSpeed's ``wg``)."""

    name: str
    module: nn.Module
    hook_module: nn.Module
    family: str
    num_experts: int
    top_k: int
    extract: Extract
    score_func: ScoreFunc = "softmax"
    extra: dict[str, Any] = field(default_factory=dict)

    def info(self, index: int) -> RouterInfo:
        return RouterInfo(index, self.name, self.family, self.num_experts, self.top_k, self.score_func)


def find_int_attr(objs: list[Any], names: tuple[str, ...]) -> int | None:
    """First positive int found under any of ``names`` on any of ``objs`` (or their ``config``/``args``)."""
    for obj in objs:
        if obj is None:
            continue
        for holder in (obj, getattr(obj, "config", None), getattr(obj, "args", None)):
            if holder is None or isinstance(holder, torch.Tensor):
                continue
            for n in names:
                v = getattr(holder, n, None)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return None


def map_choices(map_TE: torch.Tensor, scores_TE: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """The experts a routing map ``[T, E]`` marks, ``[T, K]`` ordered by ``scores_TE`` (highest first; by
    expert id without scores), -1 for slots a row leaves empty."""
    e = map_TE.shape[-1]
    map_TE = map_TE.reshape(-1, e).bool()
    if scores_TE is None:
        key_TE = -torch.arange(e, device=map_TE.device, dtype=torch.float32).expand_as(map_TE)
    else:
        key_TE = scores_TE.detach().reshape(-1, e).float()
    key_TE = key_TE.masked_fill(~map_TE, float("-inf"))
    vals_TK, ids_TK = key_TE.topk(min(top_k, e), dim=-1)
    return ids_TK.masked_fill_(vals_TK == float("-inf"), -1)
