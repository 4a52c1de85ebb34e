"""Monitor behaviour with deterministic routers: exact counts, step sources, windows, hooks, sinks."""

import json
import logging

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moewatch
from moewatch.report import HealthState
from moewatch.sinks import JsonlSink
from tests.fakes import ToyMoE, expected_loads, quiet, tokens_for

A1 = [[0, 1], [0, 2], [1, 3], [0, 1]]
A2 = [[3, 2], [3, 0], [3, 1], [2, 1], [0, 1]]


class Keep:
    def __init__(self):
        self.reports = []

    def emit(self, report):
        self.reports.append(report)

    def close(self):
        pass


def train_step(model, opt, x):
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()


def test_routers_found_and_exact_counts_per_window():
    model = ToyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    keep = Keep()
    watch = moewatch.attach(model, optimizer=opt, sinks=[keep], **quiet(window_steps=2))
    assert [(r.index, r.module, r.family, r.num_experts, r.top_k) for r in watch.routers] == [
        (0, "blocks.0.router", "transformers", 4, 2),
        (1, "blocks.1.router", "transformers", 4, 2),
    ]
    train_step(model, opt, tokens_for(A1))
    assert keep.reports == []
    train_step(model, opt, tokens_for(A2))
    assert len(keep.reports) == 1
    r = keep.reports[0]
    assert (r.window, r.step_start, r.step_end) == (0, 0, 2)
    for layer in r.layers:  # both routers read the same ids
        assert layer.loads == expected_loads(A1 + A2, 4)
        assert layer.tokens == len(A1) + len(A2)
        assert layer.assignments == 2 * (len(A1) + len(A2))
    train_step(model, opt, tokens_for(A1))
    r2 = watch.flush()
    assert (r2.window, r2.step_start, r2.step_end) == (1, 2, 3)
    assert r2.layers[0].loads == expected_loads(A1, 4)  # buffers were zeroed at the previous window end
    assert watch.latest is r2
    watch.close()


def test_eval_mode_and_no_grad_eval_are_not_counted():
    model = ToyMoE()
    with moewatch.attach(model, **quiet()) as watch:
        model.eval()
        with torch.no_grad():
            model(tokens_for(A1))
        model.train()
        model(tokens_for(A2))
        assert watch.flush().layers[0].loads == expected_loads(A2, 4)


def test_count_eval_counts_eval_forwards():
    model = ToyMoE().eval()
    with moewatch.attach(model, **quiet(count_eval=True)) as watch:
        model(tokens_for(A1))
        assert watch.flush().layers[0].loads == expected_loads(A1, 4)


def test_count_eval_under_inference_mode_then_training_keeps_counting():
    """An inference-mode eval forward first (count_eval) must not leave inference tensors that the training
    calls after it cannot update in place: the CPU sampling workspace (E < 16) is made as a normal tensor."""
    model = ToyMoE().eval()
    with moewatch.attach(model, **quiet(count_eval=True, probs_every=1)) as watch:
        with torch.inference_mode():
            model(tokens_for(A1))
        model.train()
        model(tokens_for(A1))  # as many tokens as the eval call: the same workspace
        report = watch.flush()
        assert watch.hook_errors == 0
        assert report.layers[0].loads == expected_loads(A1 + A1, 4)
        assert report.layers[0].nonfinite == 0 and report.layers[0].entropy_source == "probs"


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_recompute_is_not_counted(reentrant):
    model = ToyMoE(layers=1)
    x = tokens_for(A2).requires_grad_(True)
    with moewatch.attach(model, **quiet()) as watch:
        out = checkpoint(model, x, use_reentrant=reentrant)
        out.sum().backward()  # re-runs the router forward inside the autograd engine
        assert watch.flush().layers[0].loads == expected_loads(A2, 4)


def test_gradient_accumulation_counts_every_micro_batch_and_steps_once():
    model = ToyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with moewatch.attach(model, optimizer=opt, **quiet(window_steps=100)) as watch:
        for micro in (A1, A2, A1):
            model(tokens_for(micro)).sum().backward()
        opt.step()
        assert watch.step_count == 1
        assert watch.flush().layers[1].loads == expected_loads(A1 + A2 + A1, 4)


def test_manual_step_without_optimizer():
    model = ToyMoE()
    keep = Keep()
    with moewatch.attach(model, sinks=[keep], **quiet(window_steps=3)) as watch:
        for _ in range(3):
            model(tokens_for(A1))
            model(tokens_for(A1))  # two micro-batches per step
            watch.step()
        assert watch.step_count == 3
        assert len(keep.reports) == 1
        assert keep.reports[0].layers[0].loads == expected_loads(A1 * 6, 4)


def test_root_forward_starts_a_new_step_when_nothing_else_counts_steps():
    model = ToyMoE()
    keep = Keep()
    with moewatch.attach(model, sinks=[keep], **quiet(window_steps=2)) as watch:
        for _ in range(5):
            model(tokens_for(A1))  # forwards 2..5 each end the previous step
        model.eval()
        model(tokens_for(A1))  # eval forwards are not steps
        assert watch.step_count == 4
        assert [r.step_end for r in keep.reports] == [2, 4]
        assert keep.reports[0].layers[0].loads == expected_loads(A1 * 2, 4)


def test_close_restores_the_model_exactly():
    torch.manual_seed(0)
    model = ToyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = tokens_for(A2)
    before = model(x).detach().clone()
    watch = moewatch.attach(model, optimizer=opt, **quiet())
    assert all(len(b["router"]._forward_hooks) == 1 for b in model.blocks)
    watch.close()
    watch.close()  # idempotent
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert len(opt._optimizer_step_post_hooks) == 0
    assert torch.equal(model(x), before)
    moewatch.attach(model, **quiet()).close()  # attaching again after close is fine


def test_attaching_twice_is_a_clear_error():
    model = ToyMoE()
    with moewatch.attach(model, **quiet()):
        with pytest.raises(moewatch.AlreadyAttachedError, match="already attached"):
            moewatch.attach(model, **quiet())


def test_model_without_router_explains_how_to_point_at_one():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(moewatch.NoRouterFoundError) as err:
        moewatch.attach(model, **quiet())
    msg = str(err.value)
    assert "TopKRouter" in msg and "routers=" in msg and "extractor=" in msg


def test_invalid_ids_and_nonfinite_logits_are_counted_not_fatal():
    model = ToyMoE(layers=1)
    x = tokens_for([[0, 9], [-1, 2], [1, 2]])
    x[2, 5] = float("nan")  # token 2's logits become NaN
    with moewatch.attach(model, **quiet()) as watch:
        model(x)
        layer = watch.flush().layers[0]
    assert layer.invalid_ids == 2
    assert layer.loads == [1, 1, 2, 0]
    assert layer.nonfinite == 1
    assert layer.norm_entropy is not None  # the finite tokens still give a probability vector


def test_hook_error_is_logged_once_counted_and_router_skipped(caplog):
    model = ToyMoE()
    broken = model.blocks[0]["router"]
    bad = tokens_for(A1)
    with moewatch.attach(model, **quiet(strict=False)) as watch:
        broken.top_k = 99  # make its indices unreadable: index width no longer matches
        orig = broken.forward
        broken.forward = lambda x: (orig(x)[0], orig(x)[1], torch.zeros(2, 3, 4, 5))
        with caplog.at_level(logging.WARNING, logger="moewatch"):
            model(bad)
            model(bad)
        assert watch.hook_errors == 1
        assert sum("skipped from now on" in r.message for r in caplog.records) == 1
        report = watch.flush()
        assert report.hook_errors == 1
        assert report.layers[1].loads == expected_loads(A1 * 2, 4)  # the healthy router still counts


def test_strict_reraises_hook_errors():
    model = ToyMoE()
    router = model.blocks[0]["router"]
    orig = router.forward
    router.forward = lambda x: (orig(x)[0], orig(x)[1], "not a tensor")
    with moewatch.attach(model, **quiet(strict=True)):
        with pytest.raises((AttributeError, TypeError)):
            model(tokens_for(A1))


def test_a_failing_sink_never_reaches_the_training_loop():
    class Boom:
        def emit(self, report):
            raise RuntimeError("disk on fire")

        def close(self):
            raise RuntimeError("still on fire")

    model = ToyMoE()
    keep = Keep()
    watch = moewatch.attach(model, sinks=[Boom(), keep], **quiet(window_steps=1, strict=False))
    model(tokens_for(A1))
    watch.step()
    assert len(keep.reports) == 1  # the sink after the failing one still got the report
    watch.close()


def test_jsonl_sink_writes_one_parseable_line_per_window(tmp_path):
    path = tmp_path / "runs" / "w.jsonl"
    model = ToyMoE()
    with moewatch.attach(model, **quiet(window_steps=1, jsonl={"path": path}, run_name="jtest")) as watch:
        for a in (A1, A2):
            model(tokens_for(a))
            watch.step()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["run"] == "jtest" and first["layers"][0]["loads"] == expected_loads(A1, 4)
    reports = JsonlSink.read(path)
    assert [r.step_end for r in reports] == [1, 2]


def test_unwritable_jsonl_path_names_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="MOEWATCH_JSONL__PATH"):
        moewatch.attach(ToyMoE(), **quiet(jsonl={"path": blocker / "w.jsonl"}))


def test_state_dict_round_trip_keeps_step_and_window_numbers():
    model = ToyMoE()
    with moewatch.attach(model, **quiet(window_steps=2)) as watch:
        for _ in range(5):
            model(tokens_for(A1))
            watch.step()
        state = watch.state_dict()
    assert state["step"] == 5 and state["window"] == 2
    model2 = ToyMoE()
    with moewatch.attach(model2, **quiet(window_steps=2)) as watch2:
        watch2.load_state_dict(state)
        model2(tokens_for(A1))
        watch2.step()
        report = watch2.flush()
    assert (report.window, report.step_start, report.step_end) == (2, 5, 6)


def test_collapsed_window_states_and_reasons():
    model = ToyMoE(num_experts=8, top_k=2, layers=1)
    assign = [[0, 1]] * 200  # two experts take everything
    with moewatch.attach(model, **quiet(min_fair_share=32)) as watch:
        model(tokens_for(assign))
        layer = watch.flush().layers[0]
    assert layer.state is HealthState.COLLAPSED
    assert layer.load_cov == pytest.approx(3**0.5, rel=1e-6)  # sqrt(E/k - 1)
    assert layer.dead_experts == 6 and layer.dead_expert_ids == [2, 3, 4, 5, 6, 7]
    assert layer.top2_share == 1.0
    assert any("load_cov" in r for r in layer.reasons)


def test_insufficient_data_window():
    model = ToyMoE(num_experts=8, layers=1)
    with moewatch.attach(model, **quiet(min_fair_share=32)) as watch:
        model(tokens_for([[0, 1]] * 10))
        report = watch.flush()
    assert report.state is HealthState.INSUFFICIENT_DATA
    assert report.layers[0].load_cov is not None  # raw metrics are still reported


def test_console_table_shows_each_layer_and_state():
    from rich.console import Console

    from moewatch.sinks.console import ConsoleSink

    console = Console(record=True, width=160)
    sink = ConsoleSink(console=console)
    model = ToyMoE(num_experts=8, layers=2)
    with moewatch.attach(model, sinks=[sink], **quiet(min_fair_share=1)) as watch:
        model(tokens_for([[0, 1]] * 50))
        watch.flush()
    text = console.export_text()
    assert "blocks.0.router" in text and "blocks.1.router" in text
    assert "collapsed" in text and "1.732" in text and "6/8" in text


def test_expert_rank_map_must_fit_the_routers():
    with pytest.raises(moewatch.ConfigError, match="expert_rank_map has 3 entries"):
        moewatch.attach(ToyMoE(num_experts=4), **quiet(expert_rank_map=[0, 1, 1]))


def test_probs_every_samples_probability_statistics_but_counts_every_call():
    model = ToyMoE(layers=1)
    with moewatch.attach(model, **quiet(probs_every=3)) as watch:
        for _ in range(7):  # calls 0, 3, 6 carry probability statistics
            model(tokens_for(A1))
        assert watch._acc.prob_tokens_L == [3 * len(A1)]
        layer = watch.flush().layers[0]
    assert layer.loads == expected_loads(A1 * 7, 4)  # exact
    assert layer.tokens == 7 * len(A1)
    assert layer.entropy_source == "probs" and layer.z_loss is not None


def test_default_samples_probabilities_from_the_first_call_of_every_window():
    model = ToyMoE(layers=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    settings = {k: v for k, v in quiet(window_steps=2).items() if k != "probs_every"}
    with moewatch.attach(model, optimizer=opt, **settings) as watch:
        assert watch.config.probs_every == 32
        for window in range(3):  # windows of 2 steps x 20 calls
            for step in range(2):
                for _ in range(20):
                    model(tokens_for(A1))
                if step == 1:  # calls 0 and 32 of this window were sampled (not 40 and 72, or 64, of the run)
                    assert watch._acc.prob_tokens_L == [2 * len(A1)], window
                opt.step()
            layer = watch.latest.layers[0]
            assert layer.loads == expected_loads(A1 * 40, 4) and layer.tokens == 40 * len(A1)
            assert layer.entropy_source == "probs" and layer.z_loss is not None
