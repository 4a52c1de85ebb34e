"""The transformers MoE sweep's machinery (used by tests/test_transformers_sweep.py and runnable as a script
to print the table: ``python tests/sweep_hf.py``): every model type transformers ships whose config names an
expert count, built from one generic tiny config (one or two layers, hidden 32, 4 experts, top-2) on the CPU,
trained one step with moewatch attached, its counts compared with the routers' own outputs.

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

import moewatch
from tests.fakes import quiet

E_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_moe_experts")
K_NAMES = ("num_experts_per_tok", "top_k", "moe_top_k", "top_k_experts", "moe_k", "num_experts_per_token")
VOCAB, BATCH, SEQ, E, K = 64, 2, 8, 4, 2

#: Tiny sizes, each applied where the config has a field of that name.
TINY: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 64,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "n_shared_experts": 1,
    "first_k_dense_replace": 0, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 2, "topk_group": 1, "num_dense_layers": 0,
    "d_model": 32, "num_layers": 2, "num_heads": 2, "d_ff": 32, "d_kv": 8, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 8, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "expert_layer_period": 1, "expert_layer_offset": 0, "moe_layer_freq": 1,
}  # fmt: skip


@dataclasses.dataclass
class Outcome:
    model_type: str
    status: str  # exact | mismatch | hook_errors | no_router | build_failed | step_failed
    detail: str = ""
    routers: int = 0


def moe_model_types() -> list[tuple[str, type, type]]:
    """(model_type, config class, model class) for every type whose config names an expert count and has a
    causal-LM (else base) model class."""
    out = []
    for mt, cname in CONFIG_MAPPING_NAMES.items():
        mname = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt) or MODEL_MAPPING_NAMES.get(mt)
        try:
            cls = getattr(transformers, cname, None)
            mcls = getattr(transformers, mname, None) if isinstance(mname, str) else None
        except ImportError:  # a model needing a package the tests do not install (torchvision)
            continue
        if cls is None or mcls is None:
            continue
        fields = set(getattr(cls, "__annotations__", {})) | set(getattr(cls, "attribute_map", {}))
        try:
            fields |= set(inspect.signature(cls.__init__).parameters)
        except (TypeError, ValueError):
            pass
        if fields & set(E_NAMES) or "ffn_config" in fields:
            out.append((mt, cls, mcls))
    return out


def tiny_config(cls: type, mla: bool = False) -> Any:
    """The generic tiny config; ``mla``: head_dim set to the rotary part (DeepSeek-style latent attention)."""
    cfg = cls()
    for name, value in TINY.items():
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    for names, value in ((E_NAMES, E), (K_NAMES, K)):
        for name in names:
            if hasattr(cfg, name) and (getattr(cfg, name) is None or isinstance(getattr(cfg, name), int)):
                try:
                    setattr(cfg, name, value)
                except AttributeError:  # a read-only alias
                    pass
    if mla and hasattr(cfg, "qk_rope_head_dim") and hasattr(cfg, "head_dim"):
        cfg.head_dim = cfg.qk_rope_head_dim
    for name in ("layer_types", "mlp_layer_types"):
        v = getattr(cfg, name, None)
        if isinstance(v, list) and v:
            setattr(cfg, name, v[: cfg.num_hidden_layers] if hasattr(cfg, "num_hidden_layers") else v)
    return cfg


def _chosen(out: Any, k: int, e: int) -> torch.Tensor | None:
    """The experts one router call chose, read from its own output: an integer [.., k] tensor it returns
    (dropping -1 markers), JetMoe's expert-size list, or Switch's argmax of the logits."""
    if isinstance(out, tuple):
        for o in out:
            if isinstance(o, torch.Tensor) and not o.is_floating_point() and o.dim() >= 1 and o.shape[-1] == k:
                return o[o >= 0]
        if len(out) == 5 and isinstance(out[3], list):
            sizes = torch.tensor(out[3], dtype=torch.int64)
            return torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
        floats = [o for o in out if isinstance(o, torch.Tensor) and o.is_floating_point() and o.shape[-1] == e]
        if len(out) == 2 and len(floats) == 2:  # Llama4 (scores, logits): top-k of the logits
            return torch.topk(out[1].detach(), k, dim=-1).indices
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.shape[-1] == e:  # logits only (DBRX)
        return torch.topk(out.detach(), k, dim=-1).indices
    return None


def _parent(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    return modules.get(name.rsplit(".", 1)[0]) if "." in name else None


def run_one(model_type: str, cls: type, mcls: type) -> Outcome:
    """The plain tiny config, then (for latent-attention configs whose step fails) the MLA variant."""
    first = _run_one(model_type, cls, mcls, mla=False)
    if first.status in ("build_failed", "step_failed") and hasattr(cls(), "qk_rope_head_dim"):
        return _run_one(model_type, cls, mcls, mla=True)
    return first


def _run_one(model_type: str, cls: type, mcls: type, mla: bool) -> Outcome:
    warnings.filterwarnings("ignore")
    try:
        torch.manual_seed(0)
        model = mcls(tiny_config(cls, mla)).train()
    except Exception as exc:
        return Outcome(model_type, "build_failed", f"{type(exc).__name__}: {str(exc)[:120]}")
    try:
        watch = moewatch.attach(model, **quiet(window_steps=1000, strict=False))
    except moewatch.NoRouterFoundError:
        return Outcome(model_type, "no_router")
    modules = dict(model.named_modules())
    refs: list[torch.Tensor] = []
    unread: list[str] = []
    handles = []
    for info in watch.routers:
        counts = torch.zeros(info.num_experts, dtype=torch.int64)
        refs.append(counts)
        experts = getattr(_parent(modules, info.module), "experts", None)
        # Routers that return only logits (transformers 5.0-5.5 DeepSeek-V3, GLM4-MoE, ...), or whose weight the
        # block uses without calling them (5.0-5.5 DeepSeek-V2), leave the choice to their MoE block, which hands
        # the ids to `experts(hidden_states, top_k_index, top_k_weights)`: the reference reads them there, and a
        # top-k of the logits only where there is no such call (DBRX).
        read_at_router: list[bool] = []
        pending: list[torch.Tensor] = []
        defer = isinstance(experts, nn.Module)

        def hook(m: nn.Module, a: Any, out: Any, counts: torch.Tensor = counts, info: Any = info,
                 defer: bool = defer, pending: list[torch.Tensor] = pending,
                 read_at_router: list[bool] = read_at_router) -> None:  # fmt: skip
            ids = _chosen(out, info.top_k, info.num_experts)
            if ids is None:
                unread.append(info.module)
            elif defer and isinstance(out, torch.Tensor):
                pending.append(ids)
            else:
                read_at_router.append(True)
                counts += torch.bincount(ids.reshape(-1).long(), minlength=info.num_experts)[: info.num_experts]

        def pre_hook(m: nn.Module, a: Any, counts: torch.Tensor = counts, info: Any = info,
                     pending: list[torch.Tensor] = pending, read_at_router: list[bool] = read_at_router) -> None:  # fmt: skip
            if read_at_router:
                read_at_router.pop()
                return
            ids = pending.pop() if pending else None
            if len(a) > 1 and isinstance(a[1], torch.Tensor) and not a[1].is_floating_point():
                ids = a[1]
            if ids is not None:
                counts += torch.bincount(ids.reshape(-1).long(), minlength=info.num_experts)[: info.num_experts]

        handles.append(modules[info.module].register_forward_hook(hook))
        if defer:
            handles.append(experts.register_forward_pre_hook(pre_hook))
    try:
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        kw: dict[str, Any] = {"input_ids": ids, "use_cache": False}
        if getattr(model.config, "is_encoder_decoder", False):
            kw["decoder_input_ids"] = ids
        out = model(**kw)
        logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        logits.float().pow(2).mean().backward()
        report = watch.flush()
    except Exception as exc:
        return Outcome(model_type, "step_failed", f"{type(exc).__name__}: {str(exc)[:120]}")
    finally:
        watch.close()
        for h in handles:
            h.remove()
    n = len(watch.routers)
    if watch.hook_errors:
        return Outcome(model_type, "hook_errors", f"{watch.hook_errors} of {n} routers", n)
    if unread:
        return Outcome(model_type, "mismatch", f"reference cannot read {unread[0]}", n)
    if report is None:
        return Outcome(model_type, "mismatch", "moewatch counted nothing", n)
    loads = [layer.loads for layer in report.layers]
    if loads != [r.tolist() for r in refs] or any(layer.tokens == 0 for layer in report.layers):
        return Outcome(model_type, "mismatch", f"{loads} != {[r.tolist() for r in refs]}"[:160], n)
    return Outcome(model_type, "exact", "", n)


def sweep() -> list[Outcome]:
    logging.disable(logging.WARNING)
    try:
        return [run_one(*t) for t in moe_model_types()]
    finally:
        logging.disable(logging.NOTSET)


if __name__ == "__main__":
    import sys
    import time

    sys.path.insert(0, ".")
    t0 = time.time()
    for o in sweep():
        print(f"{o.model_type:32s} {o.status:13s} {o.routers:3d} {o.detail}")
    print(f"{time.time() - t0:.1f}s")
