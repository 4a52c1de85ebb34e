"""Helpers for the tests that build the real MoE frameworks (requirements-frameworks.txt).

``require(name)`` imports a framework; outside CI a missing one skips the test, with ``CI=true`` it fails
it (``.ci/run`` installs them all). The CPU shims below are test-side only: each patches one call that
the real package hard-wires to CUDA or to a GPU-only extension, and says which in its docstring.

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k, ``H`` hidden size.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests import gloo
from tests.ci import require_module

__all__ = [
    "gloo_world",
    "megablocks_router_module",
    "megatron_cpu",
    "norm_entropy",
    "probs_of",
    "require",
    "z_loss",
]


def require(name: str) -> types.ModuleType:
    """Import ``name``; skip when it is missing, fail instead when ``CI=true``."""
    return require_module(name, "install requirements-frameworks.txt")


@contextmanager
def gloo_world() -> Iterator[None]:
    """A one-process gloo group on a free loopback port (Megatron's and DeepSpeed's constructors ask for
    process groups); reuses one that is already initialised."""
    if dist.is_initialized():
        yield
        return
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(gloo.free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def megatron_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Megatron-Core 0.16.1 on the CPU. Three shims, all test-side:

    * ``Router.gating`` moves the router weight (and bias) to ``torch.cuda.current_device()`` on every
      call, and ``TopKRouter`` allocates its expert-bias buffers there: while the test runs,
      ``torch.cuda.current_device()`` answers ``"cpu"``, so both stay on the CPU.
    * ``moe_utils`` references ``te_general_gemm`` which is only defined when Transformer Engine is
      installed; the shim defines it as ``None`` (the non-TE branch Megatron itself takes).
    * Megatron's activation recompute (``CheckpointFunction``) saves and restores the CUDA RNG state;
      the shim hands it the CPU generator's state instead, and restoring it is left to the CPU part
      (``torch.set_rng_state``) that Megatron already does.

    Yields a ``ProcessGroupCollection`` of the one-process gloo group for the router/layer constructors.
    """
    require("megatron.core")
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
    monkeypatch.setattr(tp_random, "_get_cuda_rng_state", lambda *a, **kw: torch.get_rng_state())
    monkeypatch.setattr(tp_random, "_set_cuda_rng_state", lambda *a, **kw: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    with gloo_world():
        g = dist.new_group([0])
        yield ProcessGroupCollection(tp=g, cp=g, tp_cp=g, tp_dp_cp=g, ep=g, expt_tp=g, expt_dp=g, tp_ep=g, pp=g)


def megablocks_router_module() -> types.ModuleType:
    """``megablocks.layers.router`` (0.10.0). Importing ``megablocks`` imports its compiled
    ``megablocks_ops`` CUDA extension, which a CPU build does not produce; the ``LearnedRouter`` forward
    never calls it, so an empty stand-in module is registered before the import (test-side only)."""
    if "megablocks_ops" not in sys.modules:
        try:
            importlib.import_module("megablocks_ops")
        except ImportError:
            sys.modules["megablocks_ops"] = types.ModuleType("megablocks_ops")
    return require("megablocks.layers.router")


def probs_of(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """The router's probability vector per token, as DESIGN.md defines it (sigmoid scores normalised)."""
    if score_func == "sigmoid":
        s_TE = logits_TE.double().sigmoid()
        return s_TE / s_TE.sum(dim=-1, keepdim=True)
    return logits_TE.double().softmax(dim=-1)


def norm_entropy(probs_TE: torch.Tensor) -> float:
    p_E = probs_TE.double().mean(dim=0)
    return float(-(p_E * p_E.clamp_min(1e-300).log()).sum() / math.log(p_E.numel()))


def z_loss(logits_TE: torch.Tensor) -> float:
    return float(torch.logsumexp(logits_TE.double(), dim=-1).pow(2).mean())


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Reference gating product in float64."""
    return F.linear(x.double(), w.double(), None if b is None else b.double())
