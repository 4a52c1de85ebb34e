"""Two real processes in a gloo group: one all_reduce per window sums every rank's counts; only rank 0 emits."""

import json
import os

import torch

import moewatch
from tests import gloo
from tests.fakes import ToyMoE, expected_loads, quiet, tokens_for

RANK_ASSIGN = {0: [[0, 1], [0, 2], [0, 3]], 1: [[3, 2], [3, 1]]}


def _worker(rank: int, out_dir: str) -> None:
    emitted = []

    class Keep:
        def emit(self, report):
            emitted.append(report)

        def close(self):
            pass

    model = ToyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    watch = moewatch.attach(model, optimizer=opt, sinks=[Keep()], **quiet(window_steps=2))
    for _ in range(2):  # two steps: the window closes inside opt.step() on both ranks
        model(tokens_for(RANK_ASSIGN[rank])).sum().backward()
        opt.step()
    latest = watch.latest
    watch.close()
    result = {
        "loads": latest.layers[0].loads,
        "tokens": latest.layers[0].tokens,
        "emitted": len(emitted),
        "routers": len(watch.routers),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


def test_two_process_gloo_all_reduce(tmp_path):
    gloo.spawn(_worker, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    both_steps = (RANK_ASSIGN[0] + RANK_ASSIGN[1]) * 2
    for res in results:
        assert res["loads"] == expected_loads(both_steps, 4)  # global counts on every rank
        assert res["tokens"] == len(both_steps)
    assert results[0]["emitted"] == 1  # the reporting rank
    assert results[1]["emitted"] == 0  # other ranks build reports but send nothing
