"""Pipeline parallelism: a stage reports its own routers under their global layer numbers (``layer_offset``)
with a ``stage`` label (``pipeline_stage``), all-reducing over its own data-parallel group, so each stage's
first rank exports its layers and the dashboards of the run see one set of layers 0..N-1. Two real gloo
processes, one stage each (a ToyMoE's four layers split in halves, activations sent stage to stage), each
with its own group."""

from __future__ import annotations

import json
import os

import pytest
import requests
import torch
import torch.distributed as dist
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import moewatch
from moewatch.exporter import PrometheusExporter
from moewatch.sinks.jsonl import JsonlSink
from tests import gloo
from tests.fakes import ToyMoE, expected_loads, quiet, tokens_for
from tests.test_per_rank import free_port_pair

A = [[0, 1], [1, 2], [2, 3], [0, 3]]
LAYERS, STEPS = 4, 2


class Stage(nn.Module):
    """The blocks ``layers`` of ``full``, under their original names (``blocks.2.router``), as torchtitan's
    pipeline split leaves them."""

    def __init__(self, full: ToyMoE, layers: list[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): full.blocks[i] for i in layers})
        self.top_k = full.top_k

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        ids, h = x_TD[:, : self.top_k], x_TD
        for block in self.blocks.values():
            logits_TE, scores_TK, _ = block["router"](h)
            h = block["proj"](h) + logits_TE.mean() * 0 + scores_TK.sum() * 0
            h = torch.cat([ids, h[:, self.top_k :]], dim=1)  # the routing ids travel to the next stage
        return h


def _worker(rank: int, metrics_port: int, out_dir: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    dp_groups = [dist.new_group([0]), dist.new_group([1])]  # each stage's data-parallel group
    stage = rank
    torch.manual_seed(0)
    per_stage = LAYERS // 2
    model = Stage(ToyMoE(layers=LAYERS), list(range(stage * per_stage, (stage + 1) * per_stage)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    refused = None
    try:  # the world group holds both stages: its all-reduce would add stage 1's layers to stage 0's
        moewatch.attach(model, **quiet(pipeline_stage=stage))
    except moewatch.ConfigError as exc:
        refused = str(exc)
    watch = moewatch.attach(
        model, optimizer=opt, process_group=dp_groups[stage],
        **quiet(window_steps=STEPS, run_name="pp", layer_offset=stage * per_stage, pipeline_stage=stage,
                jsonl={"path": os.path.join(out_dir, f"stage{stage}.jsonl")},
                prometheus={"host": "127.0.0.1", "port": metrics_port}),
    )  # fmt: skip
    for _ in range(STEPS):
        if stage == 0:
            h = model(tokens_for(A))
            dist.send(h.detach(), dst=1)
        else:
            h = torch.empty(len(A), 8)
            dist.recv(h, src=0)
            h = model(h)
        h.sum().backward()
        opt.step()
    url = watch.find_sink(PrometheusExporter).url
    body = requests.get(url, timeout=10).text
    dist.barrier()
    sinks = sorted(type(s).__name__ for s in watch.sinks)
    watch.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"url": url, "body": body, "sinks": sinks, "refused": refused}, fh)


def test_two_stages_report_global_layers_with_a_stage_label(tmp_path):
    metrics_port = free_port_pair()
    gloo.spawn(_worker, metrics_port, str(tmp_path))
    loads = expected_loads(A * STEPS, 4)
    for stage in (0, 1):
        res = json.loads((tmp_path / f"rank{stage}.json").read_text())
        assert res["refused"] is not None and "data-parallel group of this stage" in res["refused"]
        # both stages' first ranks report (each is rank 0 of its own group), on port + LOCAL_RANK
        assert res["url"] == f"http://127.0.0.1:{metrics_port + stage}/metrics"
        assert res["sinks"] == ["JsonlSink", "PrometheusExporter"]
        mine = [2 * stage, 2 * stage + 1]
        samples = [s for fam in text_string_to_metric_families(res["body"]) for s in fam.samples
                   if s.name.startswith("moewatch_")]
        assert {s.labels.get("stage") for s in samples} == {str(stage)}  # on every series
        assert not any("rank" in s.labels for s in samples)  # per_rank is off
        states = {s.labels["layer"]: s.labels["module"] for s in samples if s.name == "moewatch_layer_state"}
        assert states == {str(i): f"blocks.{i}.router" for i in mine}  # global layer numbers
        for i in mine:
            got = {int(s.labels["expert"]): s.value for s in samples
                   if s.name == "moewatch_expert_assignments_total" and s.labels["layer"] == str(i)}
            assert [got[e] for e in range(4)] == loads
        assert [s.value for s in samples if s.name == "moewatch_layers"] == [2]
        windows = JsonlSink.read(tmp_path / f"stage{stage}.jsonl")
        assert [w.stage for w in windows] == [stage]
        assert [layer.index for layer in windows[0].layers] == mine
        assert [layer.module for layer in windows[0].layers] == [f"blocks.{i}.router" for i in mine]
        assert windows[0].layer(mine[1]).loads == loads  # looked up by global layer number
        line = json.loads((tmp_path / f"stage{stage}.jsonl").read_text().splitlines()[0])
        assert line["stage"] == stage and [la["index"] for la in line["layers"]] == mine


def test_layer_offset_in_one_process():
    model = ToyMoE(layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with moewatch.attach(model, optimizer=opt, **quiet(window_steps=1, layer_offset=6)) as watch:
        assert [r.index for r in watch.routers] == [6, 7]
        model(tokens_for(A)).sum().backward()
        opt.step()
        report = watch.latest
    assert [layer.index for layer in report.layers] == [6, 7] and report.stage is None
    assert report.layer(7).module == "blocks.1.router"
    with pytest.raises(IndexError, match="no layer 0"):
        report.layer(0)


def test_stage_label_and_port_offset_without_a_group(monkeypatch):
    """process_group=False with pipeline_stage: the stage label and the port + LOCAL_RANK rule still hold."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    base = free_port_pair()
    model = ToyMoE(layers=2)
    with moewatch.attach(model, process_group=False, **quiet(
        pipeline_stage=3, prometheus={"host": "127.0.0.1", "port": base},
    )) as watch:  # fmt: skip
        model(tokens_for(A)).sum().backward()
        watch.flush()
        exporter = watch.find_sink(PrometheusExporter)
        assert exporter.port == base + 1 and exporter.collector.labels == {"stage": "3"}
        text = requests.get(exporter.url, timeout=10).text
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name.startswith("moewatch_")]
    assert samples and {s.labels.get("stage") for s in samples} == {"3"}
