"""watch.on_alert(callback), and the callbacks' rollback point: one checkpoint the first time a healthy
layer degrades, run with the demo's own model and feedback loop inside the real transformers.Trainer."""

from __future__ import annotations

import os
import threading
import time

import torch
import transformers  # a test extra: missing it must fail, not skip

import moewatch
from moewatch.config import MoEWatchConfig
from moewatch.demo.model import DemoMoE, SyntheticTokens
from moewatch.demo.run import BIAS_RATE
from moewatch.integrations.transformers import MoEWatchCallback
from moewatch.report import HealthState
from moewatch.sinks import JsonlSink
from tests.fakes import ToyMoE, quiet, tokens_for


def test_on_alert_gets_alert_and_layer_report_off_the_training_thread():
    seen = []
    model = ToyMoE(num_experts=8, top_k=2, layers=1)
    collapsed = [[0, 1]] * 200
    balanced = [[i % 8, (i + 1) % 8] for i in range(400)]
    with moewatch.attach(model, **quiet(min_fair_share=32, window_steps=1)) as watch:
        watch.on_alert(lambda alert, layer: seen.append((alert.status, alert.layer, layer.state,
                                                         threading.current_thread().name)))
        for assign in [collapsed] * 3 + [balanced] * 4:
            model(tokens_for(assign))
            watch.step()
        watch.close()
    firing = [s for s in seen if s[0] == "firing"]
    assert firing and firing[0][2] is HealthState.COLLAPSED and firing[0][1] == 0
    assert any(s[0] == "resolved" for s in seen)
    assert {s[3] for s in seen} == {"moewatch-on-alert"}


def test_on_alert_callback_that_raises_or_hangs_costs_the_loop_nothing():
    model = ToyMoE(num_experts=8, top_k=2, layers=1)
    with moewatch.attach(model, **quiet(min_fair_share=32, window_steps=1)) as watch:
        watch.on_alert(lambda *_: time.sleep(0.5))
        watch.on_alert(lambda *_: 1 / 0)
        t0 = time.perf_counter()
        for _ in range(4):
            model(tokens_for([[0, 1]] * 200))
            watch.step()
        assert time.perf_counter() - t0 < 0.4


class DemoForTrainer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.moe = DemoMoE(64, 8, 2, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.moe(x), y)}


class BiasFeedback(transformers.TrainerCallback):
    """The demo's selection-bias feedback after every optimizer step."""

    def __init__(self, balance: str) -> None:
        self.balance = balance

    def on_step_end(self, args, state, control, model=None, **kw):
        model.moe.update_bias(self.balance, BIAS_RATE[self.balance])


def _run(tmp_path, balance: str) -> tuple[list[str], list, MoEWatchCallback]:
    steps, tokens = 200, 64
    data = SyntheticTokens(64, seed=0)
    batches = [data.batch(tokens) for _ in range(steps)]
    ds = [{"x": x, "y": y} for bx, by in batches for x, y in zip(bx, by, strict=True)]
    out = str(tmp_path / balance)
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=tokens, save_strategy="no",
        report_to=[], use_cpu=True, learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0,
        disable_tqdm=True, logging_steps=10, dataloader_num_workers=0, seed=0, remove_unused_columns=False,
    )
    cfg = MoEWatchConfig(run_name=f"rollback-{balance}", window_steps=10, jsonl={"enabled": False},
                         console={"enabled": False}, prometheus={"enabled": False})
    jsonl = tmp_path / f"{balance}.jsonl"
    cb = MoEWatchCallback(cfg, save_on_degrade=True)
    model = DemoForTrainer()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[BiasFeedback(balance), cb])
    torch.set_num_threads(1)
    trainer.add_callback(_AddJsonl(jsonl, cb))
    trainer.train()
    checkpoints = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) if os.path.isdir(out) else []
    return checkpoints, JsonlSink.read(jsonl), cb


class _AddJsonl(transformers.TrainerCallback):
    def __init__(self, path, cb) -> None:
        self.path, self.cb = path, cb

    def on_train_begin(self, args, state, control, **kw):
        self.cb.watch.add_sink(JsonlSink(self.path))


def test_rollback_point_once_before_collapse_and_never_when_balanced(tmp_path):
    checkpoints, reports, cb = _run(tmp_path, "none")
    first_collapsed = next(r for r in reports if r.state is HealthState.COLLAPSED)
    assert len(checkpoints) == 1, checkpoints
    step = int(checkpoints[0].split("-")[1])
    assert step == cb.rollback_steps[0] <= first_collapsed.step_end
    assert os.path.isfile(os.path.join(tmp_path, "none", checkpoints[0], "moewatch_state.pt"))

    checkpoints, reports, cb = _run(tmp_path, "bias")
    assert checkpoints == [] and cb.rollback_steps == []
    assert reports[-1].state is HealthState.HEALTHY
