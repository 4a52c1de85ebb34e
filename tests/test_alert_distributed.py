"""Two real processes in a gloo group: only the reporting rank builds the alert sink and sends."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moewatch
from moewatch.alerting.sink import AlertSink
from tests.fakes import ToyMoE, quiet, tokens_for
from tests.webhook_server import WebhookServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, url: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = ToyMoE()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        alerts = {"slack_webhook_url": url, "slack_min_interval": 0, "close_timeout": 5}
        watch = moewatch.attach(model, optimizer=opt, **quiet(window_steps=2, alerts=alerts))
        for _ in range(2):  # every token to experts 0 and 1: collapsed, two experts dead
            model(tokens_for([[0, 1]] * 8)).sum().backward()
            opt.step()
        has_sink = watch.find_sink(AlertSink) is not None
        state = watch.latest.layers[0].state.value
        watch.close()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"alert_sink": has_sink, "state": state}, fh)
        # Neither rank tears gloo down while the other still talks to it (a SIGABRT, "terminate called
        # without an active exception", seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_only_reporting_rank_sends(tmp_path) -> None:
    with WebhookServer() as srv:
        mp.spawn(_worker, args=(2, _free_port(), srv.url("/slack"), str(tmp_path)), nprocs=2, join=True)
        hits = srv.answered(200)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["alert_sink"] for r in results] == [True, False]
    assert {r["state"] for r in results} == {"collapsed"}
    assert len(hits) == 1 and hits[0].body["text"].startswith("[FIRING:")
