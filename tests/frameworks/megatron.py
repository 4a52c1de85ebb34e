"""Megatron-Core ``megatron/core/transformer/moe/router.py`` ``TopKRouter`` (and
``topk_softmax_with_capacity`` from ``moe_utils.py``), without parallel state, aux-loss tracking or
Transformer Engine."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MoELayer", "TopKRouter", "TransformerConfig", "topk_softmax_with_capacity"]


@dataclass
class TransformerConfig:
    hidden_size: int
    num_moe_experts: int
    moe_router_topk: int = 2
    moe_router_score_function: str = "softmax"
    moe_router_load_balancing_type: str = "aux_loss"
    moe_router_pre_softmax: bool = False
    moe_router_enable_expert_bias: bool = False
    moe_router_dtype: str | None = None
    moe_expert_capacity_factor: float | None = None
    moe_token_drop_policy: str = "probs"
    moe_input_jitter_eps: float | None = None


def get_capacity(
    num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int | None = None
) -> int:
    capacity = math.ceil((num_tokens / num_experts) * capacity_factor)
    if min_capacity is not None and capacity < min_capacity:
        capacity = min_capacity
    return capacity


def topk_softmax_with_capacity(
    logits: torch.Tensor,
    topk: int,
    capacity_factor: float | None = None,
    drop_policy: str = "probs",
    use_pre_softmax: bool = False,
    score_function: str = "softmax",
    expert_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (routing_probs [T, E] zero outside the top-k, routing_map [T, E] bool, tokens_per_expert [E])."""
    num_tokens, num_experts = logits.shape
    if score_function == "softmax":
        if use_pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
            probs, top_indices = torch.topk(scores, k=topk, dim=1)
        else:
            scores, top_indices = torch.topk(logits, k=topk, dim=1)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float()).type_as(logits)
        if expert_bias is not None:
            _, top_indices = torch.topk(scores + expert_bias, k=topk, dim=1)
            scores = torch.gather(scores, dim=1, index=top_indices).type_as(logits)
        else:
            scores, top_indices = torch.topk(scores, k=topk, dim=1)
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else scores
    else:
        raise ValueError(f"Invalid score_function: {score_function}")

    topk_masked_gates = torch.zeros_like(logits).scatter(1, top_indices, probs)
    topk_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    tokens_per_expert = topk_map.sum(dim=0)
    if capacity_factor is None:
        return topk_masked_gates, topk_map, tokens_per_expert

    expert_capacity = get_capacity(num_tokens * topk, num_experts, capacity_factor)
    if drop_policy == "probs":
        _, capacity_indices = torch.topk(topk_masked_gates, k=expert_capacity, dim=0, sorted=False)
    elif drop_policy == "position":
        _, capacity_indices = torch.topk(topk_map.int(), k=expert_capacity, dim=0, sorted=False)
    else:
        raise ValueError(f"Invalid drop_policy: {drop_policy}")
    capacity_mask = torch.zeros_like(logits).scatter(0, capacity_indices, 1).bool()
    final_map = torch.logical_and(topk_map, capacity_mask)
    return topk_masked_gates * final_map, final_map, tokens_per_expert


class Router(nn.Module):
    """Upstream: ``Router(ABC, MegatronModule)``."""

    def __init__(self, config: TransformerConfig, model_comm_pgs: Any = None) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_moe_experts
        self.weight = nn.Parameter(
            torch.empty((config.num_moe_experts, config.hidden_size), dtype=torch.float32)
        )
        nn.init.normal_(self.weight, std=0.5)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        router_dtype = torch.float32 if self.config.moe_router_dtype == "fp32" else input.dtype
        return torch.nn.functional.linear(input.to(router_dtype), self.weight.to(router_dtype))


class TopKRouter(Router):
    """Route each token to the top-k experts."""

    def __init__(self, config: TransformerConfig, model_comm_pgs: Any = None) -> None:
        super().__init__(config, model_comm_pgs)
        self.topk = config.moe_router_topk
        self.routing_type = config.moe_router_load_balancing_type
        self.score_function = config.moe_router_score_function
        self.enable_expert_bias = config.moe_router_enable_expert_bias
        if self.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_moe_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.view(-1, self.config.num_moe_experts)
        probs, routing_map, _ = topk_softmax_with_capacity(
            logits,
            self.topk,
            capacity_factor=self.config.moe_expert_capacity_factor,
            drop_policy=self.config.moe_token_drop_policy,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
        )
        return probs, routing_map

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gating(input)
        return self.routing(logits)


class MoELayer(nn.Module):
    """``megatron/core/transformer/moe/moe_layer.py`` ``MoELayer`` reduced to router + dense experts."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.router = TopKRouter(config)
        self.experts = nn.ModuleList(
            nn.Linear(config.hidden_size, config.hidden_size) for _ in range(config.num_moe_experts)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        probs, routing_map = self.router(hidden_states)
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = sum(probs[:, e : e + 1] * expert(x_TH) for e, expert in enumerate(self.experts))
        return out.reshape(hidden_states.shape)
