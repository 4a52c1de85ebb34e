"""The real transformers.Trainer with MoEWatchCallback: windows are optimizer steps under gradient
accumulation, counts match the routers' own outputs, logs and checkpoints carry moewatch, and a resumed
run continues its history without paging again."""

from __future__ import annotations

import json
import os

import torch
import transformers  # a test extra: missing it must fail, not skip

from moewatch.config import MoEWatchConfig
from moewatch.integrations._common import STATE_FILE
from moewatch.integrations.transformers import MoEWatchCallback
from tests.webhook_server import WebhookServer, status

PD_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
ALWAYS_COLLAPSED = {"load_cov_warning": 0.0, "load_cov_collapsed": 0.0}
E, LAYERS, WINDOW = 4, 2, 2


def _model() -> transformers.MixtralForCausalLM:
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    gate0 = model.model.layers[0].mlp.gate
    with torch.no_grad():
        gate0.weight.zero_()  # layer 0: all logits tie, so experts 0 and 1 never get a token (dead streaks)
    gate0.weight.requires_grad_(False)
    return model


class RefCount:
    """Reference: per-expert counts read from the routers' own outputs (indices), training forwards only."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.counts_LE = torch.zeros(LAYERS, E, dtype=torch.int64)
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, args, output):
            if module.training and torch.is_grad_enabled():
                self.counts_LE[i] += torch.bincount(output[2].reshape(-1), minlength=E)

        return hook


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _dataset(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, 64, (12,), generator=g)), "labels": ids} for _ in range(n)]


def _args(out: str) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=out, max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        save_strategy="steps", save_steps=4, logging_steps=1, report_to=[], use_cpu=True,
        learning_rate=1e-3, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )


def _config(jsonl: str, pd_url: str) -> MoEWatchConfig:
    return MoEWatchConfig(
        run_name="trainer-test", window_steps=WINDOW, min_fair_share=0, thresholds=ALWAYS_COLLAPSED,
        jsonl={"path": jsonl}, console={"enabled": False}, prometheus={"enabled": False},
        alerts={"pagerduty_routing_key": PD_KEY, "pagerduty_url": pd_url, "close_timeout": 5},
    )


def _windows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_trainer_windows_counts_logs_checkpoint_and_resume(tmp_path) -> None:
    out, jsonl = str(tmp_path / "run"), str(tmp_path / "moewatch.jsonl")
    with WebhookServer(default=status(202, '{"status":"success"}')) as srv:
        cfg = _config(jsonl, srv.url("/pd"))

        # --- first run: stops at step 4 (a checkpoint) ---
        model = _model()
        ref1 = RefCount(model)
        cb = MoEWatchCallback(cfg)
        trainer = transformers.Trainer(model=model, args=_args(out), train_dataset=_dataset(),
                                       callbacks=[cb, StopAt(4)])
        trainer.train()
        assert trainer.state.global_step == 4
        windows = _windows(jsonl)
        assert [(w["window"], w["step_start"], w["step_end"]) for w in windows] == [(0, 0, 2), (1, 2, 4)]
        got1 = torch.tensor([[sum(w["layers"][i]["loads"][e] for w in windows) for e in range(E)]
                             for i in range(LAYERS)])
        assert torch.equal(got1, ref1.counts_LE) and int(ref1.counts_LE.sum()) == 4 * 2 * 2 * 12 * 2 * LAYERS
        logged = [h for h in trainer.state.log_history if "moewatch/layer_00/load_cov" in h]
        assert [h["step"] for h in logged] == [2, 4]
        assert {"moewatch/dead_experts", "moewatch/layer_01/norm_entropy", "moewatch/state"} <= logged[0].keys()
        assert logged[-1]["moewatch/dead_experts"] == 2  # layer 0's experts 0 and 1
        saved = torch.load(os.path.join(out, "checkpoint-4", STATE_FILE), weights_only=True)["monitor"]
        assert (saved["step"], saved["window"]) == (4, 2)
        assert saved["history"]["dead_streaks"][0] == [2, 2, 0, 0]
        assert saved["history"]["cumulative"] == ref1.counts_LE.tolist()
        assert [h.body["event_action"] for h in srv.wait_for(1, code=202)] == ["trigger"]

        # --- resumed run: continues window numbers, cumulative counts and dead streaks; no second page ---
        model2 = _model()
        ref2 = RefCount(model2)
        cb2 = MoEWatchCallback(cfg)
        trainer2 = transformers.Trainer(model=model2, args=_args(out), train_dataset=_dataset(), callbacks=[cb2])
        trainer2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-4"))
        assert trainer2.state.global_step == 8
        windows = _windows(jsonl)
        assert [(w["window"], w["step_start"], w["step_end"]) for w in windows[2:]] == [(2, 4, 6), (3, 6, 8)]
        history = cb2.watch.history
        assert [c.tolist() for c in history.cumulative_LE] == (ref1.counts_LE + ref2.counts_LE).tolist()
        assert history.dead_streak_LE[0].tolist() == [4, 4, 0, 0]
        assert history.windows == 4
        srv.wait_for(2, code=202, timeout=1.0)
        assert [h.body["event_action"] for h in srv.answered(202)] == ["trigger"]  # not paged again
        final = torch.load(os.path.join(out, "checkpoint-8", STATE_FILE), weights_only=True)["monitor"]
        assert (final["step"], final["window"]) == (8, 4)


def test_import_safe_without_transformers() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import moewatch.integrations.transformers as m\n"
        "try:\n    m.MoEWatchCallback()\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "IMPORTERROR" in out.stdout and "pip install transformers" in out.stdout
