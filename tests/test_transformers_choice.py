"""Counts equal the model's own choice on every transformers release of the matrix (``.ci/transformers-matrix``).

DeepSeek-V3's and GLM4-MoE's choice is not a top-k of the router logits: sigmoid scores plus
``e_score_correction_bias``, inside the ``topk_group`` best of ``n_group`` expert groups. transformers 5.24+
computes it in the router (which returns ``(logits, weights, indices)``); 5.0-5.5 compute it in the MoE
block's ``route_tokens_to_experts`` and the router returns only its logits; 5.0-5.5 DeepSeek-V2 even uses
the gate's weight without calling the gate. The reference here reads the ids every version's MoE block
hands to ``experts(hidden_states, top_k_index, top_k_weights)``: what the experts really receive.

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers  # a test extra: missing it must fail, not skip
from torch import nn

import moewatch
from moewatch.adapters import discovery
from tests.fakes import quiet

VOCAB, BATCH, SEQ, E, K = 64, 2, 8, 8, 2
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=64, n_routed_experts=E, num_experts_per_tok=K,
    n_group=4, topk_group=2, moe_intermediate_size=16, first_k_dense_replace=0, n_shared_experts=1,
)  # fmt: skip
_MLA: dict[str, Any] = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)

BUILDS: dict[str, Callable[[], nn.Module]] = {
    "deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**_COMMON, **_MLA)),
    "glm4_moe": lambda: transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**_COMMON, head_dim=16)),
    # Greedy top-k: 5.0-5.5's group-limited branch reads a `num_experts` attribute the block does not have.
    "deepseek_v2": lambda: transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**_COMMON, **_MLA)),
}


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module) and hasattr(m, "gate")]


class ExpertsInput:
    """The ids each MoE block passes to its experts module, and the router logits of the same calls."""

    def __init__(self, model: nn.Module) -> None:
        blocks = _moe_blocks(model)
        self.counts_LE = torch.zeros(len(blocks), E, dtype=torch.int64)
        self.top_of_logits_LE = torch.zeros_like(self.counts_LE)
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.experts.register_forward_pre_hook(self._ids(i)))
            if isinstance(block.gate, nn.Linear) and not hasattr(block.gate, "e_score_correction_bias"):
                continue  # DeepSeek-V2: plain softmax logits, a top-k of them is not what we compare against
            self.handles.append(block.gate.register_forward_hook(self._logits(i)))

    def _ids(self, i: int) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            ids = args[1]
            assert not ids.is_floating_point() and ids.shape[-1] == K
            self.counts_LE[i] += torch.bincount(ids.reshape(-1), minlength=E)

        return pre_hook

    def _logits(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            logits = out[0] if isinstance(out, tuple) else out
            self.top_of_logits_LE[i] += torch.bincount(torch.topk(logits.detach(), K).indices.reshape(-1), minlength=E)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDS[name]().train()
    with torch.no_grad():  # a bias that matters: the choice then differs from a top-k of the logits
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.linspace(-0.5, 0.5, E)[torch.randperm(E)])
    return model


def _train(model: nn.Module, watch: moewatch.Monitor, steps: int = 3) -> moewatch.WindowReport:
    for seed in range(steps):
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
        model(input_ids=ids, use_cache=False).logits.float().pow(2).mean().backward()
        watch.step()
    report = watch.flush()
    assert report is not None, f"moewatch counted nothing under transformers {transformers.__version__}"
    return report


@pytest.mark.parametrize("name", list(BUILDS))
def test_counts_equal_what_the_experts_receive(name: str) -> None:
    model = _build(name)
    ref = ExpertsInput(model)
    with moewatch.attach(model, **quiet(window_steps=1000)) as watch:
        assert len(watch.routers) == len(_moe_blocks(model)) == 2
        assert {(r.num_experts, r.top_k) for r in watch.routers} == {(E, K)}
        report = _train(model, watch)
    ref.remove()
    assert [layer.loads for layer in report.layers] == ref.counts_LE.tolist(), transformers.__version__
    for layer in report.layers:
        assert layer.tokens == 3 * BATCH * SEQ and layer.assignments == 3 * BATCH * SEQ * K
        assert layer.invalid_ids == 0 and watch.hook_errors == 0


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe"])
def test_the_choice_is_not_a_top_k_of_the_logits(name: str) -> None:
    """The premise of the test above: with this bias and these group limits, counting a top-k of the logits
    would be wrong, so equality with the experts' input is not a coincidence."""
    model = _build(name)
    ref = ExpertsInput(model)
    with moewatch.attach(model, **quiet(window_steps=1000)) as watch:
        report = _train(model, watch)
    ref.remove()
    assert ref.top_of_logits_LE.sum() == ref.counts_LE.sum()
    assert not torch.equal(ref.top_of_logits_LE, ref.counts_LE)
    assert [layer.loads for layer in report.layers] != ref.top_of_logits_LE.tolist()
    # The router logits still reach the probability statistics, on every version.
    assert all(layer.norm_entropy is not None and layer.z_loss is not None for layer in report.layers)
    assert {r.score_func for r in watch.routers} == {"sigmoid"}


def test_a_deep_copy_of_a_block_read_at_its_experts_counts_nothing_into_the_original() -> None:
    model = _build("deepseek_v3")


    with moewatch.attach(model, **quiet(window_steps=1000)) as watch:
        twin = copy.deepcopy(model)
        ids = torch.randint(3, VOCAB, (BATCH, SEQ))
        twin(input_ids=ids, use_cache=False)
        model(input_ids=ids, use_cache=False).logits.sum().backward()
        report = watch.flush()
    assert [layer.tokens for layer in report.layers] == [BATCH * SEQ] * 2


class LogitsOnlyTopkRouter(nn.Module):
    """A transformers-5.0-style router (states E and k, holds the [E, H] weight, returns logits only)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, K
        self.weight = nn.Parameter(torch.randn(E, 16))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.view(-1, 16), self.weight)


class OpaqueBlock(nn.Module):
    """Chooses inside its own forward and dispatches with no ``experts(hidden, ids, weights)`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = LogitsOnlyTopkRouter()
        self.w_E = nn.Parameter(torch.randn(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.topk(self.gate(x).sigmoid() + 1.0, K).indices
        return x * self.w_E[ids].sum(-1, keepdim=True).view(*x.shape[:-1], 1)


def test_a_logits_only_router_that_cannot_be_read_is_refused_by_attach(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(OpaqueBlock(), OpaqueBlock())
    with pytest.raises(moewatch.UnreadableRouterError) as err:
        moewatch.attach(model, **quiet())
    msg = str(err.value)
    assert "'0.gate' (LogitsOnlyTopkRouter) returns only its logits" in msg
    assert "under transformers" not in msg and "OpaqueBlock" in msg  # not a transformers class
    # The same router class as transformers' own: the message names the release.
    monkeypatch.setattr(LogitsOnlyTopkRouter, "__module__", "transformers.models.fake.modeling_fake")
    with pytest.raises(moewatch.UnreadableRouterError, match=f"under transformers {transformers.__version__}, "):
        moewatch.attach(nn.Sequential(OpaqueBlock()), **quiet())
    assert "extractor=fn" in msg and isinstance(err.value, ValueError)
    assert not any(m._forward_hooks for m in model.modules())  # nothing left behind


def test_a_transformers_release_outside_the_tested_range_is_named_in_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = _build("glm4_moe")
    with caplog.at_level(logging.WARNING, logger="moewatch"):
        with moewatch.attach(model, **quiet()):
            pass
        assert "outside the tested range" not in caplog.text
        monkeypatch.setattr(discovery, "_transformers_version", lambda: "4.57.6")
        with moewatch.attach(model, **quiet()):
            pass
    assert "transformers 4.57.6 is outside the tested range (>=5.0,<6)" in caplog.text
