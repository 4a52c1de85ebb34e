"""The real MegaBlocks (megablocks 0.10.0) ``LearnedRouter`` on the CPU, trained a few steps with moewatch
attached: top-1 (``[T, 1]`` indices from ``max(keepdim=True)``), top-2 and top-4, with and without input
jitter. The reference is read by our own hook from the router's own ``(scores_TE, weights_TK, indices_TK)``.

Not covered here, and why: MegaBlocks' ``MoE``/``dMoE`` forward (and so its capacity-factor drop) runs only
on a GPU (its permutation and grouped-GEMM kernels are CUDA/Triton), so only the router is built;
importing it needs the compiled ``megablocks_ops`` stand-in of ``tests/realfw.megablocks_router_module``.

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k, ``H`` hidden size.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import moewatch
from tests.fakes import quiet
from tests.realfw import megablocks_router_module, norm_entropy

H, T, E, STEPS = 16, 24, 8, 3


class Routers(nn.Module):
    def __init__(self, k: int, jitter: float | None) -> None:
        super().__init__()
        router_mod = megablocks_router_module()
        from megablocks.layers.arguments import Arguments

        args = Arguments(
            hidden_size=H, ffn_hidden_size=32, moe_num_experts=E, moe_top_k=k, moe_jitter_eps=jitter, fp16=False,
            device=torch.device("cpu"), init_method=lambda w: nn.init.normal_(w, std=0.5),
        )  # fmt: skip
        self.routers = nn.ModuleList([router_mod.LearnedRouter(args) for _ in range(2)])
        self.mix = nn.Linear(E, H)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        for r in self.routers:
            scores_TE, weights_TK, _ = r(x_TH)
            x_TH = x_TH + self.mix(scores_TE) * weights_TK.sum(dim=-1, keepdim=True)
        return x_TH


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("jitter", [None, 0.1], ids=["no-jitter", "jitter"])
def test_learned_router(k: int, jitter: float | None) -> None:
    torch.manual_seed(k)
    model = Routers(k, jitter)
    counts = [torch.zeros(E, dtype=torch.int64) for _ in range(2)]
    scores: list[list[torch.Tensor]] = [[], []]
    shapes: set[tuple[int, ...]] = set()

    def record(i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            scores_TE, _, indices_TK = out
            shapes.add(tuple(indices_TK.shape))
            counts[i] += torch.bincount(indices_TK.reshape(-1), minlength=E)
            scores[i].append(scores_TE.detach().double())

        return hook

    handles = [r.register_forward_hook(record(i)) for i, r in enumerate(model.routers)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = moewatch.attach(model, optimizer=opt, **quiet(window_steps=1000))
    assert [(r.module, r.family, r.num_experts, r.top_k) for r in watch.routers] == [
        (f"routers.{i}", "megablocks", E, k) for i in range(2)
    ]
    for seed in range(STEPS):
        opt.zero_grad()
        model(torch.randn(T, H, generator=torch.Generator().manual_seed(seed))).pow(2).mean().backward()
        opt.step()
    report = watch.flush()
    watch.close()
    for h in handles:
        h.remove()
    assert shapes == {(T, k)}
    for i, layer in enumerate(report.layers):
        assert layer.loads == counts[i].tolist()
        assert layer.tokens == STEPS * T and layer.assignments == STEPS * T * k
        assert layer.entropy_source == "probs"
        assert layer.norm_entropy == pytest.approx(norm_entropy(torch.cat(scores[i])), abs=1e-5)
        assert layer.z_loss is None  # the router returns softmax scores, not logits
