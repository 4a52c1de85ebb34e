"""``moewatch.attach``: the one line users write (a module named apart from the function it defines, so
importing it never replaces ``moewatch.attach`` on the lazily loaded package)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moewatch.adapters.discovery import discover_routers
from moewatch.alerting.sink import callback_alert_sink
from moewatch.compiled import refresh_compiled
from moewatch.config import MoEWatchConfig, build_config
from moewatch.errors import ConfigError
from moewatch.exporter.sink import prometheus_sink
from moewatch.monitor import Monitor, check_not_attached
from moewatch.sinks.base import Sink
from moewatch.sinks.factory import build_sinks

__all__ = ["attach"]

log = logging.getLogger(__name__)


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    config: MoEWatchConfig | None = None,
    *,
    sinks: list[Sink] | None = None,
    process_group: Any = None,
    routers: list[str] | Callable[[str, nn.Module], bool] | None = None,
    extractor: Callable[..., Any] | None = None,
    **overrides: Any,
) -> Monitor:
    """Find every router in ``model``, hook it, and start counting.

    Args:
        model: any ``nn.Module`` holding MoE routers.
        optimizer: steps are counted by its step post-hook. Without one, call ``watch.step()`` after each
            optimizer step; failing that, each training-mode forward of ``model`` counts as a step.
        config: a :class:`MoEWatchConfig`; by default one is read from ``MOEWATCH_*`` environment variables.
        sinks: extra sinks that receive every window report, after the configured ones.
        process_group: all-reduce counts over this group at every window end (every rank must take part);
            only its rank 0 emits to sinks (with ``prometheus.per_rank``, every rank also serves its own
            counts). Defaults to the world group when ``torch.distributed`` is initialised with more than one
            rank; pass ``False`` to count each rank on its own. With ``pipeline_stage`` set, pass the stage's
            data-parallel group: the world group is refused (it would mix the stages' layers).
        routers: only these modules are routers: glob patterns on dotted names (also the ``routers`` setting,
            ``MOEWATCH_ROUTERS``), or a predicate ``(name, module) -> bool``. Default: auto-detect.
        extractor: ``fn(module, inputs, output) -> moewatch.RouterOutput`` for the modules ``routers`` names,
            when they are no router family moewatch reads.
        **overrides: top-level config fields, e.g. ``window_steps=10``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"moewatch.attach expects a torch.nn.Module, got {type(model).__name__}")
    # A torch.compile'd module: attach to the module it wraps, so that names match the eager run (no
    # `_orig_mod.` prefix). If it has run compiled, its graphs would never call the new hooks: see
    # refresh_compiled below (one recompile).
    model = getattr(model, "_orig_mod", model) if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model
    check_not_attached(model)  # before any sink binds a port: a second attach must say what it is
    cfg = build_config(config, overrides)
    if process_group is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            if cfg.pipeline_stage is not None:
                # The world group holds every stage: its all-reduce would add other stages' layers to this
                # stage's (or fail on a different router count). Only the user knows the stage's DP group.
                raise ConfigError(
                    f"pipeline_stage={cfg.pipeline_stage} with the default (world) process group: pass "
                    "process_group= the data-parallel group of this stage (the ranks that hold the same layers), "
                    "or process_group=False to count each rank on its own"
                )
            process_group = torch.distributed.group.WORLD
    elif process_group is False:
        process_group = None
    if isinstance(routers, list | tuple):
        cfg = cfg.model_copy(update={"routers": list(routers)})  # globs are data: kept in the settings
        routers = None
    specs = discover_routers(model, cfg, routers=routers, extractor=extractor)
    rank_map = cfg.expert_rank_map
    if rank_map is not None:
        wrong = sorted({s.num_experts for s in specs if s.num_experts != len(rank_map)})
        if wrong or min(rank_map) < 0:
            raise ConfigError(
                f"expert_rank_map has {len(rank_map)} entries (min {min(rank_map)}) but routers have "
                f"{wrong} experts; give one non-negative rank per expert (MOEWATCH_EXPERT_RANK_MAP='[0, 0, 1, 1]')"
            )
    reporting = process_group is None or torch.distributed.get_rank(process_group) == 0
    if reporting:
        built = build_sinks(cfg)
    else:  # per_rank: every rank serves its own counts; nothing else leaves a non-reporting rank
        built = [s for s in [prometheus_sink(cfg)] if s is not None] if cfg.prometheus.per_rank else []
    all_sinks = built + list(sinks or [])
    try:
        monitor = Monitor(
            model,
            specs,
            cfg,
            optimizer=optimizer,
            sinks=all_sinks,
            process_group=process_group,
            alert_sink_factory=functools.partial(callback_alert_sink, cfg),
        )
    except BaseException:
        for s in all_sinks:
            s.close()
        raise
    refresh_compiled(model)
    log.info(
        "moewatch attached to %d routers (%s), window %d steps, run %r",
        len(specs), ", ".join(sorted({s.family for s in specs})), cfg.window_steps, cfg.run_name,
    )
    return monitor
