"""Reference MoE workloads for the moewatch benchmarks, and the seed-style naive monitor they are compared with.

Each workload builds a fresh model (same seed, so copies are identical), a fixed pool of batches and a
``step`` function that runs one full training step (forward, backward, optimizer step).

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` top-k, ``F`` expert hidden width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WORKLOADS", "NaiveMonitor", "Workload", "build_workload"]


@dataclass
class Workload:
    """One reference model, ready to train."""

    name: str
    description: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[int], None]  # step(i): one training step on batch i of the pool
    tokens_per_step: int
    layers: int
    experts: int
    top_k: int
    # make_step(fn): the same step (optimizer, batches) with the forward run by ``fn`` instead of ``model``
    # (``torch.compile(model)``).
    make_step: Callable[[Callable[..., Any]], Callable[[int], None]]
    # make_forward(fn): the step's forward alone (the loss of batch i, no backward, no optimizer step).
    make_forward: Callable[[Callable[..., Any]], Callable[[int], torch.Tensor]]


# --- (b) a simple MoE with a transformers-style TopKRouter --------------------------------------------------


class BenchTopKRouter(nn.Module):
    """The transformers 5.x ``*TopKRouter`` convention (as Qwen3-MoE): returns ``(logits, scores, indices)``."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.randn(num_experts, dim) * dim**-0.5)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = F.linear(x_TD, self.weight)
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        top_TK, indices_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        scores_TK = (top_TK / top_TK.sum(dim=-1, keepdim=True)).to(logits_TE.dtype)
        return logits_TE, scores_TK, indices_TK


class BenchExperts(nn.Module):
    """SwiGLU experts, looped over the experts that got tokens (transformers' eager ``*Experts`` pattern), one
    parameter per expert (slicing one [E, ...] parameter per expert makes backward write E full-size zero
    gradients per layer, which would dominate the step)."""

    def __init__(self, dim: int, num_experts: int, ffn: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_EFD = nn.ParameterList(torch.randn(2 * ffn, dim) * dim**-0.5 for _ in range(num_experts))
        self.down_EDF = nn.ParameterList(torch.randn(dim, ffn) * ffn**-0.5 for _ in range(num_experts))

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, scores_TK: torch.Tensor) -> torch.Tensor:
        out_TD = torch.zeros_like(x_TD)
        with torch.no_grad():
            mask_EKT = F.one_hot(indices_TK, self.num_experts).permute(2, 1, 0)
            # CPU-GPU sync: the model's own (which experts got tokens), as in transformers' eager experts.
            hit = mask_EKT.sum(dim=(1, 2)).nonzero().flatten().tolist()
        for e in hit:
            k_pos, t_idx = torch.where(mask_EKT[e])
            gate, up = F.linear(x_TD[t_idx], self.gate_up_EFD[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_EDF[e]) * scores_TK[t_idx, k_pos, None]
            out_TD.index_add_(0, t_idx, y.to(out_TD.dtype))
        return out_TD


class BenchMoELayer(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, ffn: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.gate = BenchTopKRouter(dim, num_experts, top_k)
        self.experts = BenchExperts(dim, num_experts, ffn)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TD = self.norm(x_TD)
        _, scores_TK, indices_TK = self.gate(h_TD)
        return x_TD + self.experts(h_TD, indices_TK, scores_TK)


class BenchMoE(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, layers: int, ffn: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BenchMoELayer(dim, num_experts, top_k, ffn) for _ in range(layers))
        self.head = nn.Linear(dim, dim)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x_TD = layer(x_TD)
        return self.head(x_TD)


# --- workloads ----------------------------------------------------------------------------------------------


def _regression_forward(
    model: Callable[..., Any], batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[int], torch.Tensor]:
    def forward(i: int) -> torch.Tensor:
        x_TD, y_TD = batches[i % len(batches)]
        return F.mse_loss(model(x_TD), y_TD)

    return forward


def _regression_step(
    model: Callable[..., Any], opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
    after: Callable[[], None] | None = None,
) -> Callable[[int], None]:
    forward = _regression_forward(model, batches)

    def step(i: int) -> None:
        loss = forward(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after is not None:
            after()

    return step


def build_demo(device: torch.device, seed: int, scale: float = 1.0) -> Workload:
    """(a) The demo's default ``DemoMoE``: 2 layers, 8 experts, top-2, 64 tokens per step, width 64."""
    from moewatch.demo.model import DemoMoE, SyntheticTokens

    torch.manual_seed(seed)
    model = DemoMoE().to(device).train()
    data = SyntheticTokens(64, seed=seed)
    batches = [tuple(t.to(device) for t in data.batch(64)) for _ in range(16)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # The demo's loop (moewatch/demo/run.py) also applies the router bias feedback after every step.
    def make_step(fn: Callable[..., Any]) -> Callable[[int], None]:
        return _regression_step(fn, opt, batches, after=lambda: model.update_bias("bias", 0.1))

    return Workload("demo", "DemoMoE default: 2 layers, E=8, top-2, 64 tok/step, D=64", model, opt,
                    make_step(model), 64, 2, 8, 2, make_step, lambda fn: _regression_forward(fn, batches))


def build_moe64(device: torch.device, seed: int, scale: float = 1.0) -> Workload:
    """(b) 4 MoE layers, 64 experts, top-8, width 512, 4096 tokens per step, SwiGLU experts of width 128."""
    tokens = max(64, int(4096 * scale))
    torch.manual_seed(seed)
    model = BenchMoE(dim=512, num_experts=64, top_k=8, layers=4, ffn=128).to(device).train()
    g = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(tokens, 512, generator=g).to(device), torch.randn(tokens, 512, generator=g).to(device))
        for _ in range(4)
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    def make_step(fn: Callable[..., Any]) -> Callable[[int], None]:
        return _regression_step(fn, opt, batches)

    desc = f"simple MoE: 4 layers, E=64, top-8, D=512, F=128, {tokens} tok/step"
    return Workload("moe64", desc, model, opt, make_step(model), tokens, 4, 64, 8, make_step,
                    lambda fn: _regression_forward(fn, batches))


def build_qwen3moe(device: torch.device, seed: int, scale: float = 1.0) -> Workload:
    """(c) transformers ``Qwen3MoeForCausalLM`` from a tiny config (no download): 2 layers, E=8, top-2."""
    import transformers

    seq = max(8, int(128 * scale))
    batch = 4
    config = transformers.Qwen3MoeConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=512, router_aux_loss_coef=0.01,
        output_router_logits=False,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).to(device).train()
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 1024, (batch, seq), generator=g).to(device) for _ in range(8)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def make_forward(fn: Callable[..., Any]) -> Callable[[int], torch.Tensor]:
        def forward(i: int) -> torch.Tensor:
            ids = batches[i % len(batches)]
            return fn(input_ids=ids, labels=ids).loss

        return forward

    def make_step(fn: Callable[..., Any]) -> Callable[[int], None]:
        forward = make_forward(fn)

        def step(i: int) -> None:
            loss = forward(i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    desc = f"transformers Qwen3MoeForCausalLM tiny: 2 layers, E=8, top-2, D=128, {batch * seq} tok/step"
    return Workload("qwen3moe", desc, model, opt, make_step(model), batch * seq, 2, 8, 2, make_step, make_forward)


WORKLOADS: dict[str, Callable[[torch.device, int, float], Workload]] = {
    "demo": build_demo,
    "moe64": build_moe64,
    "qwen3moe": build_qwen3moe,
}


def build_workload(name: str, device: torch.device, seed: int = 0, scale: float = 1.0) -> Workload:
    return WORKLOADS[name](device, seed, scale)


# --- the seed's "minimum viable instrumentation" -------------------------------------------------------------


class NaiveMonitor:
    """The four metrics of the seed's table, computed every step for every router with host syncs
    (``bincount``, ``.item()``): what people write first. It reads routers with moewatch's own adapters so
    that it watches exactly the same modules."""

    def __init__(self, model: nn.Module) -> None:
        from moewatch.adapters.discovery import discover_routers
        from moewatch.config import MoEWatchConfig

        self.specs = discover_routers(model, MoEWatchConfig(run_name="naive"))
        self.latest: list[tuple[float, int, float, float]] = [(0.0, 0, 0.0, 0.0)] * len(self.specs)
        self._handles = [s.hook_module.register_forward_hook(self._hook(i, s)) for i, s in enumerate(self.specs)]

    def _hook(self, i: int, spec: Any) -> Callable[..., None]:
        e = spec.num_experts

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not module.training or torch._C._current_graph_task_id() != -1:
                return
            out = spec.extract(module, args, output)
            with torch.no_grad():
                load = torch.bincount(out.indices_TK.reshape(-1), minlength=e).float()
                mean = load.mean()
                cov = (load.std(unbiased=False) / mean).item()
                dead = int((load < 0.01 * mean).sum().item())
                top2 = (load.topk(2).values.sum() / load.sum()).item()
                p = torch.softmax(out.logits_TE.detach().float(), dim=-1).mean(dim=0)
                ent = (-(p * p.clamp_min(1e-12).log()).sum() / math.log(e)).item()
            self.latest[i] = (cov, dead, top2, ent)

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
