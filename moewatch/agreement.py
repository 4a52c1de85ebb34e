"""Agreement between two sets of routes for the same tokens (issue 23, part 2): a rollout engine's and the
trainer's, two checkpoints', two steps'.

A route set is an integer array ``routes_TLK`` ``[num_tokens, num_layers, top_k]``: for each token and MoE
layer, the ids of the experts chosen. vLLM returns exactly this as ``RequestOutput.outputs[i].routed_experts``
(numpy, with ``enable_return_routed_experts=True``); SGLang returns base64-encoded int32 ids of that logical
shape (:func:`decode_sglang_routes`); Megatron-Core's ``RouterReplay.get_recorded_data()`` gives one
``[num_tokens, top_k]`` tensor per layer, and such a list is accepted as it is (stacked on axis 1). The first id of a row is taken as the token's top-1: vLLM, SGLang and
``torch.topk(sorted=True)`` order a row by score. Overlap and exact-set figures ignore the order.

Per layer ``l`` over the ``T`` tokens (``A``, ``B`` the two sets of ``k`` ids of a token):

* ``top1`` = mean of ``A[0] == B[0]``;
* ``overlap`` (overlap@k) = mean of ``|A ∩ B| / k``;
* ``exact`` = mean of ``A == B`` as sets.

Across layers, ``tokens_differing`` is the fraction of tokens whose set differs in at least one layer.

Legend: ``T`` tokens, ``L`` layers, ``K`` top-k.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LayerAgreement", "RouteAgreement", "decode_sglang_routes", "route_agreement"]


class LayerAgreement(BaseModel):
    model_config = ConfigDict(frozen=True)

    layer: int = Field(description="Layer index in the first route set (moewatch's router order).")
    top1: float = Field(description="Fraction of tokens whose first expert id is the same in both.")
    overlap: float = Field(description="Mean of |A ∩ B| / k over tokens (overlap@k, order-insensitive).")
    exact: float = Field(description="Fraction of tokens whose k experts are the same set in both.")


class RouteAgreement(BaseModel):
    model_config = ConfigDict(frozen=True)

    tokens: int
    top_k: int
    layers: list[LayerAgreement]
    tokens_differing: float = Field(
        description="Fraction of tokens whose expert set differs in at least one layer."
    )


def _host(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor: one device-to-host copy (a sync, off the training hot path)
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_routes(x: Any, name: str) -> np.ndarray:
    if isinstance(x, (list, tuple)) and x and all(getattr(v, "ndim", 0) == 2 for v in x):
        # one [num_tokens, top_k] array per layer (Megatron-Core's RouterReplay.get_recorded_data())
        x = np.stack([_host(v) for v in x], axis=1)
    arr = _host(x)
    if arr.ndim != 3:
        raise ValueError(
            f"moewatch.route_agreement: {name} has shape {arr.shape}; expected [num_tokens, num_layers, top_k] "
            "(vLLM's routed_experts, decode_sglang_routes(...), or a moewatch capture)"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"moewatch.route_agreement: {name} holds {arr.dtype} values; expert ids must be integers")
    return arr


def route_agreement(
    a: Any,
    b: Any,
    *,
    num_layers: int | None = None,
    layer_map: Sequence[int] | None = None,
) -> RouteAgreement:
    """Per-layer agreement of two route sets ``[num_tokens, num_layers, top_k]`` for the same tokens.

    ``num_layers``: the model's MoE layer count (e.g. ``len(watch.routers)``); a route set with another
    count is an error unless ``layer_map`` says which layer of ``b`` each layer of ``a`` is
    (``b[:, layer_map[i]]`` is compared with ``a[:, i]``; e.g. an engine that also reports MTP layers).
    """
    a_TLK, b_TLK = _as_routes(a, "a"), _as_routes(b, "b")
    if layer_map is not None:
        idx = [int(i) for i in layer_map]
        if len(idx) != a_TLK.shape[1] or any(not 0 <= i < b_TLK.shape[1] for i in idx):
            raise ValueError(
                f"moewatch.route_agreement: layer_map has {len(idx)} entries {idx[:8]}; it needs one per layer of "
                f"a ({a_TLK.shape[1]}), each a layer index of b (0..{b_TLK.shape[1] - 1})"
            )
        b_TLK = b_TLK[:, idx]
    if a_TLK.shape != b_TLK.shape:
        raise ValueError(
            f"moewatch.route_agreement: a has shape {a_TLK.shape} and b {b_TLK.shape}; both must be "
            "[num_tokens, num_layers, top_k] for the same tokens (pass layer_map= when the layers differ)"
        )
    if num_layers is not None and a_TLK.shape[1] != num_layers and layer_map is None:
        raise ValueError(
            f"moewatch.route_agreement: the route sets have {a_TLK.shape[1]} layers and the model {num_layers}; "
            "pass layer_map=[...] naming, for each model layer, its layer in the route sets"
        )
    t, n_layers, k = a_TLK.shape
    if t == 0 or k == 0:
        raise ValueError(f"moewatch.route_agreement: no routes to compare (shape {a_TLK.shape})")
    top1_L = np.zeros(n_layers)
    hits_L = np.zeros(n_layers)
    exact_L = np.zeros(n_layers)
    differing = 0
    # In chunks of tokens: the pairwise comparison holds chunk * L * K * K booleans (a 1M-token rollout of
    # 60 layers at top-8 would otherwise take 3.8 GB).
    chunk = max(1, _CHUNK_CELLS // (n_layers * k * k))
    for start in range(0, t, chunk):
        a_CLK, b_CLK = a_TLK[start : start + chunk], b_TLK[start : start + chunk]
        # |A ∩ B| per token and layer: each id of A found anywhere in B's row (ids within a row are distinct).
        hits_CL = (a_CLK[:, :, :, None] == b_CLK[:, :, None, :]).any(axis=3).sum(axis=2)
        exact_CL = hits_CL == k
        top1_L += (a_CLK[:, :, 0] == b_CLK[:, :, 0]).sum(axis=0)
        hits_L += hits_CL.sum(axis=0)
        exact_L += exact_CL.sum(axis=0)
        differing += int((~exact_CL).any(axis=1).sum())
    layers = [
        LayerAgreement(layer=i, top1=top1_L[i] / t, overlap=hits_L[i] / (t * k), exact=exact_L[i] / t)
        for i in range(n_layers)
    ]
    return RouteAgreement(tokens=t, top_k=k, layers=layers, tokens_differing=differing / t)


#: Booleans per chunk of the pairwise id comparison (64 MiB).
_CHUNK_CELLS = 1 << 26


def decode_sglang_routes(payload: str | bytes, num_layers: int, top_k: int) -> np.ndarray:
    """SGLang's ``routed_experts`` (base64 of int32 ids, ``--enable-return-routed-experts``) as an int32
    array ``[num_tokens, num_layers, top_k]``. SGLang returns tokens ``[0, seqlen - 1)`` by default."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"moewatch.decode_sglang_routes: the payload is not base64 ({exc})") from None
    per_token = 4 * num_layers * top_k
    if num_layers < 1 or top_k < 1 or len(raw) % per_token:
        raise ValueError(
            f"moewatch.decode_sglang_routes: {len(raw)} bytes is not a whole number of tokens of "
            f"{num_layers} layers x top-{top_k} int32 ids ({per_token} bytes each); check num_layers and top_k"
        )
    return np.frombuffer(raw, dtype="<i4").reshape(-1, num_layers, top_k).copy()
