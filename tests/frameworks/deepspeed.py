"""DeepSpeed ``deepspeed/moe/sharded_moe.py`` ``TopKGate`` with ``top1gating`` / ``top2gating`` /
``topkgating`` and a single-rank ``MOELayer``; no expert-parallel groups, Tutel or timers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MOELayer", "TopKGate", "top1gating", "top2gating", "topkgating"]


def multiplicative_jitter(x: Tensor, device: torch.device, epsilon: float = 1e-2) -> Tensor:
    if epsilon == 0:
        return x
    uniform = torch.distributions.uniform.Uniform(
        low=torch.tensor(1.0 - epsilon, device=device), high=torch.tensor(1.0 + epsilon, device=device)
    ).rsample
    return x * uniform(x.shape)


def gumbel_rsample(shape: tuple[int, ...], device: torch.device) -> Tensor:
    one, zero = torch.tensor(1.0, device=device), torch.tensor(0.0, device=device)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(shape)


def _capacity(gates: Tensor, capacity_factor: Tensor, min_capacity: Tensor) -> Tensor:
    num_tokens, num_experts = gates.shape[0], gates.shape[1]
    capacity = torch.ceil((num_tokens / num_experts) * capacity_factor).to(torch.int64)
    if capacity < min_capacity:
        capacity = min_capacity.to(torch.int64)
    return capacity


def _one_hot_to_float(x: Tensor, num_classes: Tensor | int) -> Tensor:
    return F.one_hot(x, num_classes=int(num_classes)).float()


def top1gating(
    logits: Tensor,
    capacity_factor: float,
    min_capacity: int,
    used_token: Tensor | None = None,
    noisy_gate_policy: str | None = None,
    drop_tokens: bool = True,
    use_rts: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if noisy_gate_policy == "RSample":
        logits_w_noise = logits + gumbel_rsample(logits.shape, device=logits.device)
    gates = F.softmax(logits, dim=1)
    capacity = _capacity(gates, torch.tensor(capacity_factor), torch.tensor(min_capacity))
    indices1_s = torch.argmax(logits_w_noise if noisy_gate_policy == "RSample" else gates, dim=1)
    num_experts = int(gates.shape[1])
    mask1 = F.one_hot(indices1_s, num_classes=num_experts)
    if used_token is not None:
        mask1 = torch.einsum("s,se->se", used_token, mask1)
    exp_counts = torch.sum(mask1, dim=0).detach().to(logits.device)
    if not drop_tokens:
        capacity = torch.max(exp_counts).to(logits.device)
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.sum(me * ce) * num_experts
    mask1_rand = mask1 * torch.rand(mask1.shape, device=logits.device) if use_rts else mask1
    selection_capacity = min(capacity, torch.tensor(mask1.size(0)).to(capacity.device))
    top_idx = torch.topk(mask1_rand, k=int(selection_capacity), dim=0)[1]
    mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    gates = gates * mask1.float()
    locations1_sc = _one_hot_to_float(locations1_s, capacity)
    combine_weights = torch.einsum("se,sc->sec", gates, locations1_sc)
    dispatch_mask = combine_weights.bool()
    return l_aux, combine_weights, dispatch_mask, exp_counts


def top2gating(
    logits: Tensor,
    capacity_factor: float,
    min_capacity: int,
    drop_tokens: bool = True,
    top2_2nd_expert_sampling: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gates = F.softmax(logits, dim=1)
    indices1_s = torch.argmax(gates, dim=1)
    num_experts = int(gates.shape[1])
    mask1 = F.one_hot(indices1_s, num_classes=num_experts)
    if top2_2nd_expert_sampling:
        logits += gumbel_rsample(logits.shape, device=logits.device)
    logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
    indices2_s = torch.argmax(logits_except1, dim=1)
    mask2 = F.one_hot(indices2_s, num_classes=num_experts)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1
    locations2 += torch.sum(mask1, dim=0, keepdim=True)
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.mean(me * ce) * num_experts * num_experts
    exp_counts = torch.sum(mask1 + mask2, dim=0).detach().to(logits.device)
    if drop_tokens:
        capacity = _capacity(gates, torch.tensor(capacity_factor * 2), torch.tensor(min_capacity))
        mask1 *= torch.lt(locations1, capacity)
        mask2 *= torch.lt(locations2, capacity)
    else:
        capacity = torch.max(exp_counts)
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    locations2_s = torch.sum(locations2 * mask2, dim=1)
    mask1_float, mask2_float = mask1.float(), mask2.float()
    gates1_s = torch.einsum("se,se->s", gates, mask1_float)
    gates2_s = torch.einsum("se,se->s", gates, mask2_float)
    denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates1_s.dtype).eps)
    gates1_s, gates2_s = gates1_s / denom_s, gates2_s / denom_s
    gates1 = torch.einsum("s,se->se", gates1_s, mask1_float)
    gates2 = torch.einsum("s,se->se", gates2_s, mask2_float)
    combine1_sec = torch.einsum("se,sc->sec", gates1, _one_hot_to_float(locations1_s, capacity))
    combine2_sec = torch.einsum("se,sc->sec", gates2, _one_hot_to_float(locations2_s, capacity))
    combine_weights = combine1_sec + combine2_sec
    dispatch_mask = combine_weights.bool()
    return l_aux, combine_weights, dispatch_mask, exp_counts


def topkgating(
    logits: Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gates = F.softmax(logits, dim=1)
    num_experts = int(gates.shape[1])
    top_gate, top_idx = torch.topk(gates, k=k, dim=1)
    mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top_idx, 1)
    exp_counts = torch.sum(mask, dim=0).detach().to(logits.device)
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask.float(), dim=0)
    l_aux = torch.mean(me * ce) * num_experts * num_experts / k
    if drop_tokens:
        capacity = _capacity(gates, torch.tensor(capacity_factor * k), torch.tensor(min_capacity))
        topk_masked_gates = torch.zeros_like(gates).scatter(1, top_idx, top_gate)
        selection_capacity = min(capacity, torch.tensor(gates.size(0)))
        _, capacity_indices = torch.topk(topk_masked_gates, k=int(selection_capacity), dim=0, sorted=False)
        capacity_mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(0, capacity_indices, True)
        mask &= capacity_mask
    else:
        capacity = torch.max(exp_counts)
    locations = torch.cumsum(mask, dim=0) - 1
    gates_masked = gates * mask
    denom_s = torch.clamp(
        torch.sum(gates_masked, dim=-1, keepdim=True), min=torch.finfo(gates_masked.dtype).eps
    )
    gates_masked = gates_masked / denom_s
    locations_sc = _one_hot_to_float(locations * mask, capacity)
    combine_weights = torch.einsum("se,sec->sec", gates_masked, locations_sc)
    dispatch_mask = combine_weights.bool()
    return l_aux, combine_weights, dispatch_mask, exp_counts


class TopKGate(nn.Module):
    """Gate module which implements Top2Gating as described in GShard."""

    wg: torch.nn.Linear

    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 8,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        ep_group: Any = None,
        top2_2nd_expert_sampling: bool = True,
    ) -> None:
        super().__init__()
        self.wg = torch.nn.Linear(model_dim, num_experts, bias=False)
        self.ep_group = ep_group
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = noisy_gate_policy
        self.drop_tokens = drop_tokens
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling

    def forward(
        self, input: torch.Tensor, used_token: torch.Tensor | None = None, use_tutel: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        input_fp32 = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            input_fp32 = multiplicative_jitter(input_fp32, device=input.device)
        logits = torch.nn.functional.linear(input_fp32, weight=self.wg.weight.float(), bias=None)
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            return top1gating(
                logits,
                capacity_factor,
                self.min_capacity,
                used_token,
                self.noisy_gate_policy if self.training else None,
                self.drop_tokens,
                self.use_rts,
            )
        if self.k == 2:
            return top2gating(
                logits, capacity_factor, self.min_capacity, self.drop_tokens, self.top2_2nd_expert_sampling
            )
        return topkgating(logits, self.k, capacity_factor, self.min_capacity, self.drop_tokens)


class MOELayer(nn.Module):
    """Single-rank ``MOELayer``: dispatch by ``dispatch_mask``, combine by ``combine_weights``."""

    def __init__(
        self,
        gate: nn.Module,
        experts: nn.Module,
        ep_group_name: str | None,
        ep_size: int,
        num_local_experts: int,
        use_tutel: bool = False,
    ) -> None:
        super().__init__()
        assert ep_size == 1 and not use_tutel, "single-rank replica"
        self.gate = gate
        self.experts = experts
        self.ep_group_name = ep_group_name
        self.ep_size = ep_size
        self.num_local_experts = num_local_experts
        self.exp_counts: Tensor | None = None

    def forward(self, *input: Tensor, **kwargs: Any) -> Tensor:
        d_model = input[0].shape[-1]
        reshaped_input = input[0].reshape(-1, d_model)
        self.l_aux, combine_weights, dispatch_mask, self.exp_counts = self.gate(reshaped_input, None)
        dispatched_input = torch.einsum("sec,sm->ecm", dispatch_mask.type_as(input[0]), reshaped_input)
        expert_output = self.experts(dispatched_input)
        combined_output = torch.einsum("sec,ecm->sm", combine_weights.type_as(input[0]), expert_output)
        return combined_output.reshape(input[0].shape)


class Experts(nn.Module):
    """``deepspeed/moe/experts.py`` shape contract: [E, C, M] -> [E, C, M]."""

    def __init__(self, model_dim: int, num_local_experts: int) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(
            nn.Linear(model_dim, model_dim) for _ in range(num_local_experts)
        )

    def forward(self, inputs_ECM: Tensor) -> Tensor:
        return torch.stack([e(x) for e, x in zip(self.deepspeed_experts, inputs_ECM, strict=True)])
