"""Pushgateway pushes against a real ``prometheus-pushgateway`` and against dead/hanging endpoints."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from moewatch.exporter import PrometheusConfig, PrometheusExporter, PushgatewayConfig
from moewatch.report import HealthState
from tests.promhelpers import free_port, layer_report, start_pushgateway, wait_until, window_report


def gateway_value(base: str, name: str, **labels: str) -> float | None:
    text = requests.get(f"{base}/metrics", timeout=5).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_push_every_window_and_at_close(tmp_path: Path) -> None:
    with start_pushgateway(tmp_path) as gw:
        ex = PrometheusExporter(
            "push-run",
            PrometheusConfig(enabled=False),
            PushgatewayConfig(url=gw, timeout_s=2),
            rank=3,
        )
        group = {"job": "moewatch", "run": "push-run", "rank": "3"}
        try:
            ex.emit(window_report([layer_report(0, [5, 5, 5, 5])], run="push-run"))
            wait_until(
                lambda: gateway_value(gw, "moewatch_windows_total", **group) == 1, 10, what="first push"
            )
            ex.emit(
                window_report(
                    [layer_report(0, [20, 0, 0, 0], HealthState.COLLAPSED)], window=1, run="push-run"
                )
            )
            wait_until(
                lambda: gateway_value(gw, "moewatch_windows_total", **group) == 2, 10, what="second push"
            )
            assert gateway_value(gw, "moewatch_layer_state", layer="0", **group) == 2
            assert (
                gateway_value(gw, "moewatch_expert_assignments_total", layer="0", expert="0", **group) == 25
            )
        finally:
            ex.close()
        # the final push at close carries the push counters of the pushes before it
        assert gateway_value(gw, "moewatch_pushgateway_pushes_total", outcome="success", **group) >= 2
        # the grouping key is visible through the Pushgateway API
        groups = requests.get(f"{gw}/api/v1/metrics", timeout=5).json()["data"]
        assert any(g["labels"] == group for g in groups)


def test_dead_gateway_never_reaches_training(caplog) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    ex = PrometheusExporter(
        "dead", PrometheusConfig(host="127.0.0.1", port=0), PushgatewayConfig(url=dead, timeout_s=1), rank=0
    )
    try:
        t0 = time.perf_counter()
        for w in range(5):
            ex.emit(window_report([layer_report(0, [5, 5, 5, 5])], window=w, run="dead"))
        assert time.perf_counter() - t0 < 0.5  # pushes are off the training thread

        def failures() -> float:
            text = requests.get(ex.url, timeout=5).text
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name == "moewatch_pushgateway_pushes_total" and s.labels["outcome"] == "failure":
                        return s.value
            return 0

        wait_until(lambda: failures() >= 1, 10, what="a counted push failure")
        assert "MOEWATCH_PUSHGATEWAY__URL" in caplog.text
    finally:
        t0 = time.perf_counter()
        ex.close()
        assert time.perf_counter() - t0 < 3


def test_hanging_gateway_is_bounded_by_timeout() -> None:
    with socket.socket() as srv:  # accepts connections (backlog) but never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        ex = PrometheusExporter(
            "hang", PrometheusConfig(enabled=False), PushgatewayConfig(url=url, timeout_s=0.5)
        )
        t0 = time.perf_counter()
        for w in range(3):
            ex.emit(window_report([layer_report(0, [5, 5, 5, 5])], window=w, run="hang"))
        assert time.perf_counter() - t0 < 0.2
        t0 = time.perf_counter()
        ex.close()
        assert time.perf_counter() - t0 < 0.5 + 1.0 + 0.5 + 0.5
