"""Find every router in a model."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moewatch.adapters.base import RouterOutput, RouterSpec, find_int_attr
from moewatch.adapters.families import _E_NAMES, _K_NAMES, MATCHERS, _transformers_version, linear_gate_spec
from moewatch.errors import ConfigError, MoEWatchError

__all__ = ["NoRouterFoundError", "discover_routers"]

log = logging.getLogger(__name__)

_LOOKED_FOR = (
    "transformers *TopKRouter/*Router modules (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3, GPT-OSS, Llama4, Gemma4, "
    "DBRX, Switch, NLLB-MoE, ...), Megatron-Core TopKRouter, DeepSpeed TopKGate, torchtitan TokenChoiceTopKRouter, "
    "MegaBlocks LearnedRouter, and nn.Linear gates named gate/router/wg beside an `experts` module"
)


class NoRouterFoundError(MoEWatchError, ValueError):
    """The model holds nothing moewatch recognises as a router."""


def _parents(model: nn.Module) -> dict[str, nn.Module | None]:
    parents: dict[str, nn.Module | None] = {"": None}
    for name, module in model.named_modules():
        for child_name, _ in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = module
    return parents


def _selected(name: str, module: nn.Module, routers: Any) -> bool:
    if callable(routers):
        return bool(routers(name, module))
    return any(fnmatch.fnmatchcase(name, pat) for pat in routers)


def _ids_fit(ids_TK: torch.Tensor, k: int) -> bool:
    """``[..., K]`` ids with ``K == top_k``, or flat ``[T * K]`` ids: shapes only, no device read."""
    if ids_TK.dim() >= 2:
        return ids_TK.shape[-1] == k
    return ids_TK.dim() == 1 and ids_TK.shape[0] % k == 0


def _ids_mismatch(name: str, ids_TK: torch.Tensor, k: int) -> str:
    per_token = f"{ids_TK.shape[-1]} expert ids per token" if ids_TK.dim() >= 2 else f"{ids_TK.numel()} flat ids"
    return (
        f"the extractor for {name!r} returned indices_TK of shape {tuple(ids_TK.shape)} ({per_token}) but the "
        f"router's top_k is {k}: its tokens (ids / top_k) and every k-dependent metric would be wrong. Pass "
        f"attach(..., top_k=K) with the router's real K, or return indices_TK of shape [T, {k}]"
    )


def _custom_spec(
    name: str, module: nn.Module, parent: nn.Module | None, cfg: Any, extractor: Callable[..., Any]
) -> RouterSpec:
    e = cfg.num_experts or find_int_attr([module, parent], _E_NAMES)
    if e is None and isinstance(module, nn.Linear):
        e = module.out_features
    k = cfg.top_k or find_int_attr([module, parent], _K_NAMES) or 1
    if e is None:
        raise ConfigError(
            f"moewatch: router {name!r} ({type(module).__name__}) uses a custom extractor but exposes no "
            "expert count; pass num_experts=E to attach()"
        )

    def read(mod: nn.Module, args: tuple[Any, ...], out: Any) -> RouterOutput:
        result = extractor(mod, args, out)
        if not isinstance(result, RouterOutput):
            raise TypeError(f"extractor for {name!r} returned {type(result).__name__}, not moewatch.RouterOutput")
        ids = result.indices_TK
        if ids is not None and not _ids_fit(ids, k):
            raise ValueError(_ids_mismatch(name, ids, k))
        return result

    return RouterSpec(name, module, module, "custom", int(e), int(k), read)


def _match(name: str, module: nn.Module, parent: nn.Module | None, cfg: Any) -> RouterSpec | None:
    for matcher in MATCHERS:
        spec = matcher(name, module, parent, cfg)
        if spec is not None:
            return spec
    return None


def discover_routers(
    model: nn.Module,
    cfg: Any,
    *,
    routers: list[str] | Callable[[str, nn.Module], bool] | None = None,
    extractor: Callable[..., Any] | None = None,
) -> list[RouterSpec]:
    """Routers in module order. With ``routers`` (default ``cfg.routers``: glob patterns, or a predicate
    ``(name, module) -> bool``) only the named modules are considered, and each of them must be readable (by
    a known family, ``extractor``, or as a Linear gate with ``cfg.top_k``)."""
    if routers is None:
        routers = cfg.routers
    if extractor is not None and routers is None:
        raise ConfigError(
            "moewatch: extractor= reads the modules named by routers=; pass both, e.g. "
            "attach(model, routers=['layers.*.moe.router'], extractor=fn)"
        )
    parents = _parents(model)
    specs: list[RouterSpec] = []
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed):
            continue
        parent = parents.get(name)
        if routers is not None:
            if not _selected(name, module, routers):
                continue
            if extractor is not None:
                spec = _custom_spec(name, module, parent, cfg, extractor)
            else:
                spec = _match(name, module, parent, cfg)
                if spec is None and isinstance(module, nn.Linear) and module.out_features < 2:
                    raise ValueError(
                        f"moewatch: {name!r} matched `routers` but is an nn.Linear with "
                        f"{module.out_features} output, not a router over experts (a shared-expert gate such "
                        "as Qwen2-MoE's `shared_expert_gate`?); narrow the pattern, e.g. routers=['*.mlp.gate']"
                    )
                if spec is None and isinstance(module, nn.Linear):
                    k = cfg.top_k or find_int_attr([parent], _K_NAMES)
                    if k is None:
                        raise ValueError(
                            f"moewatch: {name!r} is a plain nn.Linear gate; tell moewatch its k with "
                            "attach(..., top_k=K)"
                        )
                    spec = linear_gate_spec(name, module, k)
                if spec is None:
                    raise ValueError(
                        f"moewatch: {name!r} ({type(module).__name__}) was named in `routers` but is not a "
                        "router family moewatch can read; pass extractor=fn(module, inputs, output) -> "
                        "moewatch.RouterOutput"
                    )
        else:
            spec = _match(name, module, parent, cfg)
            if spec is None:
                continue
        if spec.top_k > spec.num_experts:
            raise ValueError(f"moewatch: router {name!r} has top_k={spec.top_k} > num_experts={spec.num_experts}")
        specs.append(spec)
        claimed.append(name)
    if not specs:
        where = (
            f"no module matched routers={routers!r}"
            if routers is not None
            else f"moewatch looked for {_LOOKED_FOR}"
        )
        raise NoRouterFoundError(
            f"moewatch found no MoE router in {type(model).__name__}: {where}. Point moewatch at your router "
            "with attach(model, routers=['layers.*.moe.gate'], top_k=2) for nn.Linear gates, or add "
            "extractor=fn(module, inputs, output) -> moewatch.RouterOutput for anything else."
        )
    _warn_outside_tested_transformers(specs)
    log.debug("moewatch found %d routers: %s", len(specs), [s.name for s in specs])
    return specs


#: The transformers releases moewatch is tested with (the `test` extra and the README say the same).
TESTED_TRANSFORMERS = (5, 6)


def _warn_outside_tested_transformers(specs: list[RouterSpec]) -> None:
    if not any(type(s.module).__module__.startswith("transformers.") for s in specs):
        return
    version = _transformers_version()
    try:
        major = int(version.split(".", 1)[0])
    except ValueError:
        return
    if not TESTED_TRANSFORMERS[0] <= major < TESTED_TRANSFORMERS[1]:
        log.warning(
            "moewatch: transformers %s is outside the tested range (>=%d.0,<%d); its routers are read by "
            "structure and may be counted wrong. Use transformers 5.x, or check the counts against your model's "
            "own choice",
            version,
            *TESTED_TRANSFORMERS,
        )
