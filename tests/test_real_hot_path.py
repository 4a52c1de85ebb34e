"""Hot-path rules on the real framework classes: moewatch's hooks never make the host wait for the device
(the guard of ``tests/frameworks/guards.py``), the Megatron/DeepSpeed logits are recomputed only on the
calls that sample probabilities, and the recompute can be switched off.

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k, ``H`` hidden size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import test_real_deepspeed as tds
import test_real_megablocks as tmb
import test_real_megatron as tmg
import test_real_torchtitan as ttt
import torch
import torch.nn.functional as F
from frameworks.guards import no_host_sync_in_hooks
from torch import nn

import moewatch
from tests.fakes import quiet
from tests.realfw import gloo_world, megatron_cpu, require

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def _world() -> Iterator[None]:
    with gloo_world():
        yield


@pytest.fixture
def pg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with megatron_cpu(monkeypatch) as pg_collection:
        yield pg_collection


def _megatron(pg: Any, capacity: float | None = None) -> nn.Module:
    return tmg.Routers(tmg._config(moe_router_topk=2, moe_expert_capacity_factor=capacity), pg)


def _step(model: nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    (out if out.dim() == 0 else out.pow(2).mean()).backward()


BUILDS: dict[str, Callable[[Any], tuple[nn.Module, torch.Tensor]]] = {
    "megatron": lambda pg: (_megatron(pg), torch.randn(tmg.SEQ, tmg.BATCH, tmg.H)),
    "megatron-capacity": lambda pg: (_megatron(pg, 0.5), torch.randn(tmg.SEQ, tmg.BATCH, tmg.H)),
    "deepspeed-top1": lambda pg: (
        tds.Model(1, capacity_factor=0.5, min_capacity=1, noisy_gate_policy="RSample"), tds._x(0)
    ),
    "deepspeed-top2": lambda pg: (tds.Model(2, capacity_factor=0.5, min_capacity=1), tds._x(0)),
    "torchtitan": lambda pg: (
        ttt.Model(None, k=2, score_func="sigmoid", groups=None, shared=True, balance=True),
        torch.randn(ttt.B, ttt.L, ttt.D),
    ),
    "megablocks": lambda pg: (tmb.Routers(2, 0.1), torch.randn(tmb.T, tmb.H)),
}


@pytest.mark.parametrize("name", list(BUILDS))
def test_hooks_never_synchronise_with_the_device(name: str, pg: Any) -> None:
    if name.startswith("deepspeed"):
        require("deepspeed")
    model, x = BUILDS[name](pg)
    with pytest.MonkeyPatch.context() as mp:  # its own: the guard undoes its patches on exit
        with no_host_sync_in_hooks(mp):
            watch = moewatch.attach(model, **quiet(window_steps=1000))
        _step(model, x)
        report = watch.flush()
        watch.close()
    assert all(layer.tokens > 0 for layer in report.layers) and watch.hook_errors == 0


def test_logits_are_recomputed_only_on_the_calls_that_sample_probabilities(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("deepspeed")
    from moewatch.adapters import families

    recomputes: list[int] = []

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        recomputes.append(x.shape[0])
        return F.linear(x, w, b)

    monkeypatch.setattr(families, "F", SimpleNamespace(linear=linear))
    for model, x, tokens in (
        (_megatron(pg), torch.randn(tmg.SEQ, tmg.BATCH, tmg.H), tmg.TOKENS),
        (tds.Model(2, capacity_factor=0.5, min_capacity=1), tds._x(0), tds.TOKENS),
    ):
        recomputes.clear()
        watch = moewatch.attach(model, **quiet(window_steps=1000, probs_every=4))
        for _ in range(9):  # calls 0, 4 and 8 sample
            _step(model, x)
        layer = watch.flush().layers[0]
        watch.close()
        assert recomputes == [tokens] * 3 * 2
        assert layer.assignments == 9 * tokens * 2 and layer.entropy_source == "probs"


def test_logit_recompute_can_be_switched_off(pg: Any) -> None:
    require("deepspeed")
    for model, x in (
        (_megatron(pg), torch.randn(tmg.SEQ, tmg.BATCH, tmg.H)),
        (tds.Model(2, capacity_factor=0.5, min_capacity=1), tds._x(0)),
    ):
        watch = moewatch.attach(model, **quiet(window_steps=1000, recompute_logits=False))
        _step(model, x)
        layer = watch.flush().layers[0]
        watch.close()
        assert layer.assignments > 0  # counting is unaffected
        assert layer.entropy_source == "loads" and layer.z_loss is None


def test_deepspeed_wg_is_not_hooked_on_its_own() -> None:
    """The real TopKGate computes F.linear(input, wg.weight): a hook on ``wg`` would never fire."""
    require("deepspeed")
    model = tds.Model(2, capacity_factor=0.5, min_capacity=1)
    fired: list[int] = []
    model.layers[0].deepspeed_moe.gate.wg.register_forward_hook(lambda *a: fired.append(1))
    with moewatch.attach(model, **quiet(window_steps=1000)) as watch:
        _step(model, tds._x(0))
        report = watch.flush()
    assert not fired
    assert report.layers[0].assignments == tds.TOKENS * 2
