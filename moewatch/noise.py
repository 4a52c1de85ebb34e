"""Sampling-noise floors: how far a perfectly balanced router's metrics stray by chance in one window.

A balanced top-``k`` router sends each of the window's ``T = A/k`` tokens to ``k`` distinct experts
drawn uniformly. Each load is then ``Binomial(T, k/E)`` with mean the fair share ``f = A/E`` and
variance ``f (1 - k/E)``, and the loads are negatively correlated (they sum to ``A``). From that,
closed forms (no simulation, so nothing to cache beyond an ``lru_cache``) bound each metric at a
false-alarm rate ``alpha`` per layer-window:

* ``load_cov``: ``sum (L_i - f)^2 / (f (E-k)/(E-1))`` is Pearson's statistic, about chi-square with
  ``E-1`` degrees of freedom (Wilson-Hilferty quantile), so the floor is
  ``sqrt(c * chi2_{E-1}(1-alpha) / A)`` with ``c = (E-k)/(E-1)``.
* ``norm_entropy`` (lower floor): ``ln E - H(L/A) ~= E/2 * sum (p_i - 1/E)^2``, the same statistic:
  ``1 - c * chi2_{E-1}(1-alpha) / (2 A ln E)`` (with a 10 % margin for the higher-order terms).
  When entropy comes from the router probabilities, the floor is that of the ``n`` sampled tokens with
  ``k = 1`` (``c = 1``): the mean of ``n`` probability vectors strays at most as far as ``n`` one-hot
  draws (confident routers), less for soft ones. ``n`` is the window's probability-token count, a
  ``probs_every``-th of its tokens, so sampling raises this floor honestly.
* ``top2_excess``: a union bound over the ``E(E-1)/2`` pairs with Bernstein's inequality for the pair's
  summed load (per-token contribution bounded by ``min(k, 2)``).
* ``dead_ratio``: each expert's exact binomial probability of falling below ``dead_fraction * f``, and
  a union bound over sets of experts for how many can be dead at once.

A metric's threshold is judged only where it is clear of its floor (see :mod:`moewatch.health`).
Tests check these floors against simulated balanced windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

__all__ = ["NoiseFloor", "noise_floor"]


@dataclass(frozen=True)
class NoiseFloor:
    """What a balanced router's metrics reach by chance with probability ``alpha`` in one window.

    ``load_cov``, ``top2_excess`` and ``dead_ratio`` are upper floors (a balanced router stays below them);
    ``norm_entropy`` is a lower floor (it stays above). ``None``: the metric is undefined for this router.
    """

    alpha: float
    load_cov: float | None
    top2_excess: float | None
    norm_entropy: float | None
    dead_ratio: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "load_cov": self.load_cov,
            "top2_excess": self.top2_excess,
            "norm_entropy": self.norm_entropy,
            "dead_ratio": self.dead_ratio,
        }


def _chi2_upper(dof: int, alpha: float) -> float:
    """Wilson-Hilferty approximation of the chi-square ``1 - alpha`` quantile (within about 1 % for dof >= 3;
    upward-biased below, which only makes floors more conservative)."""
    z = NormalDist().inv_cdf(1 - alpha)
    a = 2.0 / (9.0 * dof)
    return dof * max(1 - a + z * math.sqrt(a), 0.0) ** 3 + (2.0 * z * z if dof < 3 else 0.0)


def _binom_cdf_below(n: int, p: float, limit: float) -> float:
    """P(X < limit) for X ~ Binomial(n, p), exactly for up to 4000 terms, else Chernoff's bound."""
    m = math.ceil(limit) - 1  # largest integer strictly below limit
    if m < 0:
        return 0.0
    mean = n * p
    if m >= mean:
        return 1.0
    if m > 4000:
        x = mean - m
        return math.exp(-x * x / (2 * mean))
    if p >= 1:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    total = 0.0
    for j in range(0, m + 1):
        total += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq)
    return min(total, 1.0)


def _dead_floor(tokens: int, e: int, k: int, dead_fraction: float, alpha: float) -> float:
    f = tokens * k / e
    q = _binom_cdf_below(tokens, k / e, dead_fraction * f)
    # P(at least m+1 experts dead) <= C(E, m+1) q^(m+1); the floor is the smallest m with that <= alpha.
    for m in range(0, e):
        if q <= 0:
            return m / e
        log_p = math.lgamma(e + 1) - math.lgamma(m + 2) - math.lgamma(e - m) + (m + 1) * math.log(q)
        if log_p <= math.log(alpha):
            return m / e
    return 1.0


@lru_cache(maxsize=4096)
def noise_floor(assignments: int, num_experts: int, top_k: int, alpha: float = 1e-4, dead_fraction: float = 0.01) -> NoiseFloor:
    """Noise floors for one window of ``assignments`` over ``num_experts`` experts picked ``top_k`` per token."""
    if not 0 < alpha < 1:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {alpha}")
    e, k, a = num_experts, max(1, min(top_k, num_experts)), assignments
    if a <= 0 or e < 2:
        return NoiseFloor(alpha, None, None, None, None)
    tokens = max(a // k, 1)
    c = (e - k) / (e - 1)
    chi = _chi2_upper(e - 1, alpha)
    cov = math.sqrt(c * chi / a)
    ent = max(0.0, 1 - 1.1 * c * chi / (2 * a * math.log(e)))
    fair, ceiling = 2.0 / e, min(1.0, 2.0 / k)
    excess: float | None = None
    if fair < ceiling:
        f = a / e
        var_pair = 2 * f * (1 - k / e) * (1 - 1 / (e - 1))
        bound = float(min(k, 2))
        ell = math.log(e * (e - 1) / 2 / alpha)
        x = bound * ell / 3 + math.sqrt((bound * ell / 3) ** 2 + 2 * ell * var_pair)
        excess = min((x / a) / (ceiling - fair), 1.0)
    dead = _dead_floor(tokens, e, k, dead_fraction, alpha)
    return NoiseFloor(alpha, cov, excess, ent, dead)
