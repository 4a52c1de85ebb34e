"""Noise-aware health: balanced routers never alarm; thresholds inside the noise read "not enough data"."""

import numpy as np
import pytest

from moewatch.adapters.base import RouterInfo
from moewatch.config import MoEWatchConfig, Thresholds
from moewatch.health import classify_layer
from moewatch.noise import noise_floor
from moewatch.report import HealthState
from moewatch.window import build_layer_report

CFG = MoEWatchConfig()


def _stats(e: int) -> np.ndarray:
    return np.zeros(e + 3)


def _k_distinct_loads(rng: np.random.Generator, windows: int, tokens: int, e: int, k: int) -> np.ndarray:
    """Exact balanced top-k routing: every token picks k distinct experts uniformly."""
    picks = np.argsort(rng.random((windows, tokens, e)), axis=2)[:, :, :k]
    out = np.zeros((windows, e), dtype=np.int64)
    for w in range(windows):
        out[w] = np.bincount(picks[w].ravel(), minlength=e)
    return out


def _states(loads_WE: np.ndarray, e: int, k: int, tokens: int) -> list[HealthState]:
    info = RouterInfo(0, "gate", "test", e, k)
    states = []
    for loads in loads_WE:
        counts = np.append(loads, 0)
        states.append(build_layer_report(info, counts, _stats(e), tokens, 0, CFG).state)
    return states


def test_balanced_router_at_320_tokens_raises_no_warning_in_1000_windows():
    rng = np.random.default_rng(0)
    loads = _k_distinct_loads(rng, 1000, 320, 8, 2)
    states = _states(loads, 8, 2, 320)
    assert HealthState.WARNING not in states and HealthState.COLLAPSED not in states
    # without the noise floors the same windows alarm (the tiny Mixtral: top2_excess 0.10 > 0.03)
    legacy = [
        classify_layer(load_cov=None, dead_ratio=0.0, top2_excess=(np.sort(x)[-2:].sum() / 640 - 0.25) / 0.75,
                       norm_entropy=None, fair_share=80.0, thresholds=Thresholds()).state
        for x in loads
    ]
    assert legacy.count(HealthState.WARNING) > 500


@pytest.mark.parametrize("e,k", [(8, 2), (256, 8)])
def test_balanced_router_at_4m_tokens_raises_no_warning_in_1000_windows(e, k):
    rng = np.random.default_rng(1)
    tokens = 4_000_000
    # multinomial draws of T*k assignments: slightly noisier than k distinct picks, so a harder test
    loads = rng.multinomial(tokens * k, np.full(e, 1 / e), size=1000)
    states = _states(loads, e, k, tokens)
    assert set(states) == {HealthState.HEALTHY}


def test_floors_are_calibrated_against_simulation():
    """At alpha = 1 % the simulated exceedance of each floor is at most about 1 % (a bound, so usually less)."""
    rng = np.random.default_rng(2)
    e, k, tokens, alpha = 8, 2, 160, 0.01
    loads = _k_distinct_loads(rng, 4000, tokens, e, k)
    a = tokens * k
    nf = noise_floor(a, e, k, alpha)
    cov = loads.std(axis=1) / loads.mean(axis=1)
    top2 = (np.sort(loads, axis=1)[:, -2:].sum(axis=1) / a - 2 / e) / (1 - 2 / e)
    p = loads / a
    ent = -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1) / np.log(e)
    assert (cov > nf.load_cov).mean() <= 2 * alpha
    assert (top2 > nf.top2_excess).mean() <= 2 * alpha
    assert (ent < nf.norm_entropy).mean() <= 2 * alpha
    # and the floors are not vacuous: the cov floor is within 40 % of the simulated 99th percentile
    assert nf.load_cov < 1.4 * np.quantile(cov, 1 - alpha)


def test_noise_floors_shrink_with_assignments_and_are_reported():
    small, big = noise_floor(640, 8, 2), noise_floor(8_000_000, 8, 2)
    assert big.load_cov < small.load_cov / 50
    assert big.norm_entropy > small.norm_entropy
    info = RouterInfo(0, "gate", "test", 8, 2)
    layer = build_layer_report(info, np.array([80] * 8 + [0]), _stats(8), 320, 0, CFG)
    assert layer.noise_floor["load_cov"] == pytest.approx(small.load_cov, rel=1e-5)
    assert set(layer.noise_floor) == {"load_cov", "top2_excess", "norm_entropy", "dead_ratio"}


def test_threshold_inside_the_noise_reads_not_enough_data_with_the_reason():
    info = RouterInfo(0, "gate", "test", 8, 2)
    # 320 tokens: top2_excess 0.10 (a warning by the table) is inside the noise floor (about 0.12)
    loads = np.array([100, 92, 78, 78, 78, 72, 72, 70, 0])
    layer = build_layer_report(info, loads, _stats(8), 320, 0, CFG)
    assert layer.metric_states["top2_excess"] is HealthState.INSUFFICIENT_DATA
    assert "not enough data" in layer.not_enough_data["top2_excess"]
    assert "warning threshold 0.03" in layer.not_enough_data["top2_excess"]
    assert layer.state is HealthState.HEALTHY  # load_cov and entropy are judged and fine
    # a real collapse is still collapsed: the collapsed threshold is clear of the noise
    collapsed = build_layer_report(info, np.array([300, 300, 10, 10, 10, 10, 0, 0, 0]), _stats(8), 320, 0, CFG)
    assert collapsed.state is HealthState.COLLAPSED


def test_deprecated_min_fair_share_still_works():
    info = RouterInfo(0, "gate", "test", 8, 2)
    cfg = MoEWatchConfig(min_fair_share=100)
    layer = build_layer_report(info, np.array([80] * 8 + [0]), _stats(8), 320, 0, cfg)
    assert layer.state is HealthState.INSUFFICIENT_DATA
    assert "min_fair_share" in layer.reasons[0]


def test_false_alarm_rate_is_validated():
    with pytest.raises(ValueError, match="false_alarm_rate"):
        noise_floor(100, 8, 2, 0.0)


def test_noise_aware_can_be_switched_off():
    info = RouterInfo(0, "gate", "test", 8, 2)
    loads = np.array([100, 92, 78, 78, 78, 72, 72, 70, 0])
    layer = build_layer_report(info, loads, _stats(8), 320, 0, MoEWatchConfig(noise_aware=False))
    assert layer.state is HealthState.WARNING and layer.noise_floor["top2_excess"] is not None


def test_probability_entropy_is_judged_against_the_noise_of_its_sampled_tokens():
    """Entropy from the router probabilities rests on the sampled tokens (``probs_every``), not on every
    assignment: a balanced, confident router seen on 16 sampled tokens of 4096 reads entropy 0.72 by chance,
    which is inside the noise of 16 tokens (the loads' floor, 0.999 at 8192 assignments, would call it a
    warning)."""
    rng = np.random.default_rng(3)
    e, k, tokens, sampled = 8, 2, 4096, 16
    info = RouterInfo(0, "gate", "test", e, k)
    loads = _k_distinct_loads(rng, 1, tokens, e, k)[0]
    stats = _stats(e)
    stats[:e] = np.bincount(np.repeat(np.arange(5), [5, 4, 4, 2, 1]), minlength=e)  # 16 near-one-hot rows
    stats[e + 1] = sampled  # finite rows
    layer = build_layer_report(info, np.append(loads, 0), stats, tokens, sampled, CFG)
    assert layer.entropy_source == "probs" and 0.5 < layer.norm_entropy < 0.85
    assert layer.noise_floor["norm_entropy"] == pytest.approx(noise_floor(sampled, e, 1).norm_entropy)
    assert layer.metric_states["norm_entropy"] is HealthState.INSUFFICIENT_DATA
    assert layer.state is HealthState.HEALTHY
    # the same mean probability vector over 4096 sampled tokens is a real warning
    stats[:e] *= tokens / sampled
    stats[e + 1] = tokens
    assert build_layer_report(info, np.append(loads, 0), stats, tokens, tokens, CFG).state is HealthState.WARNING
