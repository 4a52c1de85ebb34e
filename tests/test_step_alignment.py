"""Two real gloo processes: a rank whose step count differs gets an error naming both counts, on both
ranks and within a bounded time, never a hang or a silently mixed window."""

import json
import os
import time

import torch

import moewatch
from moewatch.flush import StepMismatchError
from tests import gloo
from tests.fakes import ToyMoE, quiet, tokens_for

A = [[0, 1], [1, 2], [2, 3]]


def _worker(rank: int, out_dir: str, scenario: str) -> None:
    t0 = time.monotonic()
    result = {"error": None}
    model = ToyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    watch = moewatch.attach(model, optimizer=opt, **quiet(window_steps=2))
    if scenario == "resumed" and rank == 1:
        watch.load_state_dict({"step": 1, "window": 0})  # rank 1 resumed from another step
    steps = 4 + (1 if scenario == "extra" and rank == 1 else 0)
    try:
        for _ in range(steps):
            model(tokens_for(A)).sum().backward()
            opt.step()
        watch.close()
    except StepMismatchError as exc:
        result["error"] = str(exc)
        watch.close()  # a no-op now: the monitor detached itself when the window mismatched
        result["hooks_left"] = sum(len(m._forward_hooks) for m in model.modules())
        result["holds_group"] = watch._group is not None or watch._flusher._group is not None
    result["seconds"] = time.monotonic() - t0
    with open(os.path.join(out_dir, f"{scenario}{rank}.json"), "w") as fh:
        json.dump(result, fh)


def _run(tmp_path, scenario):
    # the group timeout is the bound on any hang this test would otherwise see
    gloo.spawn(_worker, str(tmp_path), scenario, timeout_s=30)
    return [json.loads((tmp_path / f"{scenario}{r}.json").read_text()) for r in (0, 1)]


def test_one_rank_with_an_extra_step_errors_on_both_ranks(tmp_path):
    for res in _run(tmp_path, "extra"):
        assert res["error"] is not None and "rank 0: step 4, rank 1: step 5" in res["error"]
        assert res["seconds"] < 20  # well inside the 30 s group timeout: detected, not timed out


def test_misaligned_windows_error_at_the_window_on_both_ranks(tmp_path):
    for res in _run(tmp_path, "resumed"):
        assert res["error"] is not None and "rank 0: step 2, rank 1: step 3" in res["error"]
        assert res["seconds"] < 20
        # detached at the failing window: no hooks left on the model and no reference to the group that
        # would keep gloo alive past destroy_process_group (seen as a SIGABRT at interpreter exit)
        assert res["hooks_left"] == 0 and res["holds_group"] is False
