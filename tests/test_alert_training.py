"""Alerting attached to real training: a hanging endpoint costs the loop nothing, checkpoints keep open
incidents across a restart, and the demo's collapse reaches a Slack-compatible endpoint."""

from __future__ import annotations

import re
import time

import pytest
import torch
import transformers  # a test extra: missing it must fail, not skip

import moewatch
from moewatch.alerting.sink import AlertSink
from moewatch.config import MoEWatchConfig
from tests.webhook_server import WebhookServer, make_layer, make_report, status

PD_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
# Every layer counts as collapsed in every window, and still-firing alerts repeat at every window: the
# heaviest notification traffic moewatch can produce.
ALWAYS_COLLAPSED = {"load_cov_warning": 0.0, "load_cov_collapsed": 0.0}


def _mixtral() -> torch.nn.Module:
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg)


def _config(alerts: dict, window_steps: int = 2) -> MoEWatchConfig:
    return MoEWatchConfig(
        run_name="mixtral-test", window_steps=window_steps, min_fair_share=0, thresholds=ALWAYS_COLLAPSED, noise_aware=False,
        jsonl={"enabled": False}, console={"enabled": False}, prometheus={"enabled": False},
        alerts=alerts,
    )


def _train(cfg: MoEWatchConfig, steps: int, state: dict | None = None) -> tuple[float, float, moewatch.Monitor]:
    """Returns (seconds for ``steps`` training steps, seconds for close(), the closed monitor)."""
    model = _mixtral()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    watch = moewatch.attach(model, optimizer=opt, config=cfg)
    if state is not None:
        watch.load_state_dict(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    watch.close()
    return train_s, time.perf_counter() - t1, watch


@pytest.fixture
def one_thread():
    # Two CPU cores shared with other work: one intra-op thread keeps step times comparable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_hanging_endpoint_never_slows_training(one_thread) -> None:
    steps = 20
    with WebhookServer(default=("hang",)) as srv:
        hanging = {
            "slack_webhook_url": srv.url("/slack"), "pagerduty_routing_key": PD_KEY,
            "pagerduty_url": srv.url("/pd"), "webhook_url": srv.url("/am"), "repeat_interval": 0,
            "read_timeout": 30, "connect_timeout": 30, "queue_size": 4, "close_timeout": 1.0,
        }
        _train(_config({"enabled": False}), 4)  # warm-up (lazy imports, allocator)
        base, slow, closes, watch = [], [], [], None
        for _ in range(2):  # side by side, twice, to take the noise out
            base.append(_train(_config({"enabled": False}, window_steps=1), steps)[0])
            t, c, watch = _train(_config(hanging, window_steps=1), steps)
            slow.append(t)
            closes.append(c)
        sink = watch.find_sink(AlertSink)
        stats = sink.delivery_stats()
        hits = len(srv.hits)
    print(f"\nno notifier {min(base):.3f}s, hanging endpoint {min(slow):.3f}s for {steps} steps; "
          f"close() {max(closes):.3f}s; stats {stats}; requests reached the server: {hits}")
    assert min(slow) < 1.5 * min(base) + 0.5
    assert max(closes) < 1.0 + 0.5
    assert hits >= 3  # the notifiers did try: one request each hangs
    assert stats["slack"]["dropped"] > 0 and stats["webhook"]["dropped"] > 0  # 20 windows into 4 slots
    # repeats are not for PagerDuty (never queued): only its one trigger, in flight at close, is dropped
    assert stats["pagerduty"]["dropped"] == 1
    assert stats["slack"]["sent"] == 0


def test_checkpoint_resume_does_not_repage() -> None:
    answer = status(202, '{"status":"success"}')
    with WebhookServer(default=answer) as srv:
        alerts = {"pagerduty_routing_key": PD_KEY, "pagerduty_url": srv.url("/pd"), "close_timeout": 5}
        _, _, first = _train(_config(alerts), 6)
        state = first.state_dict()
        assert "alerts" in state["sinks"]  # keyed by the stable sink name
        triggers = [h.body for h in srv.wait_for(1, code=202)]
        assert [e["event_action"] for e in triggers] == ["trigger"]

        # the resumed run (same collapse) stays quiet...
        model = _mixtral()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        watch = moewatch.attach(model, optimizer=opt, config=_config(alerts))
        watch.load_state_dict(state)
        ids = torch.randint(0, 64, (2, 16))
        for _ in range(6):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        assert watch.step_count == 12
        # ...and when the layers recover it resolves the incident it opened before the restart
        sink = watch.find_sink(AlertSink)
        for w in (100, 101):
            sink.emit(make_report(w, [make_layer(i, "healthy") for i in range(2)], run="mixtral-test"))
        watch.close()
        events = [h.body for h in srv.wait_for(2, code=202)]
    assert [e["event_action"] for e in events] == ["trigger", "resolve"]
    assert events[1]["dedup_key"] == events[0]["dedup_key"]


def test_delivery_stats_reach_prometheus() -> None:
    import requests

    with WebhookServer() as srv:
        cfg = _config({"slack_webhook_url": srv.url("/slack"), "slack_min_interval": 0}).model_copy(
            update={"prometheus": MoEWatchConfig().prometheus.model_copy(update={"host": "127.0.0.1", "port": 0})}
        )
        model = _mixtral()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 64, (2, 16))
        with moewatch.attach(model, optimizer=opt, config=cfg) as watch:
            for _ in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
            srv.wait_for(1)
            url = next(s.url for s in watch.sinks if isinstance(getattr(s, "url", None), str))
            text = requests.get(url, timeout=5).text
    line = 'moewatch_notifications_total{notifier="slack",outcome="sent",run="mixtral-test"} 1.0'
    assert line in text


def _demo(balance: str, url: str, tmp_path) -> int:
    from moewatch.cli import main

    args = ["demo", "--balance", balance, "--steps", "100" if balance == "none" else "300", "--no-console",
            "--jsonl", str(tmp_path / f"{balance}.jsonl")]
    if balance == "bias":  # the same settings from a config file instead of the environment
        cfg = tmp_path / "moewatch.toml"
        cfg.write_text(f'[prometheus]\nenabled = false\n[alerts]\nslack_webhook_url = "{url}"\n')
        args += ["--config", str(cfg)]
    return main(args)


@pytest.mark.parametrize("balance", ["none", "bias"])
def test_demo_collapse_reaches_slack(balance: str, tmp_path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    with WebhookServer() as srv:
        url = srv.url("/services/T0/B0/demo")
        monkeypatch.setenv("MOEWATCH_ALERTS__SLACK_MIN_INTERVAL", "0")
        if balance == "none":
            monkeypatch.setenv("MOEWATCH_PROMETHEUS__ENABLED", "false")
            monkeypatch.setenv("MOEWATCH_ALERTS__SLACK_WEBHOOK_URL", url)
        assert _demo(balance, url, tmp_path) == 0
        messages = [h.body for h in srv.answered(200)]
    firing = [m for m in messages if m["text"].startswith("[FIRING")]
    if balance == "bias":
        assert messages == []
        return
    assert len(firing) >= 1
    collapse = next(m for m in firing if "collapsed" in m["text"])
    blocks = "\n".join(b["text"]["text"] for b in collapse["blocks"] if "text" in b)
    assert "*Firing: collapsed* (critical) — layers 0-1" in blocks
    assert "*Run* `demo-none-seed0`" in blocks
    every = "\n".join(b["text"]["text"] for m in firing for b in m["blocks"] if "text" in b)
    assert "*Firing: dead experts* (warning)" in every  # experts die a few windows after the collapse
    assert re.search(r"`layers\.0\.gate` — \d dead experts: \[\d(, \d)*\]", every)
