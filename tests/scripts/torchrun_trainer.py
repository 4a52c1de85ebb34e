"""Run under ``torchrun --nproc_per_node 2``: the real transformers.Trainer (DDP over gloo, CPU) with
MoEWatchCallback. Each rank writes its own reference counts and what its monitor holds to OUT_DIR.

``SCENARIO=extra``: rank 1 takes one optimizer step more than rank 0 after the Trainer's last step (a
callback steps the real optimizer again, no collective involved); each rank records the
``StepMismatchError`` that ``trainer.train()`` raises and how long after the last step it came."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moewatch.config import MoEWatchConfig  # noqa: E402
from moewatch.exporter.sink import PrometheusExporter  # noqa: E402
from moewatch.flush import StepMismatchError  # noqa: E402
from moewatch.integrations.transformers import MoEWatchCallback  # noqa: E402
from moewatch.optim import unwrap_optimizer  # noqa: E402
from tests.test_integration_transformers import RefCount, _dataset, _model  # noqa: E402


class Probe(transformers.TrainerCallback):
    def __init__(self, cb: MoEWatchCallback) -> None:
        self.cb = cb
        self.exporters = -1

    def on_train_begin(self, args, state, control, **kw):
        self.exporters = sum(isinstance(s, PrometheusExporter) for s in self.cb.watch.sinks)


class ExtraStep(transformers.TrainerCallback):
    """After the Trainer's last step, step the real optimizer once more (its gradients are already zeroed,
    so no weight changes): this rank's monitor counts one step more than the others."""

    def __init__(self, extra: bool) -> None:
        self.extra = extra
        self.last_step_at: float | None = None

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        if state.global_step == state.max_steps:
            self.last_step_at = time.monotonic()
            if self.extra:
                unwrap_optimizer(optimizer).step()


def main(out_dir: str, scenario: str = "ok") -> None:
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
    extra = ExtraStep(scenario == "extra" and rank == 1)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, "run"), max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, save_strategy="no", logging_steps=1, report_to=[], use_cpu=True,
        learning_rate=1e-3, disable_tqdm=True, dataloader_num_workers=0, seed=0, ddp_backend="gloo",
        ddp_timeout=60,  # a hang in a collective would fail within a minute, not the test's own timeout
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[extra, cb, probe])
    if scenario == "extra":
        own_hooks = sum(len(m._forward_hooks) for m in model.modules())  # RefCount's, before moewatch attaches
        error = None
        try:
            trainer.train()
        except StepMismatchError as exc:
            error = str(exc)
        watch = cb.watch
        with open(os.path.join(out_dir, f"extra{rank}.json"), "w") as fh:
            json.dump({"error": error, "seconds_after_last_step": time.monotonic() - extra.last_step_at,
                       "steps": trainer.state.global_step, "monitor_steps": watch.step_count,
                       "hooks_left": sum(len(m._forward_hooks) for m in model.modules()) - own_hooks,
                       "holds_group": watch._group is not None or watch._flusher._group is not None}, fh)
        return
    trainer.train()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"ref": ref.counts_LE.tolist(), "exporters": probe.exporters,
                   "steps": trainer.state.global_step, "world": trainer.args.world_size,
                   "cumulative": [c.tolist() for c in cb.watch.history.cumulative_LE]}, fh)


if __name__ == "__main__":
    main(sys.argv[1], os.environ.get("SCENARIO", "ok"))
    # The same teardown as tests/gloo.py: gloo can abort a rank during interpreter finalization ("terminate
    # called without an active exception", SIGABRT; seen in CI here too). The results are on disk already.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
