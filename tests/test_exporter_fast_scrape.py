"""The HTTP scrape serves per-window families from a per-window cache; it must equal prometheus-client's
own full render, plain and gzipped, including label escaping."""

from __future__ import annotations

import gzip

import pytest
import requests
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from moewatch.exporter import PrometheusConfig, PrometheusExporter
from moewatch.exporter.collector import MoEWatchCollector
from moewatch.exporter.exposition import expert_text
from moewatch.exporter.families import expert_families, stamp
from tests.promhelpers import layer_report, window_report


def _report():
    layers = [
        layer_report(i, loads=[5 * i + e for e in range(16)], module=f'model.layers.{i}.mlp."gate"\\x')
        for i in range(3)
    ]
    return window_report(layers, run='run "q"')


def _samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name != "moewatch_scrapes_total":
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _headers(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith("#"))


class _Fams:
    def __init__(self, families):
        self.families = list(families)

    def collect(self):
        return self.families


def _big_report():
    """Counts past 1e7 (where Go, and so prometheus-client, switch to exponent notation) and idle windows."""
    layers = [layer_report(0, loads=[12_345_678 + e for e in range(4)] + [0], module="m")]
    return window_report(layers, run="r")


@pytest.mark.parametrize("make", [_report, _big_report], ids=["small", "past-1e7"])
def test_expert_text_is_byte_identical_to_prometheus_client(make):
    c = MoEWatchCollector('run "q"')
    c.update(make())
    snap = c.snapshot
    assert expert_text(snap, c.run, {}).encode() == generate_latest(_Fams(expert_families(snap, c.run)))


def test_http_scrape_equals_full_render_plain_and_gzip():
    registry = CollectorRegistry()
    ex = PrometheusExporter('run "q"', PrometheusConfig(host="127.0.0.1", port=0), registry=registry)
    try:
        for _ in range(2):  # two windows: the cache must follow the newest snapshot
            ex.emit(_report())
            full = generate_latest(registry).decode()
            plain = requests.get(ex.url, headers={"Accept-Encoding": "identity"}, timeout=10)
            zipped = requests.get(ex.url, headers={"Accept-Encoding": "gzip"}, timeout=10, stream=True)
            raw = zipped.raw.read()
            assert zipped.headers["Content-Encoding"] == "gzip"
            unzipped = gzip.decompress(raw).decode()  # several gzip members, one stream
            for body in (plain.text, unzipped):
                assert _samples(body) == _samples(full)
                assert _headers(body) == _headers(full)
        counts = _samples(plain.text)
        key = (
            "moewatch_expert_assignments_total",
            tuple(sorted({"run": 'run "q"', "layer": "2", "module": 'model.layers.2.mlp."gate"\\x', "expert": "3"}.items())),
        )
        assert counts[key] == 2 * (5 * 2 + 3)  # cumulative over the two windows
    finally:
        ex.close()


def test_filtered_scrape_falls_back_to_full_render():
    ex = PrometheusExporter("r", PrometheusConfig(host="127.0.0.1", port=0), registry=CollectorRegistry())
    try:
        ex.emit(_report())
        body = requests.get(ex.url, params={"name[]": "moewatch_layer_state"}, timeout=10).text
        # prometheus-client's own filtered render: the family asked for, once, and nothing else (the fast
        # path would append every per-window family)
        types = [line for line in body.splitlines() if line.startswith("# TYPE")]
        assert types == ["# TYPE moewatch_layer_state gauge"]
    finally:
        ex.close()


def test_constant_labels_on_the_fast_path_and_pushes_without_rank():
    """stage/rank labels (pipeline stages, per-rank export): the fast expert text still equals
    prometheus-client's render, every scraped series carries them, and pushes leave ``rank`` to the group key."""
    labels = {"stage": "1", "rank": "3"}
    c = MoEWatchCollector('run "q"', labels=labels)
    c.update(_report())
    snap = c.snapshot
    expected = generate_latest(_Fams(stamp(expert_families(snap, c.run), labels)))
    assert expert_text(snap, c.run, labels).encode() == expected
    registry = CollectorRegistry()
    ex = PrometheusExporter('run "q"', PrometheusConfig(host="127.0.0.1", port=0, per_rank=True), registry=registry,
                            rank=3, stage=1)  # fmt: skip
    try:
        ex.emit(_report())
        body = requests.get(ex.url, timeout=10).text
        assert _samples(body) == _samples(generate_latest(registry).decode())
        keys = [dict(k[1]) for k in _samples(body)]
        assert keys and all(k.get("stage") == "1" and k.get("rank") == "3" for k in keys)
        pushed = [s.labels for fam in ex.collector.peek() for s in fam.samples]
        assert pushed and all(lab.get("stage") == "1" and "rank" not in lab for lab in pushed)
        again = requests.get(ex.url, timeout=10).text  # a push does not strip the cached families
        assert all(dict(k[1]).get("rank") == "3" for k in _samples(again))
    finally:
        ex.close()
