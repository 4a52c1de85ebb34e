"""Turn one window's host counts into an immutable :class:`WindowReport` (CPU only, pure)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from moewatch import metrics
from moewatch.accumulator import WindowCounts
from moewatch.adapters.base import RouterInfo
from moewatch.config import MoEWatchConfig
from moewatch.health import OutputFaults, classify_layer, worst
from moewatch.noise import noise_floor
from moewatch.report import LayerReport, WindowReport

__all__ = ["WindowMeta", "build_layer_report", "build_window_report"]


@dataclass(frozen=True)
class WindowMeta:
    run: str
    window: int
    step_start: int
    step_end: int
    time_start: float
    time_end: float
    hook_errors: int = 0


def _round(x: float | None, nd: int = 6) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, nd)


def _ep_loads(loads: np.ndarray, ep_size: int | None, rank_map: list[int] | None) -> list[int] | None:
    """Assignments per expert-parallel rank: by ``rank_map`` (rank of each expert), else contiguous blocks."""
    if rank_map is not None:
        if len(rank_map) != loads.size:
            return None
        return [int(v) for v in np.bincount(np.asarray(rank_map), weights=loads, minlength=1).astype(np.int64)]
    if not ep_size or ep_size < 2 or loads.size % ep_size:
        return None
    return [int(v) for v in loads.reshape(ep_size, -1).sum(axis=1)]


def _dropped_ratio(loads: np.ndarray, reported: float, capacity_factor: float | None) -> float | None:
    total = loads.sum()
    if total <= 0:
        return None
    if reported > 0:
        return float(reported / total)
    if capacity_factor is None:
        return None
    # Window-level estimate: each expert keeps at most capacity_factor * fair share.
    cap = capacity_factor * total / loads.size
    return float(np.clip(loads - cap, 0, None).sum() / total)


def build_layer_report(
    info: RouterInfo,
    counts_E1: np.ndarray,
    stats_S: np.ndarray,
    tokens: int,
    prob_tokens: int,
    cfg: MoEWatchConfig,
    invalid_below: int = 0,
) -> LayerReport:
    """One layer's report; ``invalid_below``: how many of the invalid ids (column E) were below 0."""
    e, e_max = info.num_experts, stats_S.shape[0] - 3
    loads = counts_E1[:e].astype(np.int64)
    invalid = int(counts_E1[e:].sum())  # column E (and any unused columns of smaller routers)
    prob_sum, z_sum, finite_rows, dropped = stats_S[:e], stats_S[e_max], stats_S[e_max + 1], stats_S[e_max + 2]
    assignments = int(loads.sum())
    fair = assignments / e
    cov = metrics.load_cov(loads)
    dead = metrics.dead_expert_ids(loads, cfg.dead_fraction)
    share = metrics.top2_share(loads)
    excess = metrics.top2_excess(share, e, info.top_k)
    if prob_tokens > 0 and float(prob_sum.sum()) > 0:
        ent, source = metrics.norm_entropy(prob_sum), "probs"
    else:
        ent, source = metrics.norm_entropy(loads), "loads"
    dead_ratio = len(dead) / e
    nonfinite = max(int(round(prob_tokens - finite_rows)), 0)
    faults = OutputFaults(e, assignments, invalid, min(int(invalid_below), invalid), nonfinite, int(prob_tokens))
    noise = noise_floor(assignments, e, info.top_k, cfg.false_alarm_rate, cfg.dead_fraction)
    if source == "probs":  # the entropy estimate rests on the sampled tokens, not on every assignment
        floor = noise_floor(int(prob_tokens), e, 1, cfg.false_alarm_rate, cfg.dead_fraction).norm_entropy
        noise = replace(noise, norm_entropy=floor)
    cls = classify_layer(
        load_cov=cov,
        dead_ratio=dead_ratio,
        top2_excess=excess,
        norm_entropy=ent,
        fair_share=fair,
        min_fair_share=cfg.min_fair_share,
        thresholds=cfg.thresholds,
        noise=noise if cfg.noise_aware else None,
        faults=faults,
    )
    ep = _ep_loads(loads, cfg.expert_parallel_size, cfg.expert_rank_map)
    return LayerReport(
        index=info.index,
        module=info.module,
        family=info.family,
        num_experts=e,
        top_k=info.top_k,
        tokens=int(tokens),
        assignments=assignments,
        loads=[int(v) for v in loads],
        fair_share=round(fair, 6),
        load_cov=_round(cov),
        dead_experts=len(dead),
        dead_expert_ids=dead,
        dead_ratio=round(dead_ratio, 6),
        top2_share=_round(share),
        top2_excess=_round(excess),
        norm_entropy=_round(ent),
        entropy_source=source,
        max_violation=_round(metrics.max_violation(loads)),
        effective_experts=_round(metrics.effective_experts(loads)),
        z_loss=_round(z_sum / finite_rows) if finite_rows > 0 and z_sum > 0 else None,
        nonfinite=nonfinite,
        invalid_ids=invalid,
        invalid_ids_below=faults.invalid_below,
        dropped_ratio=_round(_dropped_ratio(loads, float(dropped), cfg.capacity_factor)),
        ep_loads=ep,
        ep_load_cov=_round(metrics.load_cov(ep)) if ep else None,
        state=cls.state,
        reasons=cls.reasons,
        noise_floor={name: _round(v) for name, v in noise.as_dict().items()},
        metric_states=cls.metric_states,
        not_enough_data=cls.not_enough_data,
    )


def build_window_report(
    routers: list[RouterInfo], counts: WindowCounts, meta: WindowMeta, cfg: MoEWatchConfig
) -> WindowReport:
    layers = [
        build_layer_report(
            info,
            counts.counts_LE1[i],
            counts.stats_LS[i],
            int(counts.tokens_L[i]),
            int(counts.prob_tokens_L[i]),
            cfg,
            int(counts.invalid_below_L[i]) if counts.invalid_below_L is not None else 0,
        )
        for i, info in enumerate(routers)
    ]
    return WindowReport(
        run=meta.run,
        window=meta.window,
        step_start=meta.step_start,
        step_end=meta.step_end,
        time_start=meta.time_start,
        time_end=meta.time_end,
        tokens=int(counts.tokens_L[0]) if len(counts.tokens_L) else 0,
        hook_errors=meta.hook_errors,
        layers=layers,
        state=worst(layer.state for layer in layers),
        stage=cfg.pipeline_stage,
        thresholds={**cfg.thresholds.model_dump(), "false_alarm_rate": cfg.false_alarm_rate},
    )
