"""The Prometheus exporter: a real prometheus-client HTTP server scraped over the loopback."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

import moewatch
from moewatch.exporter import PrometheusConfig, PrometheusExporter, PushgatewayConfig
from moewatch.exporter.collector import LAYER_GAUGES
from moewatch.report import HealthState
from tests.promhelpers import ToyMoE, free_port, layer_report, require_binary, window_report


def scrape(url: str, **kw: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(url, timeout=5, **kw).text  # type: ignore[arg-type]
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not scraped; have {sorted({k[0] for k in samples})}"
    return samples[key]


def names(samples: dict) -> set[str]:
    return {k[0] for k in samples}


@pytest.fixture
def exporter():
    ex = PrometheusExporter("r1", PrometheusConfig(host="127.0.0.1", port=0), registry=CollectorRegistry())
    yield ex
    ex.close()


L0 = {"run": "r1", "layer": "0", "module": "model.layers.0.mlp.gate"}
L1 = {"run": "r1", "layer": "1", "module": "model.layers.1.mlp.gate"}


def test_scrape_serves_last_report_and_cumulative_counters(exporter: PrometheusExporter) -> None:
    assert exporter.port and exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
    before = scrape(exporter.url)
    assert value(before, "moewatch_windows_total", run="r1") == 0
    assert "moewatch_layer_state" not in names(before)  # nothing to say before the first window
    assert (
        value(
            before,
            "moewatch_build_info",
            run="r1",
            version=moewatch.__version__,
            python_version=__import__("platform").python_version(),
            torch_version=torch.__version__,
        )
        == 1
    )

    w0 = window_report(
        [
            layer_report(
                0,
                [100, 50, 50, 0],
                HealthState.COLLAPSED,
                load_cov=0.71,
                dead_experts=1,
                dead_expert_ids=[3],
                dead_ratio=0.25,
                top2_share=0.75,
                top2_excess=0.5,
                norm_entropy=0.6,
                max_violation=1.0,
                effective_experts=2.8,
                z_loss=1.5,
            ),
            layer_report(1, [50, 50, 50, 50], HealthState.INSUFFICIENT_DATA, load_cov=0.0),
        ]
    )
    w1 = window_report(
        [
            layer_report(0, [10, 20, 30, 40], HealthState.WARNING, load_cov=0.45),
            layer_report(1, [60, 40, 50, 50], HealthState.HEALTHY, load_cov=0.14),
        ],
        window=1,
    )
    exporter.emit(w0)
    s = scrape(exporter.url)
    assert value(s, "moewatch_layer_state", **L0) == 2
    assert value(s, "moewatch_layer_state", **L1) == -1  # insufficient data
    assert value(s, "moewatch_run_state", run="r1") == 2
    assert value(s, "moewatch_layer_load_cov", **L0) == pytest.approx(0.71)
    assert value(s, "moewatch_layer_dead_experts", **L0) == 1
    assert value(s, "moewatch_layer_z_loss", **L0) == 1.5
    assert ("moewatch_layer_z_loss", tuple(sorted(L1.items()))) not in s  # None is left out, not NaN
    assert value(s, "moewatch_expert_dead", **L0, expert="3") == 1
    assert value(s, "moewatch_expert_dead", **L0, expert="0") == 0

    exporter.emit(w1)
    s = scrape(exporter.url)
    assert value(s, "moewatch_windows_total", run="r1") == 2
    assert value(s, "moewatch_tokens_total", run="r1") == 100 + 50
    assert value(s, "moewatch_step", run="r1") == 20
    assert value(s, "moewatch_layer_state", **L0) == 1
    assert value(s, "moewatch_run_state", run="r1") == 1
    # per-expert counters are cumulative over windows; window gauges are the last window's
    assert [value(s, "moewatch_expert_assignments_total", **L0, expert=str(e)) for e in range(4)] == [
        110,
        70,
        80,
        40,
    ]
    assert value(s, "moewatch_layer_window_assignments", **L0) == 100
    assert value(s, "moewatch_layer_tokens_total", **L0) == 100 + 50
    assert value(s, "moewatch_expert_dead", **L0, expert="3") == 0
    assert value(s, "moewatch_scrapes_total", run="r1") == 3


def test_every_layer_report_metric_is_exported(exporter: PrometheusExporter) -> None:
    full = layer_report(
        0,
        [40, 30, 20, 10],
        load_cov=0.4,
        dead_experts=0,
        dead_ratio=0.0,
        top2_share=0.7,
        top2_excess=0.1,
        norm_entropy=0.9,
        max_violation=0.6,
        effective_experts=3.5,
        z_loss=2.0,
        nonfinite=1,
        invalid_ids=2,
        dropped_ratio=0.05,
        ep_loads=[70, 30],
        ep_load_cov=0.4,
        projected_collapse_step=1234,
        noise_floor={"load_cov": 0.2, "top2_excess": 0.12, "norm_entropy": 0.98, "dead_ratio": 0.0},
        idle_windows=[0, 0, 3, 7],
    )
    exporter.emit(window_report([full]))
    s = scrape(exporter.url)
    for name, attr, _ in LAYER_GAUGES:
        assert value(s, name, **L0) == pytest.approx(float(getattr(full, attr))), name
    for metric, floor in full.noise_floor.items():
        assert value(s, "moewatch_layer_noise_floor", **L0, metric=metric) == pytest.approx(floor)
    assert value(s, "moewatch_expert_idle_windows", **L0, expert="3") == 7
    for counter in (
        "moewatch_windows_total",
        "moewatch_tokens_total",
        "moewatch_hook_errors_total",
        "moewatch_scrapes_total",
        "moewatch_layer_tokens_total",
        "moewatch_expert_assignments_total",
    ):
        assert counter in names(s)
    # _total only on counters
    text = requests.get(exporter.url, timeout=5).text
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            assert name.startswith("moewatch_")
            assert (kind == "counter") == name.endswith("_total"), line


def test_per_expert_off_drops_expert_series() -> None:
    ex = PrometheusExporter("r1", PrometheusConfig(host="127.0.0.1", port=0, per_expert=False))
    try:
        ex.emit(window_report([layer_report(0, [1, 2, 3, 4])]))
        s = scrape(ex.url)
        assert not {n for n in names(s) if n.startswith("moewatch_expert_")}
        assert value(s, "moewatch_layer_state", **L0) == 0
    finally:
        ex.close()


class FakeNotifier:
    """The DeliveryReporter contract: delivery_stats() -> {notifier: {outcome: count}}, and on_delivery()
    callbacks called whenever those counts change."""

    def __init__(self) -> None:
        self.stats = {"slack": {"sent": 3, "failed": 1, "retried": 2, "dropped": 0}}
        self.listeners: list = []

    def delivery_stats(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.stats.items()}

    def on_delivery(self, callback) -> None:
        self.listeners.append(callback)

    def delivered(self, outcome: str, n: int) -> None:
        self.stats["slack"][outcome] = n
        for cb in self.listeners:
            cb()

    def emit(self, report: object) -> None:
        pass

    def close(self) -> None:
        pass


class BrokenStats(FakeNotifier):
    def delivery_stats(self) -> dict[str, dict[str, int]]:
        raise RuntimeError("boom")


def test_attach_serves_notifications_and_hook_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    port = free_port()
    monkeypatch.setenv("MOEWATCH_PROMETHEUS__PORT", str(port))
    monkeypatch.setenv("MOEWATCH_PROMETHEUS__HOST", "127.0.0.1")
    monkeypatch.setenv("MOEWATCH_ALERTS__ENABLED", "false")
    model = ToyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    notifier = FakeNotifier()
    watch = moewatch.attach(
        model,
        optimizer=opt,
        sinks=[notifier, BrokenStats()],
        run_name="att",
        window_steps=2,
        jsonl={"path": tmp_path / "w.jsonl"},
        console={"enabled": False},
    )
    try:
        ex = watch.find_sink(PrometheusExporter)
        assert ex is not None and ex.port == port
        url = ex.url
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(32, 16)).backward()
            opt.step()
        s = scrape(ex.url)
        run = {"run": "att"}
        assert value(s, "moewatch_windows_total", **run) == 2
        assert value(s, "moewatch_layers", **run) == 2
        assert value(s, "moewatch_notifications_total", **run, notifier="slack", outcome="sent") == 3
        assert value(s, "moewatch_notifications_total", **run, notifier="slack", outcome="failed") == 1
        notifier.delivered("sent", 5)  # pushed to the exporter when the counters change, between windows
        assert (
            value(scrape(ex.url), "moewatch_notifications_total", **run, notifier="slack", outcome="sent")
            == 5
        )
        assert value(s, "moewatch_hook_errors_total", **run) == 0
        assert sum(v for (n, _), v in s.items() if n == "moewatch_expert_assignments_total") == 2 * 4 * 32 * 2
    finally:
        watch.close()
    assert ex.url is None
    with pytest.raises(requests.ConnectionError):  # close() stopped the server
        requests.get(url, timeout=2)


def test_busy_port_is_a_clear_value_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=rf"port {port}.*prometheus\.port.*MOEWATCH_PROMETHEUS__PORT"):
            PrometheusExporter("r1", PrometheusConfig(host="127.0.0.1", port=port))


def test_disabled_exporter_is_not_built(tmp_path: Path) -> None:
    from moewatch.config import MoEWatchConfig
    from moewatch.exporter import prometheus_sink

    assert prometheus_sink(MoEWatchConfig(prometheus={"enabled": False})) is None
    ex = prometheus_sink(
        MoEWatchConfig(prometheus={"enabled": False}, pushgateway={"url": "http://127.0.0.1:1"})
    )
    assert ex is not None and ex.url is None and ex.pushgateway_url == "http://127.0.0.1:1"
    ex.close()


def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            require_binary("openssl", hint="apt-get install openssl"),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    ex = PrometheusExporter("tls", PrometheusConfig(host="127.0.0.1", port=0, certfile=cert, keyfile=key))
    try:
        assert ex.url.startswith("https://127.0.0.1:")
        s = scrape(ex.url, verify=str(cert))
        assert value(s, "moewatch_windows_total", run="tls") == 0
        with pytest.raises(requests.exceptions.SSLError):  # really TLS: an untrusted cert is refused
            requests.get(ex.url, timeout=5, verify=True)
    finally:
        ex.close()


def test_tls_config_errors_name_the_fields(tmp_path: Path) -> None:
    from moewatch.config import MoEWatchConfig

    with pytest.raises(Exception, match="prometheus.certfile and prometheus.keyfile"):
        MoEWatchConfig(prometheus={"certfile": tmp_path / "c.pem"})
    with pytest.raises(ValueError, match="MOEWATCH_PROMETHEUS__CERTFILE"):
        PrometheusExporter(
            "x", PrometheusConfig(port=0, certfile=tmp_path / "c.pem", keyfile=tmp_path / "k.pem")
        )


def test_pushgateway_config_is_optional() -> None:
    assert PushgatewayConfig().url is None


@pytest.mark.parametrize(
    ("per_expert", "series"), [(True, 11 + 60 * 20 + 2 * 60 * 256), (False, 11 + 60 * 20)]
)
def test_cardinality_of_a_60_layer_256_expert_model(per_expert: bool, series: int) -> None:
    """11 run-level series, 20 per layer (every optional metric defined), 2 per expert."""
    from prometheus_client import generate_latest

    from moewatch.exporter.collector import MoEWatchCollector

    layers = [
        layer_report(i, [100] * 256, load_cov=0.1, top2_share=0.01, top2_excess=0.0, norm_entropy=0.99,
                     max_violation=0.1, effective_experts=250.0, z_loss=1.0, dropped_ratio=0.0,
                     ep_loads=[3200] * 8, ep_load_cov=0.0)
        for i in range(60)
    ]  # fmt: skip
    registry = CollectorRegistry()
    collector = MoEWatchCollector("big", per_expert=per_expert)
    registry.register(collector)
    collector.update(window_report(layers, run="big"))
    lines = [ln for ln in generate_latest(registry).decode().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == series


def test_per_window_families_are_rendered_once_per_window_not_per_scrape() -> None:
    """A 60x256 scrape is ~30k samples: the families that change once per window are built (and the
    text rendered) once per window, and every scrape of that window reuses them."""
    from moewatch.exporter.collector import MoEWatchCollector

    collector = MoEWatchCollector("r")
    collector.update(window_report([layer_report(0, [5, 3, 0, 0])], run="r"))
    per_window = {"moewatch_layer_state", "moewatch_expert_assignments", "moewatch_run_state"}

    def families() -> dict[str, object]:
        return {f.name: f for f in collector.collect() if f.name in per_window}

    first, second = families(), families()
    assert set(first) == per_window
    assert all(first[n] is second[n] for n in per_window)  # the same objects: not rebuilt per scrape
    text = collector.static_exposition()
    assert collector.static_exposition() is text
    assert collector.static_exposition(gzipped=True) is collector.static_exposition(gzipped=True)
    live = {f.name: f for f in collector.collect()}["moewatch_scrapes"]
    assert live is not {f.name: f for f in collector.collect()}["moewatch_scrapes"]  # live ones are per scrape

    collector.update(window_report([layer_report(0, [1, 1, 1, 1])], run="r"))
    third = families()
    assert all(third[n] is not first[n] for n in per_window)  # a new window: rebuilt
    assert collector.static_exposition() is not text and collector.static_exposition() != text


def test_missing_binary_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_binary("moewatch-no-such-binary")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_binary("moewatch-no-such-binary")
