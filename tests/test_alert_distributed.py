"""Two real processes in a gloo group: only the reporting rank builds the alert sink and sends."""

from __future__ import annotations

import json
import os

import torch

import moewatch
from moewatch.alerting.sink import AlertSink
from tests import gloo
from tests.fakes import ToyMoE, quiet, tokens_for
from tests.webhook_server import WebhookServer


def _worker(rank: int, url: str, out_dir: str) -> None:
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


def test_only_reporting_rank_sends(tmp_path) -> None:
    with WebhookServer() as srv:
        gloo.spawn(_worker, srv.url("/slack"), str(tmp_path))
        hits = srv.answered(200)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["alert_sink"] for r in results] == [True, False]
    assert {r["state"] for r in results} == {"collapsed"}
    assert len(hits) == 1 and hits[0].body["text"].startswith("[FIRING:")
