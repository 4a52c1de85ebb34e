"""The real torchtitan (torchtitan 0.3.0) ``MoE`` with its ``TokenChoiceTopKRouter``, ``GroupedExperts``
(``torch._grouped_mm``) and ``LocalTokenDispatcher``, built from its nested ``.Config`` objects and trained
a few steps on the CPU with moewatch attached: softmax and sigmoid scores, the auxiliary-loss-free expert
bias, node-limited groups, shared experts and activation checkpointing.

The reference is read by our own hook from the router's 3-D output ``(scores_BLK, ids_BLK, scores_BLE)``
and the logits of its ``gate``.

Legend: ``B`` batch, ``L`` sequence, ``E`` experts, ``K`` top-k, ``D`` hidden size.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moewatch
from tests.fakes import quiet
from tests.realfw import norm_entropy, probs_of, require, z_loss

D, B, L, E, STEPS = 16, 2, 8, 8, 3
TOKENS = B * L


def _moe(k: int, score_func: str, groups: tuple[int, int] | None, shared: bool, balance: bool) -> nn.Module:
    require("torchtitan")
    from torchtitan.models.common import config_utils as cu
    from torchtitan.models.common.moe import GroupedExperts, RoutedExperts
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    init = functools.partial(nn.init.normal_, std=0.5)
    small = functools.partial(nn.init.normal_, std=0.05)
    router = cu.make_router_config(
        dim=D, num_experts=E, gate_param_init={"weight": init}, top_k=k, score_func=score_func,
        num_expert_groups=groups[0] if groups else None, num_limited_groups=groups[1] if groups else None,
    )  # fmt: skip
    experts = RoutedExperts.Config(
        inner_experts=GroupedExperts.Config(
            dim=D, hidden_dim=32, num_experts=E,
            param_init={"w1_EFD": small, "w2_EDF": small, "w3_EFD": small},
        ),
        token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=k),
    )  # fmt: skip
    shared_cfg = (
        cu.make_ffn_config(dim=D, hidden_dim=32, w1_param_init={"weight": small}, w2w3_param_init={"weight": small})
        if shared
        else None
    )
    moe = cu.make_moe_config(
        num_experts=E, router=router, routed_experts=experts, shared_experts=shared_cfg,
        load_balance_coeff=1e-3 if balance else None,
    ).build()  # fmt: skip
    moe.init_states()
    return moe


class Model(nn.Module):
    def __init__(self, ckpt: str | None, **kw: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_moe(**kw) for _ in range(2)])
        self.ckpt = ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.ckpt is None:
                x = x + layer(x)
            else:
                x = x + checkpoint(layer, x, use_reentrant=self.ckpt == "reentrant")
        return x


class Reference:
    def __init__(self, routers: list[nn.Module]) -> None:
        self.counts = [torch.zeros(E, dtype=torch.int64) for _ in routers]
        self.logits: list[list[torch.Tensor]] = [[] for _ in routers]
        self.calls = 0
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers)]

    def _hook(self, i: int) -> Any:
        def hook(router: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            self.calls += 1
            if torch._C._current_graph_task_id() != -1:  # checkpoint's re-run inside backward
                return
            _, ids_BLK, _ = out
            with torch.no_grad():  # nothing saved for backward: non-reentrant checkpoint counts those
                self.counts[i] += torch.bincount(ids_BLK.reshape(-1), minlength=E)
                self.logits[i].append(router.gate(args[0]).reshape(-1, E).double())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize(
    ("k", "score_func", "groups", "shared", "balance", "ckpt"),
    [
        (1, "softmax", None, False, False, None),
        (2, "softmax", None, True, False, None),
        (4, "sigmoid", None, False, True, None),
        (2, "sigmoid", (4, 2), True, True, None),
        (2, "sigmoid", None, False, True, "reentrant"),
        (2, "softmax", None, False, False, "non-reentrant"),
    ],
    ids=["top1-softmax", "top2-softmax-shared", "top4-sigmoid-bias", "top2-sigmoid-groups-shared",
         "ckpt-reentrant", "ckpt-non-reentrant"],
)  # fmt: skip
def test_moe(k: int, score_func: str, groups: Any, shared: bool, balance: bool, ckpt: str | None) -> None:
    torch.manual_seed(k)
    model = Model(ckpt, k=k, score_func=score_func, groups=groups, shared=shared, balance=balance)
    if balance:
        for layer in model.layers:
            layer.expert_bias_E[6] = 5.0  # the expert bias steers every token to expert 6
    ref = Reference([layer.router for layer in model.layers])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = moewatch.attach(model, optimizer=opt, **quiet(window_steps=1000))
    assert [(r.module, r.family, r.num_experts, r.top_k, r.score_func) for r in watch.routers] == [
        (f"layers.{i}.router", "torchtitan", E, k, score_func) for i in range(2)
    ]
    for seed in range(STEPS):
        x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    report = watch.flush()
    watch.close()
    ref.remove()
    assert ref.calls == 2 * STEPS * (2 if ckpt else 1), "checkpointing really re-ran the routers"
    if balance:
        assert ref.counts[0][6] == STEPS * TOKENS
    for i, layer in enumerate(report.layers):
        assert layer.loads == ref.counts[i].tolist()
        assert layer.tokens == STEPS * TOKENS and layer.assignments == STEPS * TOKENS * k
        assert layer.dropped_ratio is None  # torchtitan's token-choice MoE drops nothing
        logits_TE = torch.cat(ref.logits[i])
        assert layer.norm_entropy == pytest.approx(norm_entropy(probs_of(logits_TE, score_func)), abs=1e-5)
        assert layer.z_loss == pytest.approx(z_loss(logits_TE), rel=1e-5)
