"""The real DeepSpeed (deepspeed 0.19.8) ``deepspeed.moe.layer.MoE`` on the CPU with a one-process gloo
group, alone and under ``deepspeed.initialize``, trained a few steps with moewatch attached.

DeepSpeed's own ``MOELayer`` calls ``gate(x, used_token, True, use_tutel)`` and gets the sparse-routes
7-tuple ``(l_aux, C, E, indices_KS, locations_KS, gates_KS, exp_counts_E)``, with ``-1`` for each route
capacity dropped. The reference is read from that same output by our own hook: ``exp_counts`` (the
gate's choices before capacity) and the ``-1`` routes. The first run JIT-builds DeepSpeed's small CPU
communication op (about a minute; cached in ``~/.cache/torch_extensions`` afterwards).

Legend: ``S`` tokens, ``E`` experts, ``K`` top-k, ``H`` hidden size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import moewatch
from tests.fakes import quiet
from tests.realfw import gloo_world, linear, norm_entropy, probs_of, require, z_loss

H, BATCH, SEQ, E, STEPS = 16, 2, 12, 4, 3
TOKENS = BATCH * SEQ

pytestmark = pytest.mark.timeout(600)  # the first test JIT-builds DeepSpeed's CPU comm op


@pytest.fixture(scope="module")
def ds() -> Iterator[Any]:
    with gloo_world():
        yield require("deepspeed")


class Model(nn.Module):
    def __init__(self, k: int, **moe_kw: Any) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        def expert() -> nn.Module:
            return nn.Sequential(nn.Linear(H, 32), nn.ReLU(), nn.Linear(32, H))

        self.layers = nn.ModuleList([MoE(H, expert(), num_experts=E, ep_size=1, k=k, **moe_kw) for _ in range(2)])
        for layer in self.layers:
            nn.init.normal_(layer.deepspeed_moe.gate.wg.weight, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = x.new_zeros(())
        for layer in self.layers:
            out, l_aux, _ = layer(x)
            x, aux = x + out, aux + l_aux
        return x.pow(2).mean() + 0.01 * aux


class Reference:
    """Our hook on each real ``TopKGate``: its 7-tuple's ``exp_counts`` and dropped (``-1``) routes, and the
    gating logits of its ``wg`` weight."""

    def __init__(self, gates: list[nn.Module]) -> None:
        self.counts = [torch.zeros(E, dtype=torch.int64) for _ in gates]
        self.dropped = [0 for _ in gates]
        self.logits: list[list[torch.Tensor]] = [[] for _ in gates]
        self.lengths: list[int] = []
        self.handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(gates)]

    def _hook(self, i: int) -> Any:
        def hook(gate: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            self.lengths.append(len(out))
            self.counts[i] += out[-1].detach().long()
            self.dropped[i] += int((out[3] < 0).sum())
            self.logits[i].append(linear(args[0], gate.wg.weight).detach())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _check(report: moewatch.WindowReport, ref: Reference, k: int, drops: bool) -> None:
    assert set(ref.lengths) == {7}, "DeepSpeed's MOELayer takes the sparse-routes 7-tuple path"
    for i, layer in enumerate(report.layers):
        assert layer.loads == ref.counts[i].tolist()
        assert layer.tokens == STEPS * TOKENS and layer.assignments == STEPS * TOKENS * k
        if drops:
            assert ref.dropped[i] > 0, "capacity must drop something for this check"
            assert layer.dropped_ratio == pytest.approx(ref.dropped[i] / layer.assignments, abs=1e-6)
        else:
            assert ref.dropped[i] == 0 and layer.dropped_ratio is None
        logits_SE = torch.cat(ref.logits[i])
        assert layer.norm_entropy == pytest.approx(norm_entropy(probs_of(logits_SE, "softmax")), abs=1e-5)
        assert layer.z_loss == pytest.approx(z_loss(logits_SE), rel=1e-5)


def _x(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, H, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("k", "moe_kw", "drops"),
    [
        (1, {"capacity_factor": 0.5, "noisy_gate_policy": "RSample"}, True),
        (2, {"capacity_factor": 0.5}, True),
        (2, {"capacity_factor": 0.5, "top2_2nd_expert_sampling": False}, True),
        (4, {"capacity_factor": 0.5}, True),
        (2, {"drop_tokens": False}, False),
    ],
    ids=["top1-rsample-capacity", "top2-capacity", "top2-plain-capacity", "top4-capacity", "top2-no-drop"],
)
def test_moe_layer(ds: Any, k: int, moe_kw: dict[str, Any], drops: bool) -> None:
    torch.manual_seed(k)
    model = Model(k, min_capacity=1, **moe_kw)
    ref = Reference([layer.deepspeed_moe.gate for layer in model.layers])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = moewatch.attach(model, optimizer=opt, **quiet(window_steps=1000))
    assert [(r.module, r.family, r.num_experts, r.top_k) for r in watch.routers] == [
        (f"layers.{i}.deepspeed_moe.gate", "deepspeed", E, k) for i in range(2)
    ]
    for seed in range(STEPS):
        opt.zero_grad()
        model(_x(seed)).backward()
        opt.step()
    report = watch.flush()
    watch.close()
    ref.remove()
    _check(report, ref, k, drops)


def test_deepspeed_initialize(ds: Any) -> None:
    """The engine ``deepspeed.initialize`` returns, stepped with its own ``backward``/``step``; moewatch is
    attached to the engine and its optimizer."""
    torch.manual_seed(0)
    model = Model(2, capacity_factor=0.5, min_capacity=1)
    engine, opt, _, _ = ds.initialize(
        model=model, model_parameters=model.parameters(),
        config={"train_batch_size": BATCH, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
    )  # fmt: skip
    ref = Reference([layer.deepspeed_moe.gate for layer in model.layers])
    watch = moewatch.attach(engine, optimizer=opt, **quiet(window_steps=1000))
    assert [r.module for r in watch.routers] == [f"module.layers.{i}.deepspeed_moe.gate" for i in range(2)]
    for seed in range(STEPS):
        loss = engine(_x(seed))
        engine.backward(loss)
        engine.step()
    report = watch.flush()
    watch.close()
    ref.remove()
    assert report.steps == STEPS
    _check(report, ref, 2, True)


def test_capture_routes_reads_the_sparse_routes_with_minus_one_for_drops(ds: Any) -> None:
    """capture_routes on the real gate: the kept routes of DeepSpeed's own 7-tuple, -1 where capacity dropped
    (DeepSpeed's gate hands over counts only, so the capture is after capacity: the README says so)."""
    torch.manual_seed(2)
    model = Model(2, min_capacity=1, capacity_factor=0.5)
    seen: list[torch.Tensor] = []
    handles = [layer.deepspeed_moe.gate.register_forward_hook(
        lambda m, a, out: seen.append(out[3].t())) for layer in model.layers]  # fmt: skip
    watch = moewatch.attach(model, **quiet(window_steps=1000))
    with watch.capture_routes() as cap:
        model(_x(0))
    for h in handles:
        h.remove()
    assert torch.equal(cap.routes.long(), torch.stack(seen, dim=1).long())
    assert (cap.routes == -1).any(), "capacity 0.5 must drop something for this check"
    # The gate called on its own returns the dense 4-tuple: the kept experts come from its dispatch mask.
    gate = model.layers[0].deepspeed_moe.gate
    with watch.capture_routes() as dense, torch.no_grad():
        out = gate(_x(1).reshape(-1, H))
    watch.close()
    assert len(out) == 4
    kept_SE = out[2].any(dim=-1)
    ids_SK = dense.layer_routes(0).long()
    for s in range(TOKENS):
        assert set(ids_SK[s][ids_SK[s] >= 0].tolist()) == set(kept_SE[s].nonzero().view(-1).tolist())
