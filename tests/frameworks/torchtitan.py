"""torchtitan ``torchtitan/models/moe/moe.py``: ``MoEArgs``, ``TokenChoiceTopKRouter``, ``GroupedExperts``
(for-loop path) and ``MoE`` calling ``self.router(x, self.expert_bias)``; no DTensor, grouped_mm or
reorderer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoE", "MoEArgs", "TokenChoiceTopKRouter"]


@dataclass
class MoEArgs:
    num_experts: int = 8
    num_shared_experts: int = 1
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    route_norm: bool = False
    route_scale: float = 1.0
    score_before_experts: bool = True
    top_k: int = 1
    load_balance_coeff: float | None = 1e-3


class TokenChoiceTopKRouter(nn.Module):
    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        score_func: Literal["softmax", "sigmoid"],
        route_norm: bool,
        route_scale: float,
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.route_norm = route_norm
        self.route_scale = route_scale

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``(bs*slen, dim)`` -> (top_scores ``(bs*slen, top_k)``, selected_experts_indices
        ``(bs*slen, top_k)``, num_tokens_per_expert ``(num_experts,)``)."""
        scores = self.gate(x)
        if self.score_func == "sigmoid":
            scores = torch.sigmoid(scores.to(torch.float32))
        elif self.score_func == "softmax":
            scores = F.softmax(scores.to(torch.float32), dim=1)
        else:
            raise NotImplementedError(f"Unknown score function {self.score_func}")
        if expert_bias is not None:
            _, selected_experts_indices = torch.topk(scores + expert_bias, k=self.top_k, dim=1)
            top_scores = scores.gather(dim=1, index=selected_experts_indices)
        else:
            top_scores, selected_experts_indices = torch.topk(scores, k=self.top_k, dim=1)
        if self.route_norm:
            top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
        top_scores = top_scores * self.route_scale
        # Upstream passes the int64 indices (CUDA histc takes them); CPU histc needs a float input.
        num_tokens_per_expert = torch.histc(
            selected_experts_indices.view(-1).float(), bins=self.num_experts, min=0, max=self.num_experts
        )
        return top_scores, selected_experts_indices, num_tokens_per_expert


class GroupedExperts(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden_dim, dim) * 0.1)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, hidden_dim) * 0.1)
        self.w3 = nn.Parameter(torch.randn(num_experts, hidden_dim, dim) * 0.1)

    def forward(self, x_TH: torch.Tensor, expert_T: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self.w1[expert_T], self.w2[expert_T], self.w3[expert_T]
        h = F.silu(torch.einsum("thd,td->th", w1, x_TH)) * torch.einsum("thd,td->th", w3, x_TH)
        return torch.einsum("tdh,th->td", w2, h)


class MoE(nn.Module):
    def __init__(self, moe_args: MoEArgs, dim: int, hidden_dim: int) -> None:
        super().__init__()
        num_experts = moe_args.num_experts
        self.experts = GroupedExperts(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts)
        self.router = TokenChoiceTopKRouter(
            dim=dim,
            num_experts=num_experts,
            top_k=moe_args.top_k,
            score_func=moe_args.score_func,
            route_norm=moe_args.route_norm,
            route_scale=moe_args.route_scale,
        )
        self.load_balance_coeff = moe_args.load_balance_coeff
        if self.load_balance_coeff is not None:
            self.register_buffer(
                "expert_bias", torch.zeros(num_experts, dtype=torch.float32), persistent=True
            )
        else:
            self.expert_bias = None
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        x = x.view(-1, dim)
        top_scores, selected_experts_indices, num_tokens_per_expert = self.router(x, self.expert_bias)
        with torch.no_grad():
            self.tokens_per_expert.add_(num_tokens_per_expert)
        out = sum(
            top_scores[:, j : j + 1] * self.experts(x, selected_experts_indices[:, j])
            for j in range(selected_experts_indices.shape[1])
        )
        return out.reshape(bs, slen, dim)
