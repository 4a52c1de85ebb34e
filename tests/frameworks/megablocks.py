"""MegaBlocks ``megablocks/layers/router.py`` ``LearnedRouter(args)`` with the ``Arguments`` fields it reads
(``megablocks/layers/arguments.py``); the block-sparse expert kernels are replaced by a dense loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

__all__ = ["Arguments", "LearnedRouter", "MoE"]


@dataclass
class Arguments:
    hidden_size: int = 32
    moe_num_experts: int = 4
    moe_top_k: int = 1
    moe_jitter_eps: float | None = None
    moe_normalize_expert_weights: float | None = None
    uniform_expert_assignment: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    init_method: Callable[[torch.Tensor], object] = partial(nn.init.normal_, mean=0.0, std=0.5)


class _UniformExpertAssignment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, num_experts: int) -> torch.Tensor:  # type: ignore[override]
        out = torch.arange(x.numel(), dtype=x.dtype, device=x.device)
        return torch.remainder(out, num_experts).view(x.shape)


_uniform_expert_assignment = _UniformExpertAssignment.apply


class LearnedRouter(nn.Module):
    def __init__(self, args: Arguments) -> None:
        super().__init__()
        self.args = args
        self.layer = nn.Linear(args.hidden_size, args.moe_num_experts, bias=False, device=args.device)
        args.init_method(self.layer.weight)

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        low, high = 1.0 - self.args.moe_jitter_eps, 1.0 + self.args.moe_jitter_eps
        noise = torch.rand(x.size(), dtype=x.dtype, device=x.device)
        return low + noise * (high - low)

    def _top_k(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.args.moe_top_k == 1:
            return scores.max(dim=-1, keepdim=True)
        return torch.topk(scores, self.args.moe_top_k, dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (scores [T, E] softmax over all experts, expert_weights [T, K],
        expert_indices [T, K], or [T] when k == 1)."""
        if self.training and self.args.moe_jitter_eps is not None:
            x = x * self.jitter(x)
        scores = self.layer(x.view(-1, x.shape[-1])).softmax(dim=-1)
        expert_weights, expert_indices = self._top_k(scores)
        if self.args.moe_normalize_expert_weights:
            expert_weights = expert_weights / torch.norm(
                expert_weights, p=self.args.moe_normalize_expert_weights, dim=-1, keepdim=True
            )
        if self.args.moe_top_k == 1:
            expert_indices = expert_indices.squeeze(-1)
        if self.args.uniform_expert_assignment:
            expert_indices = _uniform_expert_assignment(expert_indices, self.args.moe_num_experts)
        return scores, expert_weights, expert_indices


class MoE(nn.Module):
    """``megablocks/layers/moe.py`` ``MoE``: ``self.router`` and ``self.experts`` (dense, not the kernels)."""

    def __init__(self, args: Arguments) -> None:
        super().__init__()
        self.args = args
        self.router = LearnedRouter(args)
        self.experts = nn.ModuleList(
            nn.Linear(args.hidden_size, args.hidden_size) for _ in range(args.moe_num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, expert_weights, expert_indices = self.router(x)
        x_TH = x.reshape(-1, x.shape[-1])
        indices_TK = expert_indices.view(x_TH.shape[0], -1)
        weights_TK = expert_weights.view(x_TH.shape[0], -1)
        all_TEH = torch.stack([e(x_TH) for e in self.experts], dim=1)
        picked = all_TEH.gather(1, indices_TK.unsqueeze(-1).expand(-1, -1, x_TH.shape[-1]))
        return (weights_TK.unsqueeze(-1) * picked).sum(dim=1).reshape(x.shape)
