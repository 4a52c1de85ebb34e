"""Health classification boundaries (DESIGN section 3)."""

import pytest

from moewatch.config import Thresholds
from moewatch.health import OutputFaults, classify_layer, worst
from moewatch.report import HealthState

H, W, C, INS = (HealthState.HEALTHY, HealthState.WARNING, HealthState.COLLAPSED, HealthState.INSUFFICIENT_DATA)

BASE = dict(load_cov=0.1, dead_ratio=0.0, top2_excess=0.0, norm_entropy=0.99, fair_share=100.0, min_fair_share=32)


def cls(**kw):
    return classify_layer(**{**BASE, **kw}, thresholds=Thresholds())


@pytest.mark.parametrize(
    "metric,value,state",
    [
        ("load_cov", 0.349, H), ("load_cov", 0.35, W), ("load_cov", 1.0, W), ("load_cov", 1.01, C),
        ("dead_ratio", 0.0, H), ("dead_ratio", 0.01, W), ("dead_ratio", 0.10, W), ("dead_ratio", 0.11, C),
        ("top2_excess", 0.03, H), ("top2_excess", 0.031, W), ("top2_excess", 0.38, W), ("top2_excess", 0.381, C),
        ("norm_entropy", 0.851, H), ("norm_entropy", 0.85, W), ("norm_entropy", 0.5, W), ("norm_entropy", 0.499, C),
        ("top2_excess", None, H), ("norm_entropy", None, H),
    ],
)
def test_each_metric_boundary(metric, value, state):
    result = cls(**{metric: value})
    assert result.state is state
    if state is not H:
        assert any(r.startswith(metric) for r in result.reasons)
    else:
        assert result.reasons == []


def test_layer_state_is_worst_metric_and_reasons_list_each():
    result = cls(load_cov=0.5, norm_entropy=0.3)
    assert result.state is C
    assert len(result.reasons) == 2


def test_noise_guard_reports_insufficient_data_even_when_metrics_look_collapsed():
    result = cls(load_cov=1.7, dead_ratio=0.5, fair_share=10.0)
    assert result.state is INS
    assert "min_fair_share" in result.reasons[0]


def test_thresholds_are_configurable():
    t = Thresholds(load_cov_warning=0.1, load_cov_collapsed=0.2)
    assert classify_layer(**{**BASE, "load_cov": 0.15}, thresholds=t).state is W
    assert classify_layer(**{**BASE, "load_cov": 0.25}, thresholds=t).state is C


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError, match="load_cov_warning"):
        Thresholds(load_cov_warning=2.0, load_cov_collapsed=1.0)


def test_worst():
    assert worst([H, W, INS]) is W
    assert worst([H, C, W]) is C
    assert worst([INS, INS]) is INS
    assert worst([]) is INS


# --- broken router outputs: non-finite rows and invalid ids (OutputFaults) ---------------------------


def test_all_invalid_ids_are_a_warning_never_insufficient_data():
    """A router whose every id is out of range has no valid assignment: that is a broken router or adapter,
    not "not enough data"."""
    faults = OutputFaults(8, assignments=0, invalid_ids=1024, invalid_below=0)
    result = cls(fair_share=0.0, load_cov=None, norm_entropy=None, faults=faults)
    assert result.state is W
    assert result.metric_states == {"invalid_ids": W}
    assert result.reasons == [
        "invalid_ids 1024 of 1024 expert ids outside [0, 8) (1024 >= 8): a broken router or adapter (warning)"
    ]
    assert classify_layer(**{**BASE, "fair_share": 0.0}, thresholds=Thresholds()).state is INS  # without: no data


def test_faults_make_a_healthy_or_thin_layer_warning_and_never_collapse_it():
    nan = OutputFaults(8, assignments=800, nonfinite=3, sampled_rows=400)
    result = cls(faults=nan)
    assert result.state is W and result.metric_states["nonfinite"] is W
    assert result.reasons == ["nonfinite 3 of 400 sampled router output rows are NaN/inf (warning)"]
    assert cls(fair_share=10.0, faults=nan).state is W  # below min_fair_share: still the fault, not INS
    both = cls(load_cov=1.7, faults=OutputFaults(8, 800, invalid_ids=5, invalid_below=2, nonfinite=1))
    assert both.state is C  # the loads' own state; a fault alone never makes a layer collapsed
    assert [r.split()[0] for r in both.reasons] == ["nonfinite", "invalid_ids", "load_cov"]
    assert "(2 below 0, 3 >= 8)" in both.reasons[1]
    assert cls(faults=OutputFaults(8, 800)).state is H  # no fault, no change
