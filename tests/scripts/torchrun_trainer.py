"""Run under ``torchrun --nproc_per_node 2``: the real transformers.Trainer (DDP over gloo, CPU) with
MoEWatchCallback. Each rank writes its own reference counts and what its monitor holds to OUT_DIR."""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moewatch.config import MoEWatchConfig  # noqa: E402
from moewatch.exporter.sink import PrometheusExporter  # noqa: E402
from moewatch.integrations.transformers import MoEWatchCallback  # noqa: E402
from tests.test_integration_transformers import RefCount, _dataset, _model  # noqa: E402


class Probe(transformers.TrainerCallback):
    def __init__(self, cb: MoEWatchCallback) -> None:
        self.cb = cb
        self.exporters = -1

    def on_train_begin(self, args, state, control, **kw):
        self.exporters = sum(isinstance(s, PrometheusExporter) for s in self.cb.watch.sinks)


def main(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    model = _model()
    ref = RefCount(model)
    cfg = MoEWatchConfig(
        run_name="torchrun-test", window_steps=2, min_fair_share=0,
        jsonl={"path": os.path.join(out_dir, f"w{rank}.jsonl")}, console={"enabled": False},
        prometheus={"host": "127.0.0.1", "port": 0},
    )
    cb = MoEWatchCallback(cfg)
    probe = Probe(cb)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, "run"), max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, save_strategy="no", logging_steps=1, report_to=[], use_cpu=True,
        learning_rate=1e-3, disable_tqdm=True, dataloader_num_workers=0, seed=0, ddp_backend="gloo",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[cb, probe])
    trainer.train()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"ref": ref.counts_LE.tolist(), "exporters": probe.exporters,
                   "steps": trainer.state.global_step, "world": trainer.args.world_size,
                   "cumulative": [c.tolist() for c in cb.watch.history.cumulative_LE]}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
