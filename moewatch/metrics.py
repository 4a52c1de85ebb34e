"""Router-health metrics (README, "Metrics and health"), pure functions of one window's loads.

``loads`` is the assignment count per expert (length ``E``), ``A = sum(loads)``, fair share ``f = A / E``.
Every function returns ``None`` where the metric is undefined (no assignments; ``E == 1`` for entropy;
``2/E >= min(1, 2/k)`` for the top-2 excess).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "dead_expert_ids",
    "effective_experts",
    "entropy",
    "load_cov",
    "max_cov",
    "max_violation",
    "norm_entropy",
    "top2_excess",
    "top2_share",
]


def _arr(loads: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(loads, dtype=np.float64)


def load_cov(loads: Sequence[float] | np.ndarray) -> float | None:
    """Population std / mean of the loads; 0 is perfect balance."""
    x = _arr(loads)
    mean = x.mean() if x.size else 0.0
    if mean <= 0:
        return None
    return float(x.std() / mean)


def max_cov(num_experts: int, top_k: int) -> float:
    """Largest ``load_cov`` a top-k router can reach: k experts take every assignment."""
    return math.sqrt(num_experts / top_k - 1)


def dead_expert_ids(loads: Sequence[float] | np.ndarray, dead_fraction: float) -> list[int]:
    """Experts whose load is below ``dead_fraction`` of the fair share. With no assignments, none."""
    x = _arr(loads)
    total = x.sum()
    if total <= 0:
        return []
    fair = total / x.size
    return [int(i) for i in np.flatnonzero(x < dead_fraction * fair)]


def top2_share(loads: Sequence[float] | np.ndarray) -> float | None:
    """Share of all assignments taken by the two busiest experts (fair value ``2/E``)."""
    x = _arr(loads)
    total = x.sum()
    if total <= 0:
        return None
    top = np.sort(x)[-2:]
    return float(top.sum() / total)


def top2_excess(share: float | None, num_experts: int, top_k: int) -> float | None:
    """``top2_share`` on a 0..1 scale from the fair share ``2/E`` to the largest share two experts can take,
    ``min(1, 2/k)`` (each token picks k distinct experts)."""
    if share is None:
        return None
    fair = 2.0 / num_experts
    ceiling = min(1.0, 2.0 / top_k)
    if fair >= ceiling:
        return None
    return (share - fair) / (ceiling - fair)


def entropy(p: Sequence[float] | np.ndarray) -> float | None:
    """Shannon entropy (nats) of ``p`` after normalising it to sum 1."""
    x = _arr(p)
    total = x.sum()
    if not np.isfinite(total) or total <= 0:
        return None
    q = x[x > 0] / total
    return float(-(q * np.log(q)).sum())


def norm_entropy(p: Sequence[float] | np.ndarray) -> float | None:
    """``H(p) / ln(E)``: 1 is a uniform router. ``p`` is the window's mean router probability vector (or the
    load vector as a fallback); undefined for a single expert."""
    x = _arr(p)
    if x.size < 2:
        return None
    h = entropy(x)
    return None if h is None else h / math.log(x.size)


def max_violation(loads: Sequence[float] | np.ndarray) -> float | None:
    """MaxVio: ``(max L - mean L) / mean L``."""
    x = _arr(loads)
    mean = x.mean() if x.size else 0.0
    if mean <= 0:
        return None
    return float((x.max() - mean) / mean)


def effective_experts(loads: Sequence[float] | np.ndarray) -> float | None:
    """``exp(H(L/A))``: how many experts the layer really uses."""
    h = entropy(loads)
    return None if h is None else math.exp(h)
