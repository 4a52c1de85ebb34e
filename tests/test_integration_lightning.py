"""The real Lightning Trainer with MoEWatchCallback: windows are optimizer steps under
accumulate_grad_batches=2, counts match the routers' own outputs, logged keys, monitor state in the
Lightning checkpoint, and ckpt_path= resume continues window numbers, counts and dead streaks."""

from __future__ import annotations

import json
import os

import pytorch_lightning as pl  # a test extra: missing it must fail, not skip
import torch

from moewatch.config import MoEWatchConfig
from moewatch.integrations.lightning import MoEWatchCallback
from tests.test_integration_transformers import LAYERS, E, RefCount, _model


class LitMoE(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _model()
        self.model = self.net.model  # RefCount reads model.layers

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def _loader():
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.DataLoader(torch.randint(0, 64, (64, 12), generator=g), batch_size=2)


def _trainer(root: str, cb, max_steps: int) -> pl.Trainer:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=4,
                                        save_top_k=-1, filename="{step}")
    return pl.Trainer(default_root_dir=root, max_steps=max_steps, accumulate_grad_batches=2, accelerator="cpu",
                      devices=1, logger=pl.loggers.CSVLogger(root), log_every_n_steps=1, callbacks=[cb, ckpt],
                      enable_progress_bar=False, enable_model_summary=False)


def test_lightning_windows_counts_logs_checkpoint_and_resume(tmp_path) -> None:
    root, jsonl = str(tmp_path), str(tmp_path / "w.jsonl")
    cfg = MoEWatchConfig(run_name="lightning-test", window_steps=2, min_fair_share=0, jsonl={"path": jsonl},
                         console={"enabled": False}, prometheus={"enabled": False})
    lit = LitMoE()
    ref1 = RefCount(lit)
    cb = MoEWatchCallback(cfg)
    trainer = _trainer(root, cb, 4)
    trainer.fit(lit, _loader())
    assert trainer.global_step == 4
    windows = [json.loads(line) for line in open(jsonl, encoding="utf-8")]
    assert [(w["window"], w["step_start"], w["step_end"]) for w in windows] == [(0, 0, 2), (1, 2, 4)]
    got = [[sum(w["layers"][i]["loads"][e] for w in windows) for e in range(E)] for i in range(LAYERS)]
    assert got == ref1.counts_LE.tolist() and int(ref1.counts_LE.sum()) == 4 * 2 * 2 * 12 * 2 * LAYERS
    assert "moewatch/layer_00/load_cov" in trainer.logged_metrics
    assert float(trainer.logged_metrics["moewatch/dead_experts"]) == 2
    ckpt_path = os.path.join(root, "ckpt", "step=4.ckpt")
    saved = torch.load(ckpt_path, weights_only=False)["callbacks"]["MoEWatchCallback"]["monitor"]
    assert (saved["step"], saved["window"]) == (4, 2)
    assert saved["history"]["dead_streaks"][0] == [2, 2, 0, 0]

    lit2 = LitMoE()
    ref2 = RefCount(lit2)
    cb2 = MoEWatchCallback(cfg)
    trainer2 = _trainer(root, cb2, 8)
    trainer2.fit(lit2, _loader(), ckpt_path=ckpt_path)
    assert trainer2.global_step == 8
    windows = [json.loads(line) for line in open(jsonl, encoding="utf-8")]
    assert [(w["window"], w["step_start"], w["step_end"]) for w in windows[2:]] == [(2, 4, 6), (3, 6, 8)]
    hist = cb2.watch.history
    assert [c.tolist() for c in hist.cumulative_LE] == (ref1.counts_LE + ref2.counts_LE).tolist()
    assert hist.dead_streak_LE[0].tolist() == [4, 4, 0, 0]


class LitDemo(pl.LightningModule):
    """The demo's model and bias feedback loop under Lightning."""

    def __init__(self, balance: str) -> None:
        super().__init__()
        from moewatch.demo.model import DemoMoE

        torch.manual_seed(0)
        self.moe, self.balance = DemoMoE(64, 8, 2, 2), balance

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.moe(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        from moewatch.demo.run import BIAS_RATE

        self.moe.update_bias(self.balance, BIAS_RATE[self.balance])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _demo_loader(steps: int = 200, tokens: int = 64):
    from moewatch.demo.model import SyntheticTokens

    data = SyntheticTokens(64, seed=0)
    batches = [data.batch(tokens) for _ in range(steps)]
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def test_lightning_rollback_point_once_when_collapsing_never_when_balanced(tmp_path) -> None:
    from moewatch.report import HealthState

    for balance, expected in (("none", 1), ("bias", 0)):
        cfg = MoEWatchConfig(run_name=f"lit-{balance}", window_steps=10, jsonl={"enabled": False},
                             console={"enabled": False}, prometheus={"enabled": False})
        cb = MoEWatchCallback(cfg, save_on_degrade=True)
        root = str(tmp_path / balance)
        trainer = pl.Trainer(default_root_dir=root, max_steps=200, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, callbacks=[cb], enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(LitDemo(balance), _demo_loader())
        files = sorted(f for f in os.listdir(root) if f.startswith("moewatch-rollback")) if os.path.isdir(root) else []
        assert len(files) == expected == len(cb.rollback_paths), files
        if expected:
            assert files == ["moewatch-rollback-step=10.ckpt"]  # the demo collapses inside its first window
            state = torch.load(os.path.join(root, files[0]), weights_only=False)
            saved = state["callbacks"]["MoEWatchCallback"]
            assert saved["monitor"]["window"] == 1 and saved["trigger"]["fired"] is True  # once per run
        else:
            assert cb.watch.latest.state is HealthState.HEALTHY
