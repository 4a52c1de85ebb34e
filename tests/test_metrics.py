"""Hand-checked metric values (DESIGN section 2)."""

import math

import pytest

from moewatch import metrics as m


def test_load_cov_balanced_is_zero_and_known_value():
    assert m.load_cov([10, 10, 10, 10]) == 0.0
    # loads 2, 4, 6, 8: mean 5, population std sqrt(5)
    assert m.load_cov([2, 4, 6, 8]) == pytest.approx(math.sqrt(5) / 5)


@pytest.mark.parametrize("e,k", [(8, 1), (8, 2), (64, 2), (64, 8), (256, 8), (4, 4)])
def test_load_cov_reaches_sqrt_e_over_k_minus_1_when_k_experts_take_everything(e, k):
    loads = [100] * k + [0] * (e - k)
    assert m.load_cov(loads) == pytest.approx(m.max_cov(e, k))
    assert m.max_cov(e, k) == pytest.approx(math.sqrt(e / k - 1))


def test_one_expert_takes_everything_top1():
    loads = [640, 0, 0, 0, 0, 0, 0, 0]
    assert m.load_cov(loads) == pytest.approx(math.sqrt(7))
    assert m.top2_share(loads) == 1.0
    assert m.dead_expert_ids(loads, 0.01) == [1, 2, 3, 4, 5, 6, 7]
    assert m.max_violation(loads) == pytest.approx(7.0)
    assert m.effective_experts(loads) == pytest.approx(1.0)
    assert m.norm_entropy(loads) == pytest.approx(0.0)


def test_all_zero_window_is_undefined_not_an_error():
    loads = [0, 0, 0]
    assert m.load_cov(loads) is None
    assert m.top2_share(loads) is None
    assert m.max_violation(loads) is None
    assert m.effective_experts(loads) is None
    assert m.norm_entropy(loads) is None
    assert m.dead_expert_ids(loads, 0.01) == []
    assert m.top2_excess(None, 3, 1) is None


def test_single_expert():
    assert m.load_cov([5]) == 0.0
    assert m.top2_share([5]) == 1.0
    assert m.norm_entropy([5]) is None  # ln(1) = 0: undefined
    assert m.top2_excess(1.0, 1, 1) is None  # 2/E >= min(1, 2/k)
    assert m.effective_experts([5]) == pytest.approx(1.0)


def test_two_experts():
    assert m.load_cov([3, 1]) == pytest.approx(0.5)
    assert m.top2_share([3, 1]) == 1.0
    assert m.top2_excess(1.0, 2, 1) is None  # fair share 2/2 = 1 already is the ceiling
    assert m.norm_entropy([1, 1]) == pytest.approx(1.0)
    assert m.norm_entropy([3, 1]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2))


def test_dead_fraction_threshold_is_strictly_below():
    # fair share 100; 1% of it is 1.0: a load of 1 is alive, 0 is dead
    loads = [199, 200, 1, 0]
    assert m.dead_expert_ids(loads, 0.01) == [3]
    assert m.dead_expert_ids(loads, 0.02) == [2, 3]


def test_top2_excess_matches_the_seed_numbers_at_e64():
    # The seed: E=64 healthy up to ~6 %, collapsed above 40 %, for top-1 and top-2.
    for k in (1, 2):
        assert m.top2_excess(0.06, 64, k) == pytest.approx(0.0297, abs=1e-3)
        assert m.top2_excess(0.40, 64, k) == pytest.approx(0.381, abs=1e-3)
    assert m.top2_excess(2 / 64, 64, 2) == pytest.approx(0.0)
    # top-8 of 256: two experts can take at most 2/8 of the assignments
    assert m.top2_excess(0.25, 256, 8) == pytest.approx(1.0)


def test_entropy_and_effective_experts_uniform():
    assert m.norm_entropy([0.25] * 4) == pytest.approx(1.0)
    assert m.effective_experts([7, 7, 7, 7, 7]) == pytest.approx(5.0)
    assert m.effective_experts([1, 1, 0, 0]) == pytest.approx(2.0)


def test_max_violation_known_value():
    assert m.max_violation([10, 20, 30, 40]) == pytest.approx((40 - 25) / 25)
