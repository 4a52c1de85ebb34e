"""Router families, recognised by structure (attributes, children, weight shapes) and read by output.

Each ``match_*`` returns a :class:`RouterSpec` or ``None``; each ``_read_*`` turns one call's output
into a :class:`RouterOutput` using tensor metadata only (no host synchronisation).

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moewatch.adapters.base import RouterOutput, RouterSpec, ScoreFunc, find_int_attr, map_choices
from moewatch.errors import UnreadableRouterError

__all__ = ["MATCHERS", "match_linear_gate", "linear_gate_spec"]

_E_NAMES = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts", "num_moe_experts")
_K_NAMES = ("top_k", "num_experts_per_tok", "moe_top_k", "moe_router_topk", "k", "topk", "experts_per_token")
_SCORE_ATTRS = (
    "score_func",
    "scoring_func",
    "score_fn",
    "scoring_function",
    "moe_router_score_function",
    "router_score_function",
)
_ROUTER_NAME = re.compile(r"router|gate|gating", re.IGNORECASE)


@functools.cache
def _forward_is_sigmoid(cls: type) -> bool:
    """transformers routers hard-code their score function in ``forward`` (Llama4: sigmoid, no softmax);
    read the names its bytecode uses."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    names = set(code.co_names) if code is not None else set()
    return "sigmoid" in names and "softmax" not in names


def _score_func(module: nn.Module, *others: Any) -> ScoreFunc:
    for obj in (module, *others):
        if obj is None:
            continue
        if hasattr(obj, "e_score_correction_bias"):  # DeepSeek-V3 / GLM4-MoE: sigmoid scores + bias
            return "sigmoid"
        for holder in (obj, getattr(obj, "config", None)):
            for attr in _SCORE_ATTRS:
                v = getattr(holder, attr, None)
                if isinstance(v, nn.Sigmoid) or (isinstance(v, str) and v.lower() == "sigmoid"):
                    return "sigmoid"
    return "sigmoid" if _forward_is_sigmoid(type(module)) else "softmax"


def _router_weight_experts(module: nn.Module) -> int | None:
    """E from a [E, H] routing weight held directly (``weight``) by the module, if any."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0])
    return None


def _topk_indices(logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(logits_TE.detach(), k, dim=-1, sorted=False).indices


# --- Hugging Face transformers 5.x -------------------------------------------------------------


@functools.cache
def _first_output_is_probs(cls: type) -> bool:
    """Gemma4-style routers return ``(router_probabilities, weights, indices)``: their ``forward`` names a
    probability tensor and no logits."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    names = code.co_varnames if code is not None else ()
    return any("prob" in n for n in names) and not any("logit" in n for n in names)


def _read_hf(spec: RouterSpec):
    k, sf = spec.top_k, spec.score_func
    probs_first = _first_output_is_probs(type(spec.module))

    def read(module: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:
        if (
            isinstance(out, tuple)
            and len(out) in (3, 4)
            and isinstance(out[2], torch.Tensor)
            and not out[2].is_floating_point()
        ):
            # (router_logits_TE, top_scores_TK, top_indices_TK): Mixtral, Qwen*-MoE, OLMoE, DeepSeek-V3, ...
            # Inkling adds a 4th output (shared-expert gammas); its logits are the routed experts' only.
            if probs_first:
                return RouterOutput(indices_TK=out[2], probs_TE=out[0])
            return RouterOutput(indices_TK=out[2], logits_TE=out[0], score_func=sf)
        if isinstance(out, tuple) and len(out) == 5 and isinstance(out[4], torch.Tensor):
            # JetMoe: (index_sorted_experts, batch_index, batch_gates, expert_size, logits_TE); its choice is
            # logits.topk(k), which a top-k of the same logits reproduces exactly.
            logits = out[4]
            return RouterOutput(indices_TK=_topk_indices(logits, k), logits_TE=logits, score_func=sf)
        if isinstance(out, tuple) and len(out) == 2 and not out[1].is_floating_point():
            # AFMoE in transformers 5.0-5.x: (top_scores_TK, indices_TK), no logits (sigmoid + expert bias).
            return RouterOutput(indices_TK=out[1])
        if isinstance(out, tuple) and len(out) == 2:
            # Llama4: (router_scores_TE, router_logits_TE), sigmoid of the top-k logits.
            logits = out[1]
            return RouterOutput(indices_TK=_topk_indices(logits, k), logits_TE=logits, score_func=sf)
        raise TypeError(
            f"unrecognised output of {type(module).__name__}: expected (logits, scores, indices[, shared]), "
            f"(scores, logits), (scores, indices) or JetMoe's 5-tuple, got {_describe(out)}"
        )

    return read


def _describe(out: Any) -> str:
    if isinstance(out, tuple):
        return f"a {len(out)}-tuple of ({', '.join(type(o).__name__ for o in out)})"
    return type(out).__name__


def _gating_experts(module: nn.Module) -> int | None:
    """E of the router's gating projection: its own ``weight`` [E, H], else its only Linear child."""
    w_e = _router_weight_experts(module)
    if w_e is not None:
        return w_e
    linears = [m for m in module.children() if isinstance(m, nn.Linear)]
    return linears[0].out_features if len(linears) == 1 else None


def match_hf_topk(name: str, module: nn.Module, parent: nn.Module | None, cfg: Any) -> RouterSpec | None:
    """A ``*Router``/``*Gate`` module that knows its E and k and holds an [E, H] gating projection."""
    cls = type(module).__name__
    if not _ROUTER_NAME.search(cls):
        return None
    e = find_int_attr([module], _E_NAMES[:2])
    k = find_int_attr([module], ("top_k", "num_experts_per_tok", "top_k_experts"))
    if e is None or k is None or e < 2:
        return None
    # Inkling's weight is [E + shared, H]: the shared experts' gammas come from the same projection.
    shared = find_int_attr([module], ("n_shared_experts",)) or 0
    if _gating_experts(module) not in (e, e + shared):
        return None
    spec = RouterSpec(name, module, module, "transformers", e, k, _noop, score_func=_score_func(module))
    if not _forward_chooses(type(module)):
        return _hf_choice_in_parent(spec, parent)
    spec.extract = _read_hf(spec)
    return spec


#: Names a router's ``forward`` uses when it makes the top-k choice itself.
_CHOOSING_NAMES = frozenset({"topk", "top_k", "argsort", "sort", "argmax", "max", "route_tokens_to_experts"})


@functools.cache
def _forward_chooses(cls: type) -> bool:
    """False for a router whose ``forward`` only projects to logits (transformers 5.0-5.5 DeepSeek-V3,
    GLM4-MoE, dots1, ...: the MoE block chooses in ``route_tokens_to_experts``); read from its bytecode."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return code is None or bool(_CHOOSING_NAMES & set(code.co_names))


def _experts_index_position(experts: Any) -> int | None:
    """Where transformers' experts module (``forward(hidden_states, top_k_index, top_k_weights)``, under
    ``@use_experts_implementation`` in every 5.x) takes the chosen expert ids, counted after ``self``."""
    if not isinstance(experts, nn.Module):
        return None
    try:
        params = list(inspect.signature(experts.forward).parameters)
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params[:3]):
        if "index" in p or "indices" in p:
            return i
    return None


def _read_hf_experts(spec: RouterSpec, position: int):
    sf = spec.score_func

    def read(module: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:
        # The experts module's own input is the model's choice (score function, correction bias and group
        # limits applied); the logits come from the router, stashed by its hook earlier in this forward (None
        # when the block reads the router's weight without calling it: DeepSeek-V2 in transformers 5.0-5.5).
        return RouterOutput(indices_TK=args[position], logits_TE=spec.extra.pop("stash", None), score_func=sf)

    return read


def _read_at_experts(spec: RouterSpec, parent: nn.Module | None, logits: bool = True) -> bool:
    """Count ``spec``'s router at its MoE block's ``experts`` call, if the block has a readable one; with
    ``logits``, the router's output (or its first element) is stashed as the logits."""
    experts = getattr(parent, "experts", None)
    position = _experts_index_position(experts)
    if position is None:
        return False
    spec.hook_module = experts
    spec.extract = _read_hf_experts(spec, position)
    if logits:
        spec.extra["logits_module"] = spec.module
    return True


def _transformers_version() -> str:
    import transformers  # loaded: the caller found one of its classes

    return str(transformers.__version__)


def _hf_choice_in_parent(spec: RouterSpec, parent: nn.Module | None) -> RouterSpec:
    """A logits-only router: count the ids its MoE block hands to the ``experts`` module, or refuse."""
    if _read_at_experts(spec, parent):
        return spec
    under = ""
    if type(spec.module).__module__.startswith("transformers."):
        under = f" under transformers {_transformers_version()}"
    raise UnreadableRouterError(
        f"moewatch: router {spec.name!r} ({type(spec.module).__name__}) returns only its logits{under}, and "
        f"its MoE block ({type(parent).__name__}) chooses the "
        "experts without handing them to an `experts(hidden_states, top_k_index, top_k_weights)` module, so a "
        "top-k of the logits would not be the model's choice. Use a transformers release whose router returns "
        "its choice, or attach(..., routers=[...], extractor=fn) returning a moewatch.RouterOutput"
    )


def _read_switch(module: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:
    # (expert_index one-hot after capacity, max prob, router_logits): count the router's choice (argmax),
    # and what capacity dropped from the one-hot mask.
    onehot, _, logits = out
    indices = logits.detach().argmax(dim=-1, keepdim=True)
    dropped = indices.numel() - onehot.sum()
    return RouterOutput(indices_TK=indices, logits_TE=logits, dropped=dropped)


def _read_top2_capacity(module: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:
    # NLLB-MoE: (top_1_mask, combine weights [T, E] after capacity, logits). The second expert may be
    # sampled, so the non-zero combine weights are the only record of the choice (after capacity).
    _, weights_TE, logits = out
    return RouterOutput(routing_map_TE=weights_TE != 0, logits_TE=logits)


def match_switch(name: str, module: nn.Module, parent: nn.Module | None, cfg: Any) -> RouterSpec | None:
    """Capacity-based routers holding a ``classifier`` Linear: Switch (top-1), NLLB-MoE (top-2)."""
    clf = getattr(module, "classifier", None)
    if not (_ROUTER_NAME.search(type(module).__name__) and isinstance(clf, nn.Linear)):
        return None
    if not hasattr(module, "expert_capacity"):
        return None
    if hasattr(module, "second_expert_policy"):
        return RouterSpec(name, module, module, "nllb", clf.out_features, 2, _read_top2_capacity)
    return RouterSpec(name, module, module, "switch", clf.out_features, 1, _read_switch)


def _read_logits_only(spec: RouterSpec):
    k, sf = spec.top_k, spec.score_func

    def read(module: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:
        logits = out[0] if isinstance(out, tuple) else out
        return RouterOutput(indices_TK=_topk_indices(logits, k), logits_TE=logits, score_func=sf)

    return read


def match_logits_only(name: str, module: nn.Module, parent: nn.Module | None, cfg: Any) -> RouterSpec | None:
    """DBRX-style: a ``*Router`` module holding one Linear, returning logits; k lives on the parent."""
    if not re.search(r"router", type(module).__name__, re.IGNORECASE):
        return None
    linears = [m for m in module.children() if isinstance(m, nn.Linear)]
    if len(linears) != 1 or linears[0].out_features < 2:
        return None
    # A router that states its E and whose only Linear has another width projects down first (Zaya's
    # down_proj -> router MLP): that Linear's outputs are not logits over experts.
    stated = find_int_attr([module], _E_NAMES)
    if stated is not None and stated != linears[0].out_features:
        return None
    k = find_int_attr([module, parent], _K_NAMES) or (cfg.top_k if cfg is not None else None)
    if k is None:
        return None
    spec = RouterSpec(name, module, module, "logits", linears[0].out_features, k, _noop, _score_func(module, parent))
    spec.extract = _read_logits_only(spec)
    return spec


def match_hf_block_choice(name: str, module: nn.Module, parent: nn.Module | None, cfg: Any) -> RouterSpec | None:
    """A transformers ``*Router``/``*Gate`` that does not state its E and k (5.0-5.5 PhiMoE, ERNIE-4.5-MoE,
    Aria), inside a MoE block that does and hands its choice to ``experts(hidden, top_k_index, weights)``:
    counted there. Its outputs differ by model (PhiMoE's first is dense routing weights, not logits), so
    no logits are read: loads and every count-based metric, no probability statistics."""
    if parent is None or not _ROUTER_NAME.search(type(module).__name__):
        return None
    e = find_int_attr([parent], _E_NAMES)
    k = find_int_attr([parent], _K_NAMES)
    if e is None or k is None or e < 2 or _gating_experts(module) != e:
        return None
    spec = RouterSpec(name, module, module, "transformers", e, k, _noop, _score_func(module, parent))
    return spec if _read_at_experts(spec, parent, logits=False) else None


# --- Megatron-Core, DeepSpeed, torchtitan, MegaBlocks -----------------------------------------


def _recomputed_logits(
    args: tuple[Any, ...], weight: torch.Tensor, bias: torch.Tensor | None = None
) -> Callable[[], torch.Tensor] | None:
    """Router logits for routers that return none, as a ``RouterOutput.logits_fn``: one extra [T, H] x [H, E]
    product (plus the router's own bias, if it has one), the size of the gating itself, on the calls that
    sample the probabilities only (input jitter, if any, is not reproduced)."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0].detach()

    def logits() -> torch.Tensor:
        b = bias.detach().to(x.dtype) if isinstance(bias, torch.Tensor) else None
        return F.linear(x.reshape(-1, x.shape[-1]), weight.detach().to(x.dtype), b)

    return logits


def _recompute(cfg: Any) -> bool:
    return bool(getattr(cfg, "recompute_logits", True))


def _megatron_choices(module: nn.Module, logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Megatron's top-k before capacity, from the recomputed logits (``topk_routing_with_score_function``
    without groups): softmax is monotone, so the top-k of the logits; sigmoid: of the scores plus the
    expert bias, when the router has one."""
    scores_TE = logits_TE
    if getattr(module, "score_function", "softmax") == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE.float())
        bias_E = getattr(module, "expert_bias", None)
        if isinstance(bias_E, torch.Tensor):
            scores_TE = scores_TE + bias_E.detach().to(scores_TE.dtype)
    return _topk_indices(scores_TE, k)


def _read_megatron(spec: RouterSpec, recompute: bool):
    sf, k = spec.score_func, spec.top_k
    mcfg = spec.module.config
    capacity = getattr(mcfg, "moe_expert_capacity_factor", None) is not None
    # Group-limited routing (DeepSeek-V3 style) is not reproduced: with groups, counts stay post-drop.
    pre_drop = capacity and not getattr(mcfg, "moe_router_num_groups", None)

    def read(module: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:
        # (probs_TE zero outside the top-k, routing_map_TE bool, after any capacity drop): probs are no
        # distribution, so the probability vector comes from logits recomputed with the router's own weight
        # and bias. With a capacity factor, the choices before the drop are the top-k of those logits (one
        # extra gating product per call; input jitter is not reproduced), and the drop is what the routing
        # map lost.
        _, routing_map = out
        bias = getattr(module, "bias", None)
        if pre_drop:
            logits_fn = _recomputed_logits(args, module.weight, bias)
            if logits_fn is not None:
                logits_TE = logits_fn()
                dropped = routing_map.shape[0] * k - routing_map.sum()
                return RouterOutput(
                    indices_TK=_megatron_choices(module, logits_TE, k), logits_TE=logits_TE if recompute else None,
                    score_func=sf, dropped=dropped,
                )
        logits_fn = _recomputed_logits(args, module.weight, bias) if recompute else None
        dropped = routing_map.shape[0] * k - routing_map.sum() if capacity else None
        return RouterOutput(
            routing_map_TE=routing_map, logits_fn=logits_fn, score_func=sf, dropped=dropped,
            choice_fn=lambda: map_choices(routing_map, out[0], k),  # probs are zero off the map, ordered on it
        )

    return read


def match_megatron(name: str, module: nn.Module, parent: nn.Module | None, cfg: Any) -> RouterSpec | None:
    mcfg = getattr(module, "config", None)
    if mcfg is None or not hasattr(mcfg, "moe_router_topk") or not hasattr(mcfg, "num_moe_experts"):
        return None
    if not re.search(r"router", type(module).__name__, re.IGNORECASE):
        return None
    e, k = int(mcfg.num_moe_experts), int(mcfg.moe_router_topk)
    if _router_weight_experts(module) != e:
        return None
    spec = RouterSpec(name, module, module, "megatron", e, k, _noop, _score_func(module))
    spec.extract = _read_megatron(spec, _recompute(cfg))
    return spec


def _deepspeed_choice(out: tuple[Any, ...], k: int) -> torch.Tensor:
    """The kept choices ``[S, k]`` of a DeepSpeed gate call, after capacity (-1 where dropped): the sparse
    indices of the 7-tuple, or the dispatch mask's experts ordered by combine weight."""
    if len(out) == 7:  # indices [K, S] (a tensor, or one [S] tensor per k)
        idx = out[3]
        return (torch.stack(list(idx)) if isinstance(idx, (list, tuple)) else idx).reshape(k, -1).t()
    combine_SEC, dispatch_SEC = out[1], out[2]
    return map_choices(dispatch_SEC.bool().any(dim=-1), combine_SEC.sum(dim=-1), k)


def _read_deepspeed(recompute: bool):
    def read(module: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:
        # (l_aux, combine_weights_SEC, dispatch_mask_SEC, exp_counts_E), or with Tutel
        # (l_aux, C, E, [indices_S], [locations_S], [gates_S], exp_counts_E). exp_counts are the gating
        # decisions before capacity, with RSample noise and top-2 Gumbel sampling: a top-k of the logits
        # would not reproduce them. TopKGate calls F.linear on wg.weight, so wg's own hooks never fire.
        counts_E = out[-1]
        x = args[0]
        # Dropped: the 4-tuple's dispatch mask holds the kept assignments; the sparse-routes 7-tuple that
        # DeepSpeed's own MOELayer asks for flags each dropped route with expert index -1.
        if len(out) == 4:
            dropped = counts_E.sum() - out[2].sum()
        elif len(out) == 7 and isinstance(out[3], torch.Tensor):
            dropped = (out[3] < 0).sum()
        else:
            dropped = None
        logits_fn = _recomputed_logits(args, module.wg.weight) if recompute else None
        return RouterOutput(
            counts_E=counts_E, num_tokens=x.numel() // x.shape[-1], logits_fn=logits_fn, dropped=dropped,
            choice_fn=lambda: _deepspeed_choice(out, module.k),
        )

    return read


def match_deepspeed(name: str, module: nn.Module, parent: nn.Module | None, cfg: Any) -> RouterSpec | None:
    """DeepSpeed ``TopKGate``: a ``wg`` Linear [H -> E] and an int ``k``."""
    wg = getattr(module, "wg", None)
    k = getattr(module, "k", None)
    if not isinstance(wg, nn.Linear) or not isinstance(k, int) or "gate" not in type(module).__name__.lower():
        return None
    return RouterSpec(name, module, module, "deepspeed", wg.out_features, k, _read_deepspeed(_recompute(cfg)))


def _read_torchtitan(spec: RouterSpec):
    sf = spec.score_func

    def read(module: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:
        # (top_scores_TK, selected_experts_indices_TK, num_tokens_per_expert_E); logits come from the
        # `gate` child, stashed by its own hook during this same forward.
        logits = spec.extra.pop("stash", None)
        return RouterOutput(indices_TK=out[1], logits_TE=logits, score_func=sf)

    return read


def match_torchtitan(name: str, module: nn.Module, parent: nn.Module | None, cfg: Any) -> RouterSpec | None:
    gate = getattr(module, "gate", None)
    if not isinstance(gate, nn.Linear) or not hasattr(module, "score_func"):
        return None
    e = find_int_attr([module], ("num_experts",))
    k = find_int_attr([module], ("top_k",))
    if e is None or k is None or "router" not in type(module).__name__.lower():
        return None
    spec = RouterSpec(name, module, module, "torchtitan", e, k, _noop, _score_func(module))
    spec.extract = _read_torchtitan(spec)
    spec.extra["logits_module"] = gate
    return spec


def _read_megablocks(module: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:
    # (scores_TE softmax over all experts, expert_weights_TK, expert_indices_TK)
    scores, _, indices = out
    return RouterOutput(indices_TK=indices, probs_TE=scores)


def match_megablocks(name: str, module: nn.Module, parent: nn.Module | None, cfg: Any) -> RouterSpec | None:
    layer = getattr(module, "layer", None)
    args = getattr(module, "args", None)
    if not isinstance(layer, nn.Linear) or args is None or not hasattr(args, "moe_top_k"):
        return None
    return RouterSpec(name, module, module, "megablocks", layer.out_features, int(args.moe_top_k), _read_megablocks)


# --- plain nn.Linear gate ---------------------------------------------------------------------


def linear_gate_spec(name: str, module: nn.Linear, k: int, family: str = "linear") -> RouterSpec:
    spec = RouterSpec(name, module, module, family, module.out_features, k, _noop)
    spec.extract = _read_logits_only(spec)
    return spec


def match_linear_gate(name: str, module: nn.Module, parent: nn.Module | None, cfg: Any) -> RouterSpec | None:
    """A bare ``nn.Linear`` named gate/router/wg next to an ``experts`` sibling, k from the parent or config.
    Excludes one-output gates such as Qwen2-MoE's ``shared_expert_gate``."""
    if type(module) is not nn.Linear or module.out_features < 2 or parent is None:
        return None
    if name.rsplit(".", 1)[-1] not in ("gate", "router", "wg", "gating", "switch"):
        return None
    if not hasattr(parent, "experts"):
        return None
    k = find_int_attr([parent], _K_NAMES) or (cfg.top_k if cfg is not None else None)
    if k is None:
        return None
    spec = linear_gate_spec(name, module, k)
    # A transformers MoE block (5.0-5.5 DeepSeek-V2: sigmoid/group-limited choice, and the gate's weight used
    # without calling it) hands its choice to `experts(...)`: read it there, not as a top-k of the logits.
    _read_at_experts(spec, parent)
    return spec


def _noop(module: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:  # replaced after construction
    raise AssertionError("extractor not bound")


#: Tried in order on every module; the first match claims it (and its children).
MATCHERS = (
    match_megatron,
    match_deepspeed,
    match_torchtitan,
    match_megablocks,
    match_switch,
    match_hf_topk,
    match_logits_only,
    match_hf_block_choice,
    match_linear_gate,
)
