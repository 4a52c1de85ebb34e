"""Monitor.state_dict()/load_state_dict(): a resumed run continues its history, and a state from a model
with other routers is refused with the difference named."""

import json

import pytest
import torch

import moewatch
from tests.fakes import ToyMoE, expected_loads, quiet, tokens_for

A1 = [[0, 1], [0, 2], [1, 0], [0, 1]]  # expert 3 never picked
A2 = [[3, 2], [3, 0], [3, 1], [2, 1]]


def _steps(model, watch, assign, n):
    for _ in range(n):
        model(tokens_for(assign))
        watch.step()


def test_state_holds_cumulative_counts_and_dead_streaks_and_resume_continues_them():
    model = ToyMoE()
    with moewatch.attach(model, **quiet(window_steps=1)) as watch:
        _steps(model, watch, A1, 3)
        state = json.loads(json.dumps(watch.state_dict()))  # plain types: survives JSON and torch.save
    one = expected_loads(A1, 4)
    assert state["history"]["cumulative"] == [[3 * v for v in one]] * 2
    assert state["history"]["dead_streaks"] == [[0, 0, 0, 3]] * 2
    assert (state["step"], state["window"]) == (3, 3)

    model2 = ToyMoE()
    with moewatch.attach(model2, **quiet(window_steps=1)) as watch2:
        watch2.load_state_dict(state)
        _steps(model2, watch2, A1, 1)
        assert watch2.latest.window == 3 and watch2.latest.step_end == 4
        assert watch2.history.dead_streak_LE[0].tolist() == [0, 0, 0, 4]
        _steps(model2, watch2, A2, 1)
        assert watch2.history.dead_streak_LE[0].tolist() == [0, 0, 0, 0]
        two = expected_loads(A2, 4)
        assert watch2.history.cumulative_LE[1].tolist() == [4 * a + b for a, b in zip(one, two, strict=True)]


def test_torch_save_round_trip(tmp_path):
    model = ToyMoE()
    with moewatch.attach(model, **quiet(window_steps=2)) as watch:
        _steps(model, watch, A1, 4)
        torch.save(watch.state_dict(), tmp_path / "moewatch.pt")
    state = torch.load(tmp_path / "moewatch.pt", weights_only=True)
    model2 = ToyMoE()
    with moewatch.attach(model2, **quiet(window_steps=2)) as watch2:
        watch2.load_state_dict(state)
        assert watch2.history.cumulative_LE[0].tolist() == [4 * v for v in expected_loads(A1, 4)]


def _saved(**kw):
    model = ToyMoE(**kw)
    with moewatch.attach(model, **quiet(window_steps=1)) as watch:
        _steps(model, watch, A1, 1)
        return watch.state_dict()


@pytest.mark.parametrize(
    ("saved_kw", "load_kw", "match"),
    [
        ({"layers": 2}, {"layers": 3}, r"saved state has 2 routers, this model has 3"),
        ({"num_experts": 4}, {"num_experts": 6}, r"router 0 \(blocks\.0\.router\) has 4 experts in the saved state, 6"),
        ({"top_k": 2}, {"top_k": 1}, r"top_k=2 in the saved state, 1"),
    ],
)
def test_state_from_another_model_is_refused_naming_the_difference(saved_kw, load_kw, match):
    # issue 10, item 7: load_state_dict accepted another model's state without a word
    state = _saved(**saved_kw)
    with moewatch.attach(ToyMoE(**load_kw), **quiet()) as watch:
        with pytest.raises(ValueError, match=match):
            watch.load_state_dict(state)
        assert watch.step_count == 0  # nothing half-loaded


def test_renamed_module_is_refused_and_the_option_accepts_it(caplog):
    state = _saved()
    state["routers"][1]["module"] = "layers.1.gate"
    model = ToyMoE()
    with moewatch.attach(model, **quiet(window_steps=1)) as watch:
        with pytest.raises(moewatch.RouterMismatchError, match=r"'layers\.1\.gate' in the saved state, "
                                                               r"'blocks\.1\.router' in this model"):
            watch.load_state_dict(state)
        watch.load_state_dict(state, allow_router_mismatch=True)
        assert "other routers" in caplog.text
        assert watch.step_count == 1


def test_mismatch_option_restarts_history_that_does_not_fit():
    state = _saved(num_experts=4)
    with moewatch.attach(ToyMoE(num_experts=6), **quiet()) as watch:
        watch.load_state_dict(state, allow_router_mismatch=True)
        assert watch.history.cumulative_LE[0].tolist() == [0] * 6
        assert watch.step_count == 1
