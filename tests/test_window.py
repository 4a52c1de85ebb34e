"""Host counts -> LayerReport/WindowReport: the optional metrics and their sources."""

import math

import numpy as np
import pytest

from moewatch.accumulator import WindowCounts
from moewatch.adapters.base import RouterInfo
from moewatch.config import MoEWatchConfig
from moewatch.report import HealthState
from moewatch.window import WindowMeta, build_layer_report, build_window_report

INFO = RouterInfo(0, "layers.0.gate", "transformers", 4, 1)
CFG = MoEWatchConfig(min_fair_share=0)


def stats(e_max, probs=None, z=0.0, finite=0.0, dropped=0.0):
    s = np.zeros(e_max + 3)
    if probs is not None:
        s[: len(probs)] = probs
    s[e_max], s[e_max + 1], s[e_max + 2] = z, finite, dropped
    return s


def test_entropy_from_probabilities_and_z_loss_per_token():
    counts = np.array([10, 10, 10, 10, 0])
    # 40 tokens whose mean probability vector is (0.7, 0.1, 0.1, 0.1): the loads are uniform, the router is not
    layer = build_layer_report(INFO, counts, stats(4, [28, 4, 4, 4], z=80.0, finite=40), 40, 40, CFG)
    h = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    assert layer.entropy_source == "probs"
    assert layer.norm_entropy == pytest.approx(h / math.log(4), abs=1e-6)
    assert layer.load_cov == 0.0
    assert layer.z_loss == pytest.approx(2.0)
    assert layer.nonfinite == 0


def test_entropy_falls_back_to_loads_without_probabilities():
    counts = np.array([30, 10, 0, 0, 0])
    layer = build_layer_report(INFO, counts, stats(4), 40, 0, CFG)
    assert layer.entropy_source == "loads"
    assert layer.norm_entropy == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    assert layer.z_loss is None


def test_nonfinite_rows_and_invalid_ids():
    counts = np.array([10, 10, 10, 10, 3])
    layer = build_layer_report(INFO, counts, stats(4, [9, 9, 9, 9], z=1.0, finite=36), 43, 40, CFG)
    assert layer.nonfinite == 4
    assert layer.invalid_ids == 3


def test_expert_parallel_loads_and_their_cov():
    info = RouterInfo(0, "g", "transformers", 8, 1)
    counts = np.array([10, 10, 10, 10, 40, 0, 0, 0, 0])
    cfg = MoEWatchConfig(min_fair_share=0, expert_parallel_size=2)
    layer = build_layer_report(info, counts, stats(8), 80, 0, cfg)
    assert layer.ep_loads == [40, 40]
    assert layer.ep_load_cov == 0.0  # balanced across ranks even though experts are not
    cfg4 = MoEWatchConfig(min_fair_share=0, expert_parallel_size=4)
    assert build_layer_report(info, counts, stats(8), 80, 0, cfg4).ep_loads == [20, 20, 40, 0]
    cfg3 = MoEWatchConfig(min_fair_share=0, expert_parallel_size=3)  # 8 experts do not split in 3
    assert build_layer_report(info, counts, stats(8), 80, 0, cfg3).ep_loads is None


def test_dropped_ratio_estimated_from_capacity_factor_or_reported():
    counts = np.array([70, 10, 10, 10, 0])  # fair share 25
    cfg = MoEWatchConfig(min_fair_share=0, capacity_factor=1.25)  # capacity 31.25 per expert
    layer = build_layer_report(INFO, counts, stats(4), 100, 0, cfg)
    assert layer.dropped_ratio == pytest.approx((70 - 31.25) / 100)
    reported = build_layer_report(INFO, counts, stats(4, dropped=12.0), 100, 0, CFG)
    assert reported.dropped_ratio == pytest.approx(0.12)
    assert build_layer_report(INFO, counts, stats(4), 100, 0, CFG).dropped_ratio is None


def test_window_report_is_json_round_trippable_and_worst_state():
    infos = [RouterInfo(0, "a", "transformers", 4, 1), RouterInfo(1, "b", "transformers", 4, 1)]
    counts = WindowCounts(
        counts_LE1=np.array([[25, 25, 25, 25, 0], [100, 0, 0, 0, 0]]),
        stats_LS=np.stack([stats(4), stats(4)]),
        tokens_L=np.array([100, 100]),
        prob_tokens_L=np.array([0, 0]),
    )
    meta = WindowMeta("r", 3, 30, 40, 1.0, 2.0)
    report = build_window_report(infos, counts, meta, CFG)
    assert [layer.state for layer in report.layers] == [HealthState.HEALTHY, HealthState.COLLAPSED]
    assert report.state is HealthState.COLLAPSED and report.tokens == 100 and report.steps == 10
    again = type(report).model_validate_json(report.model_dump_json())
    assert again == report


def test_expert_rank_map_for_non_contiguous_placement():
    info = RouterInfo(0, "g", "transformers", 4, 1)
    counts = np.array([10, 20, 30, 40, 0])
    cfg = MoEWatchConfig(min_fair_share=0, expert_rank_map=[1, 0, 1, 0], expert_parallel_size=2)
    layer = build_layer_report(info, counts, stats(4), 100, 0, cfg)
    assert layer.ep_loads == [60, 40]  # the map wins over contiguous placement ([30, 70])


def test_all_invalid_ids_make_a_warning_layer_that_names_the_range():
    """The issue's router: every id 99 for E=8 (and a few -1). Before, this read insufficient_data."""
    info = RouterInfo(0, "layers.0.gate", "custom", 8, 2)
    counts = np.array([0] * 8 + [1000])
    layer = build_layer_report(info, counts, stats(8), 500, 0, CFG, invalid_below=10)
    assert layer.state is HealthState.WARNING
    assert layer.invalid_ids == 1000 and layer.invalid_ids_below == 10 and layer.assignments == 0
    assert layer.reasons == [
        "invalid_ids 1000 of 1000 expert ids outside [0, 8) (10 below 0, 990 >= 8): a broken router or adapter "
        "(warning)"
    ]


def test_window_report_takes_the_negative_ids_from_the_counts():
    info = RouterInfo(0, "g", "custom", 4, 1)
    counts = WindowCounts(
        counts_LE1=np.array([[25, 25, 25, 25, 7]]), stats_LS=np.array([stats(4, finite=0.0)]),
        tokens_L=np.array([107]), prob_tokens_L=np.array([0]), invalid_below_L=np.array([3]),
    )  # fmt: skip
    meta = WindowMeta(run="r", window=0, step_start=0, step_end=1, time_start=0.0, time_end=1.0)
    layer = build_window_report([info], counts, meta, CFG).layers[0]
    assert (layer.invalid_ids, layer.invalid_ids_below) == (7, 3)
    assert layer.state is HealthState.WARNING and "(3 below 0, 4 >= 4)" in layer.reasons[0]


def test_nonfinite_rows_make_an_even_layer_warning():
    counts = np.array([100, 100, 100, 100, 0])
    layer = build_layer_report(INFO, counts, stats(4, [90, 90, 90, 90], finite=360), 400, 400, CFG)
    assert layer.nonfinite == 40
    assert layer.state is HealthState.WARNING and layer.metric_states["nonfinite"] is HealthState.WARNING
    assert layer.reasons == ["nonfinite 40 of 400 sampled router output rows are NaN/inf (warning)"]
