"""A small real MoE for the demo and the benchmarks, with the router-collapse feedback loop built in.

Each layer's router is a learned gate plus a non-learned per-expert bias used for selection. After every
optimizer step :meth:`DemoMoE.update_bias` moves that bias by the step's loads:

* ``none``: winners are pushed up, ``b_i += rate * (L_i - f) / f``: the positive feedback of router collapse, which
  collapses the router onto a few experts.
* ``bias``: the sign flipped, ``b_i -= rate * sign(L_i - f)``: auxiliary-loss-free balancing
  (DeepSeek-V3).
* ``aux``: no bias feedback; a Switch-style auxiliary loss ``E * sum_i(frac_i * P_i)`` trains the gate.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` top-k, ``H`` expert hidden width.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Balance", "DemoMoE", "DemoMoELayer", "DemoTopKRouter", "SyntheticTokens"]

Balance = Literal["none", "bias", "aux"]


class DemoTopKRouter(nn.Module):
    """Router with the transformers ``*TopKRouter`` convention: returns ``(logits, scores, indices)``."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.randn(num_experts, dim) * 0.02)
        self.register_buffer("selection_bias", torch.zeros(num_experts))
        # Loads of the current optimizer step, for the bias feedback (the demo's own training logic).
        self.register_buffer("step_load", torch.zeros(num_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = F.linear(x_TD, self.weight) + self.selection_bias
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        top_TK, indices_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        scores_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
        if self.training:
            with torch.no_grad():
                ones_N = torch.ones(indices_TK.numel(), device=indices_TK.device)
                self.step_load.index_add_(0, indices_TK.reshape(-1), ones_N)
        return logits_TE, scores_TK, indices_TK


class DemoMoELayer(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, hidden: int) -> None:
        super().__init__()
        self.gate = DemoTopKRouter(dim, num_experts, top_k)
        self.w_in_EDH = nn.Parameter(torch.randn(num_experts, dim, hidden) / dim**0.5)
        self.w_out_EHD = nn.Parameter(torch.randn(num_experts, hidden, dim) / hidden**0.5)
        self.norm = nn.LayerNorm(dim)
        self.aux_loss = torch.zeros(())

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TD = self.norm(x_TD)
        logits_TE, scores_TK, indices_TK = self.gate(h_TD)
        # Dense expert compute (small E): every expert on every token, then gather the chosen ones.
        hid_ETH = F.gelu(torch.einsum("td,edh->eth", h_TD, self.w_in_EDH))
        out_ETD = torch.einsum("eth,ehd->etd", hid_ETH, self.w_out_EHD)
        out_TKD = out_ETD.permute(1, 0, 2).gather(
            1, indices_TK.unsqueeze(-1).expand(-1, -1, out_ETD.shape[-1])
        )
        y_TD = (scores_TK.unsqueeze(-1).to(out_TKD.dtype) * out_TKD).sum(dim=1)
        if self.training:
            e = self.gate.num_experts
            frac_E = F.one_hot(indices_TK, e).float().sum(dim=(0, 1)) / indices_TK.numel()
            self.aux_loss = e * (frac_E * torch.softmax(logits_TE, dim=-1).mean(dim=0)).sum()
        return x_TD + y_TD


class DemoMoE(nn.Module):
    """``layers`` residual MoE layers between an input and an output projection."""

    def __init__(self, dim: int = 64, num_experts: int = 8, top_k: int = 2, layers: int = 2, hidden: int = 128) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DemoMoELayer(dim, num_experts, top_k, hidden) for _ in range(layers))
        self.head = nn.Linear(dim, dim)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x_TD = layer(x_TD)
        return self.head(x_TD)

    def aux_loss(self) -> torch.Tensor:
        return torch.stack([layer.aux_loss for layer in self.layers]).mean()

    @torch.no_grad()
    def update_bias(self, balance: Balance, rate: float) -> None:
        """Apply the step's bias feedback and reset the step loads."""
        for layer in self.layers:
            router = layer.gate
            load_E = router.step_load
            fair = load_E.sum() / router.num_experts
            if balance == "none":
                router.selection_bias.add_(rate * (load_E - fair) / fair.clamp_min(1.0))
            elif balance == "bias":
                router.selection_bias.sub_(rate * (load_E - fair) / fair.clamp_min(1.0))
            load_E.zero_()


class SyntheticTokens:
    """Tokens from a mixture of clusters, each with its own linear target map: something experts can
    specialise on. Batches are stratified (every cluster equally often, order shuffled), as a large
    mixture-proportional pretraining batch is; at 64 tokens a multinomial draw of clusters would add
    composition noise that no router can balance away within a step."""

    def __init__(self, dim: int, clusters: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.generator = g
        self.centers_CD = torch.randn(clusters, dim, generator=g)
        self.maps_CDD = torch.randn(clusters, dim, dim, generator=g) / dim**0.5

    def batch(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        n_clusters = self.centers_CD.shape[0]
        c_T = torch.arange(tokens) % n_clusters
        c_T = c_T[torch.randperm(tokens, generator=g)]
        x_TD = self.centers_CD[c_T] + 0.5 * torch.randn(tokens, self.centers_CD.shape[1], generator=g)
        y_TD = torch.einsum("td,tde->te", x_TD, self.maps_CDD[c_T])
        return x_TD, y_TD
