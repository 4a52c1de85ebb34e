"""``prometheus.per_rank``: every rank serves /metrics on ``port + LOCAL_RANK`` with a ``rank`` label on every
series, each rank's own counts (what its routers saw before the all-reduce), so that ``sum without(rank, instance)``
of the counters is the job's total; rank 0's JSONL (and ``watch.latest`` everywhere) keep the all-reduced
window. Two real gloo processes, each scraping its own port over HTTP."""

from __future__ import annotations

import json
import os
import socket

import pytest
import requests
import torch
import torch.distributed as dist
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

import moewatch
from moewatch.exporter import PrometheusConfig, PrometheusExporter
from tests import gloo
from tests.fakes import ToyMoE, expected_loads, quiet, tokens_for

RANK_ASSIGN = {0: [[0, 1], [0, 2], [0, 3]], 1: [[3, 2], [3, 1]]}
STEPS = 2


def free_port_pair() -> int:
    """A port ``p`` with ``p`` and ``p + 1`` both free on 127.0.0.1."""
    for _ in range(50):
        p = gloo.free_port()
        if p >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two adjacent free ports")


def _samples(text: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _worker(rank: int, metrics_port: int, out_dir: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # before attach: the exporter listens on port + LOCAL_RANK
    model = ToyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    watch = moewatch.attach(
        model, optimizer=opt,
        **quiet(window_steps=STEPS, run_name="per-rank", jsonl={"path": os.path.join(out_dir, f"w{rank}.jsonl")},
                prometheus={"host": "127.0.0.1", "port": metrics_port, "per_rank": True}),
    )  # fmt: skip
    for _ in range(STEPS):  # one window, closed inside opt.step() on both ranks
        model(tokens_for(RANK_ASSIGN[rank])).sum().backward()
        opt.step()
    url = watch.find_sink(PrometheusExporter).url
    body = requests.get(f"http://127.0.0.1:{metrics_port + rank}/metrics", timeout=10).text
    dist.barrier()  # both ranks scraped before either closes its server
    latest = watch.latest
    watch.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"url": url, "body": body, "sinks": sorted(type(s).__name__ for s in watch.sinks),
                   "latest_loads": latest.layers[0].loads}, fh)


def test_per_rank_export_two_gloo_ranks(tmp_path):
    metrics_port = free_port_pair()
    gloo.spawn(_worker, metrics_port, str(tmp_path))
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    both = expected_loads((RANK_ASSIGN[0] + RANK_ASSIGN[1]) * STEPS, 4)
    assigned_sum = [0, 0, 0, 0]
    for r in (0, 1):
        assert res[r]["url"] == f"http://127.0.0.1:{metrics_port + r}/metrics"  # port + LOCAL_RANK
        samples = [s for s in _samples(res[r]["body"]) if s.name.startswith("moewatch_")]
        assert samples and {s.labels.get("rank") for s in samples} == {str(r)}  # on every series
        own = expected_loads(RANK_ASSIGN[r] * STEPS, 4)
        for layer in ("0", "1"):
            got = {int(s.labels["expert"]): s.value for s in samples
                   if s.name == "moewatch_expert_assignments_total" and s.labels["layer"] == layer}
            assert [got[e] for e in range(4)] == own  # this rank's own counts, not the all-reduced ones
            tokens = [s.value for s in samples
                      if s.name == "moewatch_layer_window_tokens" and s.labels["layer"] == layer]
            assert tokens == [len(RANK_ASSIGN[r]) * STEPS]
        assigned_sum = [a + b for a, b in zip(assigned_sum, own, strict=True)]
        assert [s.value for s in samples if s.name == "moewatch_tokens_total"] == [len(RANK_ASSIGN[r]) * STEPS]
        assert res[r]["latest_loads"] == both  # the monitor's own report is the group's window on every rank
    assert assigned_sum == both  # summed over ranks, the counters are the job's total
    assert res[0]["sinks"] == ["JsonlSink", "PrometheusExporter"]
    assert res[1]["sinks"] == ["PrometheusExporter"]  # nothing but its own exporter on rank 1
    assert not (tmp_path / "w1.jsonl").exists()
    windows = [json.loads(line) for line in (tmp_path / "w0.jsonl").read_text().splitlines()]
    assert [w["layers"][0]["loads"] for w in windows] == [both]  # the JSONL keeps the all-reduced window


def test_single_process_per_rank_port_offset_and_rank_label(monkeypatch):
    """Without a process group the rank's counts are the window's; port + LOCAL_RANK and the label still hold."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "5")
    base = free_port_pair()
    model = ToyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with moewatch.attach(model, optimizer=opt, **quiet(
        window_steps=1, prometheus={"host": "127.0.0.1", "port": base, "per_rank": True},
    )) as watch:  # fmt: skip
        model(tokens_for(RANK_ASSIGN[0])).sum().backward()
        opt.step()
        exporter = watch.find_sink(PrometheusExporter)
        assert exporter.port == base + 1
        samples = [s for s in _samples(requests.get(exporter.url, timeout=10).text) if s.name.startswith("moewatch_")]
    assert {s.labels.get("rank") for s in samples} == {"5"}
    got = {int(s.labels["expert"]): s.value for s in samples
           if s.name == "moewatch_expert_assignments_total" and s.labels["layer"] == "0"}
    assert [got[e] for e in range(4)] == expected_loads(RANK_ASSIGN[0], 4)


def test_default_export_has_no_rank_label_and_no_port_offset(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    base = gloo.free_port()
    ex = PrometheusExporter("r", PrometheusConfig(host="127.0.0.1", port=base), registry=CollectorRegistry())
    try:
        assert ex.port == base and ex.per_rank is False and ex.collector.labels == {}
    finally:
        ex.close()


def test_port_past_65535_is_a_config_error(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(moewatch.ConfigError, match="prometheus.port 65534"):
        PrometheusExporter("r", PrometheusConfig(host="127.0.0.1", port=65534, per_rank=True))
