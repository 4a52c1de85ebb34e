"""The real Megatron-Core (megatron-core 0.16.1) ``TopKRouter`` and ``MoELayer`` on the CPU, trained a few
steps with moewatch attached; counts, dropped ratio, entropy and z-loss against Megatron's own outputs.

The reference counts before any capacity drop come from Megatron's own ``topk_routing_with_score_function``
run on the logits of the router's own ``gating``; the counts after the drop from the routing map the
router returns. CPU shims: ``tests/realfw.megatron_cpu``.

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k, ``H`` hidden size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import moewatch
from tests.fakes import quiet
from tests.realfw import megatron_cpu, norm_entropy, probs_of, z_loss

H, SEQ, BATCH, E, STEPS = 16, 12, 2, 8, 3
TOKENS = SEQ * BATCH


@pytest.fixture
def pg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with megatron_cpu(monkeypatch) as pg_collection:
        yield pg_collection


def _config(**kw: Any) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    base: dict[str, Any] = {
        "num_layers": 2, "hidden_size": H, "ffn_hidden_size": 32, "num_attention_heads": 2,
        "num_moe_experts": E, "moe_router_topk": 2, "use_cpu_initialization": True,
        "moe_token_dispatcher_type": "allgather", "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": 1e-2,
    }  # fmt: skip
    base.update(kw)
    base.setdefault("moe_router_pre_softmax", base["moe_router_topk"] == 1)  # Megatron requires it for top-1
    return TransformerConfig(**base)


class Routers(nn.Module):
    """Two real ``TopKRouter``s in a residual stack; the loss flows through their probs."""

    def __init__(self, cfg: Any, pg: Any) -> None:
        super().__init__()
        from megatron.core.transformer.moe.router import TopKRouter

        self.proj = nn.Linear(H, H)
        self.routers = nn.ModuleList([TopKRouter(cfg, pg_collection=pg) for _ in range(2)])
        for r in self.routers:
            nn.init.normal_(r.weight, std=0.5)
        self.mix = nn.Linear(E, H)

    def forward(self, x_SBH: torch.Tensor) -> torch.Tensor:
        h = self.proj(x_SBH)
        for r in self.routers:
            probs_TE, _ = r(h)
            h = h + self.mix(probs_TE).view_as(h)
        return h


class Reference:
    """Our own forward hooks on each router: Megatron's pre-drop top-k of the router's own logits, its
    post-drop routing map, and the logits; re-runs inside backward (recompute) are skipped."""

    def __init__(self, routers: list[nn.Module]) -> None:
        self.pre = [torch.zeros(E, dtype=torch.int64) for _ in routers]
        self.post = [torch.zeros(E, dtype=torch.int64) for _ in routers]
        self.logits: list[list[torch.Tensor]] = [[] for _ in routers]
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers)]

    def _hook(self, i: int) -> Any:
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

        def hook(router: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if torch._C._current_graph_task_id() != -1 or not router.training:
                return
            with torch.no_grad():
                logits_TE = router.gating(args[0]).view(-1, E).double()
                _, pre_map_TE = topk_routing_with_score_function(
                    logits_TE, router.topk, use_pre_softmax=router.config.moe_router_pre_softmax,
                    score_function=router.score_function,
                    expert_bias=None if router.expert_bias is None else router.expert_bias.double(),
                )  # fmt: skip
                self.pre[i] += pre_map_TE.sum(dim=0)
                self.post[i] += out[1].sum(dim=0)
                self.logits[i].append(logits_TE)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _train(model: nn.Module, watch: moewatch.Monitor, steps: int = STEPS) -> moewatch.WindowReport:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(steps):
        x = torch.randn(SEQ, BATCH, H, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return watch.flush()


def _check(report: moewatch.WindowReport, ref: Reference, score_func: str, k: int, capacity: bool) -> None:
    for i, layer in enumerate(report.layers):
        assert layer.loads == ref.pre[i].tolist(), "loads are the router's choices before any capacity drop"
        assert layer.tokens == STEPS * TOKENS and layer.assignments == STEPS * TOKENS * k
        dropped = int(ref.pre[i].sum() - ref.post[i].sum())
        if capacity:
            assert dropped > 0, "the capacity factor must drop something for this check"
            assert layer.dropped_ratio == pytest.approx(dropped / layer.assignments, abs=1e-6)
        else:
            assert dropped == 0 and layer.dropped_ratio is None
        logits_TE = torch.cat(ref.logits[i])
        assert layer.norm_entropy == pytest.approx(norm_entropy(probs_of(logits_TE, score_func)), abs=1e-5)
        assert layer.z_loss == pytest.approx(z_loss(logits_TE), rel=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("capacity", [None, 0.5], ids=["no-capacity", "capacity"])
@pytest.mark.parametrize("bias", [True, False], ids=["router-bias", "no-bias"])
def test_topk_router_softmax(pg: Any, k: int, capacity: float | None, bias: bool) -> None:
    torch.manual_seed(k)
    cfg = _config(moe_router_topk=k, moe_expert_capacity_factor=capacity, add_bias_linear=bias)
    model = Routers(cfg, pg)
    if bias:
        for r in model.routers:
            assert r.bias is not None
            with torch.no_grad():
                r.bias.copy_(torch.linspace(-3.0, 3.0, E))  # a bias large enough to move entropy and choices
    routers = list(model.routers)
    ref = Reference(routers)
    watch = moewatch.attach(model, optimizer=None, **quiet(window_steps=1000))
    assert [(r.family, r.num_experts, r.top_k, r.score_func) for r in watch.routers] == [
        ("megatron", E, k, "softmax")
    ] * 2
    report = _train(model, watch)
    watch.close()
    ref.remove()
    _check(report, ref, "softmax", k, capacity is not None)


@pytest.mark.parametrize("capacity", [None, 0.5], ids=["no-capacity", "capacity"])
def test_topk_router_sigmoid_with_expert_bias(pg: Any, capacity: float | None) -> None:
    torch.manual_seed(0)
    cfg = _config(
        moe_router_topk=2, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_expert_capacity_factor=capacity,
        add_bias_linear=False,
    )  # fmt: skip
    model = Routers(cfg, pg)
    for r in model.routers:
        r.expert_bias[5] = 5.0  # the bias steers every token to expert 5: not a top-k of the scores alone
    ref = Reference(list(model.routers))
    watch = moewatch.attach(model, **quiet(window_steps=1000))
    assert [r.score_func for r in watch.routers] == ["sigmoid", "sigmoid"]
    report = _train(model, watch)
    watch.close()
    ref.remove()
    assert ref.pre[0][5] == STEPS * TOKENS
    _check(report, ref, "sigmoid", 2, capacity is not None)


def test_router_bias_moves_entropy_of_a_collapsed_router(pg: Any) -> None:
    """Defect 1: the router's bias (``add_bias_linear``, Megatron's default) was left out of the recomputed
    logits: a router the bias collapses onto two experts was reported with near-uniform entropy."""
    torch.manual_seed(0)
    model = Routers(_config(moe_router_topk=2), pg)
    for r in model.routers:
        with torch.no_grad():
            r.weight.mul_(0.01)
            r.bias.copy_(torch.tensor([6.0, 6.0] + [0.0] * (E - 2)))
    ref = Reference(list(model.routers))
    watch = moewatch.attach(model, **quiet(window_steps=1000))
    report = _train(model, watch)
    watch.close()
    ref.remove()
    true_entropy = norm_entropy(probs_of(torch.cat(ref.logits[0]), "softmax"))
    assert true_entropy < 0.7
    assert report.layers[0].norm_entropy == pytest.approx(true_entropy, abs=1e-5)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute-moe"])
@pytest.mark.parametrize("capacity", [None, 1.0], ids=["no-capacity", "capacity"])
def test_moe_layer(pg: Any, k: int, recompute: bool, capacity: float | None) -> None:
    """The real ``MoELayer`` (returning ``(out, mlp_bias)``), built from Megatron's own local layer spec,
    with its real selective recompute of the MoE module (``recompute_modules=["moe"]``): the forward
    re-run inside backward must not be counted. ``add_bias_linear=False``: with biased experts 0.16.1's
    ``SequentialMLP`` modifies a custom Function's output view in place, which autograd rejects."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    torch.manual_seed(k)
    extra: dict[str, Any] = {"recompute_granularity": "selective", "recompute_modules": ["moe"]} if recompute else {}
    cfg = _config(moe_router_topk=k, add_bias_linear=False, moe_expert_capacity_factor=capacity, **extra)
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)

    class Layers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(H, H)
            self.layers = nn.ModuleList([build_module(spec.submodules.mlp, config=cfg, pg_collection=pg) for _ in range(2)])
            for layer in self.layers:
                nn.init.normal_(layer.router.weight, std=0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.proj(x)  # an input that requires grad: Megatron's reentrant recompute needs one
            for layer in self.layers:
                out, _ = layer(x)
                x = x + out
            return x

    model = Layers()
    routers = [layer.router for layer in model.layers]
    ref = Reference(routers)
    calls = [0]
    counter = routers[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    watch = moewatch.attach(model, **quiet(window_steps=1000))
    assert [r.module for r in watch.routers] == ["layers.0.router", "layers.1.router"]
    report = _train(model, watch)
    watch.close()
    ref.remove()
    counter.remove()
    assert calls[0] == (2 * STEPS if recompute else STEPS), "recompute really re-ran the router in backward"
    _check(report, ref, "softmax", k, capacity is not None)


@pytest.mark.parametrize("capacity", [None, 0.5], ids=["no-capacity", "capacity"])
def test_capture_routes_reads_the_routing_map_in_probability_order(pg: Any, capacity: float | None) -> None:
    """capture_routes on the real TopKRouter: without capacity the routing map's experts, ordered by
    Megatron's own probs; with capacity the choices before the drop (moewatch's loads), from the reference."""
    torch.manual_seed(0)
    model = Routers(_config(moe_router_topk=2, moe_expert_capacity_factor=capacity), pg)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [r.register_forward_hook(lambda m, a, out: seen.append((out[0].detach(), out[1]))) for r in model.routers]
    ref = Reference(list(model.routers))
    watch = moewatch.attach(model, optimizer=None, **quiet(window_steps=1000))
    with watch.capture_routes() as cap:
        model(torch.randn(SEQ, BATCH, H, generator=torch.Generator().manual_seed(0)))
    watch.close()
    ref.remove()
    for h in handles:
        h.remove()
    routes_TLK = cap.routes
    assert routes_TLK.shape == (TOKENS, 2, 2)
    for layer, (probs_TE, map_TE) in enumerate(seen):
        ids_TK = routes_TLK[:, layer].long()
        if capacity is None:
            assert torch.equal(ids_TK, probs_TE.masked_fill(~map_TE, -1.0).topk(2, dim=-1).indices)
        chosen_TE = torch.zeros(TOKENS, E, dtype=torch.int64).scatter_(1, ids_TK, 1)
        assert torch.equal(chosen_TE.sum(dim=0), ref.pre[layer])  # the choices moewatch counts as loads
