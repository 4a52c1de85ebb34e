"""moewatch.route_agreement and decode_sglang_routes (issue 23, part 2): the figures equal their definitions
computed token by token in plain Python, on random routes and on routes recorded from a real transformers
Qwen3-MoE; the vLLM and SGLang formats of the documented shapes and dtypes (no engine runs on this CPU
machine); clear errors for shapes that do not fit.

Legend: ``T`` tokens, ``L`` layers, ``K`` top-k.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import moewatch
from tests.realfw import require


def definitions(a_TLK: np.ndarray, b_TLK: np.ndarray) -> tuple[list[tuple[float, float, float]], float]:
    """(top1, overlap@k, exact) per layer and the tokens-differing fraction, one token at a time."""
    t, n_layers, k = a_TLK.shape
    per_layer = []
    for layer in range(n_layers):
        top1 = sum(a_TLK[i, layer, 0] == b_TLK[i, layer, 0] for i in range(t)) / t
        overlap = sum(len(set(a_TLK[i, layer]) & set(b_TLK[i, layer])) / k for i in range(t)) / t
        exact = sum(set(a_TLK[i, layer]) == set(b_TLK[i, layer]) for i in range(t)) / t
        per_layer.append((top1, overlap, exact))
    differing = sum(any(set(a_TLK[i, j]) != set(b_TLK[i, j]) for j in range(n_layers)) for i in range(t)) / t
    return per_layer, differing


def _random_routes(rng: np.random.Generator, t: int, n_layers: int, e: int, k: int) -> np.ndarray:
    return np.stack([rng.permutation(e)[:k] for _ in range(t * n_layers)]).reshape(t, n_layers, k)


def _figures(result: moewatch.RouteAgreement) -> list[tuple[float, float, float]]:
    return [(la.top1, la.overlap, la.exact) for la in result.layers]


def test_figures_equal_their_definitions_on_random_routes() -> None:
    rng = np.random.default_rng(0)
    a = _random_routes(rng, 200, 3, 8, 2)
    b = a.copy()
    b[:80, 1] = _random_routes(rng, 80, 1, 8, 2)[:, 0]  # layer 1 disagrees on some tokens
    b[:40, 2] = b[:40, 2, ::-1]  # layer 2: same sets, swapped order (top-1 differs, sets do not)
    result = moewatch.route_agreement(a, b)
    expected, differing = definitions(a, b)
    np.testing.assert_allclose(_figures(result), expected)
    assert result.tokens_differing == pytest.approx(differing)
    assert result.tokens == 200 and result.top_k == 2 and [la.layer for la in result.layers] == [0, 1, 2]
    assert _figures(result)[0] == (1.0, 1.0, 1.0)
    assert result.layers[2].top1 == pytest.approx(160 / 200) and result.layers[2].exact == 1.0
    assert result.layers[1].overlap < 1.0 and 0 < result.tokens_differing < 1


def test_identical_routes_agree_exactly_and_disjoint_ones_not_at_all() -> None:
    a = np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    same = moewatch.route_agreement(a, a.copy())
    assert _figures(same) == [(1.0, 1.0, 1.0)] * 2 and same.tokens_differing == 0.0
    apart = moewatch.route_agreement(a, (a + 2) % 8 + 8)
    assert _figures(apart) == [(0.0, 0.0, 0.0)] * 2 and apart.tokens_differing == 1.0


# --- real routes from a transformers model --------------------------------------------------------------


def _qwen3_moe() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def _record(model: nn.Module, ids: torch.Tensor) -> np.ndarray:
    """The routers' own top-k ids (their third output), ``[T, L, K]``, recorded with our own hooks."""
    routes: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        routes.append(out[2].detach().reshape(-1, out[2].shape[-1]))

    gates = [m.mlp.gate for m in model.model.layers]
    handles = [g.register_forward_hook(hook) for g in gates]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return torch.stack(routes, dim=1).numpy()


def test_real_routes_two_identical_forwards_agree_and_a_perturbed_layer_drops_alone() -> None:
    model = _qwen3_moe()
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    first, second = _record(model, ids), _record(model, ids)
    assert first.shape == (64, 3, 2)
    same = moewatch.route_agreement(first, second, num_layers=3)
    assert _figures(same) == [(1.0, 1.0, 1.0)] * 3 and same.tokens_differing == 0.0
    with torch.no_grad():  # permute layer 1's router rows: its choices land on other experts
        gate = model.model.layers[1].mlp.gate
        gate.weight.copy_(gate.weight[torch.randperm(8, generator=torch.Generator().manual_seed(2))])
    perturbed = moewatch.route_agreement(first, torch.from_numpy(_record(model, ids)))  # a tensor works too
    expected, differing = definitions(first, _record(model, ids))
    np.testing.assert_allclose(_figures(perturbed), expected)
    assert perturbed.tokens_differing == pytest.approx(differing)
    top1, overlap, _ = zip(*_figures(perturbed), strict=True)
    assert overlap[1] < 0.6 and top1[1] < 0.6  # layer 1 drops; the layer before it is untouched
    assert _figures(perturbed)[0] == (1.0, 1.0, 1.0)


# --- engine formats ----------------------------------------------------------------------------------


def test_vllm_routed_experts_array_is_read_as_is() -> None:
    # vLLM: RequestOutput.outputs[i].routed_experts, numpy [num_tokens, num_layers, top_k] of int ids.
    rng = np.random.default_rng(3)
    trainer = _random_routes(rng, 50, 2, 16, 4)
    engine = trainer.astype(np.int32)
    engine[::5, 0, :] = engine[::5, 0, ::-1]  # same sets, another order on every 5th token
    result = moewatch.route_agreement(engine, trainer)
    assert [la.exact for la in result.layers] == [1.0, 1.0] and result.layers[0].top1 == pytest.approx(0.8)


def test_sglang_base64_routes_decode_to_tokens_layers_top_k() -> None:
    routes = np.arange(5 * 3 * 2, dtype="<i4").reshape(5, 3, 2) % 7
    payload = base64.b64encode(routes.tobytes()).decode()
    decoded = moewatch.decode_sglang_routes(payload, num_layers=3, top_k=2)
    assert decoded.dtype == np.int32 and decoded.shape == (5, 3, 2) and np.array_equal(decoded, routes)
    assert np.array_equal(moewatch.decode_sglang_routes(payload.encode(), 3, 2), routes)
    with pytest.raises(ValueError, match=r"120 bytes is not a whole number of tokens of 4 layers x top-2"):
        moewatch.decode_sglang_routes(payload, num_layers=4, top_k=2)
    with pytest.raises(ValueError, match="not base64"):
        moewatch.decode_sglang_routes("not base64!", 3, 2)


# --- errors and layer maps ---------------------------------------------------------------------------


def test_shapes_that_do_not_fit_get_errors_naming_them() -> None:
    a = np.zeros((4, 2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"a has shape \(4, 2, 2\) and b \(4, 3, 2\)"):
        moewatch.route_agreement(a, np.zeros((4, 3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"b has shape \(8, 2\); expected \[num_tokens, num_layers, top_k\]"):
        moewatch.route_agreement(a, np.zeros((8, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="float64 values; expert ids must be integers"):
        moewatch.route_agreement(a, np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match="route sets have 2 layers and the model 3; pass layer_map"):
        moewatch.route_agreement(a, a, num_layers=3)
    with pytest.raises(ValueError, match=r"layer_map has 1 entries \[5\]; it needs one per layer of a \(2\)"):
        moewatch.route_agreement(a, a, layer_map=[5])


def test_layer_map_picks_the_engine_layers_that_match_the_model() -> None:
    rng = np.random.default_rng(4)
    model_routes = _random_routes(rng, 30, 2, 8, 2)
    # an engine that also reports an extra (MTP-style) layer first
    engine = np.concatenate([_random_routes(rng, 30, 1, 8, 2), model_routes], axis=1)
    result = moewatch.route_agreement(model_routes, engine, num_layers=2, layer_map=[1, 2])
    assert _figures(result) == [(1.0, 1.0, 1.0)] * 2


def test_megatron_router_replay_recordings_are_read_as_a_list_of_layers() -> None:
    router_replay = require("megatron.core.transformer.moe.router_replay")  # skips locally, fails under CI
    replay = router_replay.RouterReplay
    replay.clear_global_router_replay_instances()
    layers = [replay() for _ in range(2)]
    rng = np.random.default_rng(5)
    trainer = _random_routes(rng, 24, 2, 8, 2)
    for i, layer in enumerate(layers):
        layer.record_indices(torch.from_numpy(trainer[:, i].copy()))
    recorded = replay.get_recorded_data()
    replay.clear_global_router_replay_instances()
    assert len(recorded) == 2 and tuple(recorded[0].shape) == (24, 2)
    result = moewatch.route_agreement(recorded, trainer, num_layers=2)
    assert _figures(result) == [(1.0, 1.0, 1.0)] * 2


def test_large_route_sets_are_compared_in_chunks_with_the_same_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    from moewatch import agreement

    rng = np.random.default_rng(6)
    a = _random_routes(rng, 301, 2, 8, 2)
    b = _random_routes(rng, 301, 2, 8, 2)
    whole = moewatch.route_agreement(a, b)
    monkeypatch.setattr(agreement, "_CHUNK_CELLS", 2 * 2 * 2 * 7)  # 7 tokens per chunk, a ragged last one
    chunked = moewatch.route_agreement(a, b)
    assert chunked == whole
    expected, differing = definitions(a, b)
    np.testing.assert_allclose(_figures(chunked), expected)
    assert chunked.tokens_differing == pytest.approx(differing)
