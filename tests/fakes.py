"""Deterministic routers for exact-count tests: the experts a token picks are read from its input.

Legend: ``T`` tokens, ``D`` width, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn


def quiet(**overrides: Any) -> dict[str, Any]:
    """attach() overrides with every network/console sink off (tests pass jsonl explicitly when needed)."""
    base: dict[str, Any] = {
        "console": {"enabled": False},
        "jsonl": {"enabled": False},
        "prometheus": {"enabled": False},
        "alerts": {"enabled": False},
        "min_fair_share": 0,
        "strict": True,
        "probs_every": 1,  # exact probability statistics to check against; sampling has tests of its own
    }
    base.update(overrides)
    return base


class FakeTopKRouter(nn.Module):
    """transformers-style router: returns ``(logits_TE, scores_TK, indices_TK)``; the chosen experts are the
    first ``K`` input features (cast to int), so a test decides every assignment."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.randn(num_experts, dim) * 0.1)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_TD = x_TD.reshape(-1, x_TD.shape[-1])
        logits_TE = nn.functional.linear(x_TD, self.weight)
        indices_TK = x_TD[:, : self.top_k].detach().round().long()
        scores_TK = torch.ones(indices_TK.shape, dtype=x_TD.dtype) / self.top_k
        return logits_TE, scores_TK, indices_TK


class ToyMoE(nn.Module):
    """``layers`` blocks of router + one shared linear "expert" (enough to train and to backprop)."""

    def __init__(self, dim: int = 8, num_experts: int = 4, top_k: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"router": FakeTopKRouter(dim, num_experts, top_k), "proj": nn.Linear(dim, dim)})
            for _ in range(layers)
        )
        self.top_k = top_k

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        ids = x_TD[:, : self.top_k]
        h = x_TD
        for block in self.blocks:
            logits_TE, scores_TK, _ = block["router"](h)
            h = block["proj"](h) + logits_TE.mean() * 0 + scores_TK.sum() * 0
            h = torch.cat([ids, h[:, self.top_k :]], dim=1)  # keep the routing ids for the next router
        return h


def tokens_for(assign_TK: list[list[int]], dim: int = 8) -> torch.Tensor:
    """Input whose tokens pick exactly ``assign_TK`` experts."""
    x = torch.randn(len(assign_TK), dim)
    x[:, : len(assign_TK[0])] = torch.tensor(assign_TK, dtype=torch.float32)
    return x


def expected_loads(assign_TK: list[list[int]], num_experts: int) -> list[int]:
    c = Counter(e for row in assign_TK for e in row)
    return [c.get(i, 0) for i in range(num_experts)]
