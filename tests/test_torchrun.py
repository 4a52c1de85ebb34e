"""``torchrun --nproc_per_node 2`` (gloo, CPU) running the real transformers.Trainer with the callback:
one exporter (rank 0), and the reported counts are the sum of both ranks' routers; a rank with an extra
optimizer step gets a StepMismatchError on both ranks, at the window it falls in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests import gloo

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "torchrun_trainer.py")


def _torchrun(tmp_path, scenario: str = "ok") -> None:
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEWATCH_PROMETHEUS__ENABLED": "true", "SCENARIO": scenario}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(gloo.free_port()),
         SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_torchrun_two_ranks_trainer_callback(tmp_path):
    _torchrun(tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [4, 4]
    assert [r["exporters"] for r in ranks] == [1, 0]  # one exporter, on rank 0
    assert not (tmp_path / "w1.jsonl").exists()  # only rank 0 reports
    windows = [json.loads(line) for line in (tmp_path / "w0.jsonl").read_text().splitlines()]
    assert [(w["step_start"], w["step_end"]) for w in windows] == [(0, 2), (2, 4)]
    total = [[a + b for a, b in zip(r0, r1, strict=True)] for r0, r1 in zip(ranks[0]["ref"], ranks[1]["ref"], strict=True)]
    got = [[sum(w["layers"][i]["loads"][e] for w in windows) for e in range(len(total[0]))] for i in range(len(total))]
    assert got == total
    assert ranks[0]["ref"] != ranks[1]["ref"]  # the ranks saw different data: the sum is not 2x one rank
    assert ranks[0]["cumulative"] == ranks[1]["cumulative"] == total


def test_torchrun_trainer_rank_with_an_extra_step_errors_on_both_ranks(tmp_path):
    _torchrun(tmp_path, "extra")
    for r in (0, 1):
        res = json.loads((tmp_path / f"extra{r}.json").read_text())
        assert res["error"] is not None and "rank 0: step 4, rank 1: step 5" in res["error"], res
        assert res["seconds_after_last_step"] < 20  # well inside the 60 s group timeout: detected, not timed out
        assert res["steps"] == 4 and res["monitor_steps"] == 4 + r
        assert res["hooks_left"] == 0 and res["holds_group"] is False  # detached, group released
    # detected at the window the extra step fell in (close()'s last one): the two full windows before it
    # are reported, and no window mixing rank 1's fifth step with nothing from rank 0 is ever written
    windows = [json.loads(line) for line in (tmp_path / "w0.jsonl").read_text().splitlines()]
    assert [(w["step_start"], w["step_end"]) for w in windows] == [(0, 2), (2, 4)]
    assert not (tmp_path / "w1.jsonl").exists()
