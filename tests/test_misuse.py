"""Misuse that must not be silent or misleading: an empty flush(), busy ports, attaching twice."""

from __future__ import annotations

import logging
import socket

import pytest
import requests
import torch

import moewatch
from moewatch.config import ConfigError
from moewatch.exporter import PrometheusExporter
from moewatch.monitor import AlreadyAttachedError
from moewatch.report import WindowReport
from tests.fakes import ToyMoE, quiet, tokens_for


class _Keep:
    def __init__(self) -> None:
        self.reports: list[WindowReport] = []

    def emit(self, report: WindowReport) -> None:
        self.reports.append(report)

    def close(self) -> None:
        pass


def _train(watch_model: ToyMoE, opt: torch.optim.Optimizer, steps: int) -> None:
    x = tokens_for([[0, 1], [2, 3], [4, 5], [6, 7]] * 4)
    for _ in range(steps):
        opt.zero_grad()
        watch_model(x).sum().backward()
        opt.step()


def test_flush_after_a_whole_number_of_windows_returns_the_last_report_and_emits_nothing() -> None:
    model = ToyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    keep = _Keep()
    watch = moewatch.attach(model, optimizer=opt, sinks=[keep], **quiet(window_steps=2))
    try:
        _train(model, opt, 4)
        report = watch.flush()
        assert report is not None and report.window == 1 and report.state != "insufficient_data"
        assert report is keep.reports[-1]
        assert [r.window for r in keep.reports] == [0, 1]  # no empty third window emitted
        assert watch.flush() is report  # and again
        _train(model, opt, 1)
        partial = watch.flush()  # a real partial window still closes
        assert partial is not None and partial.window == 2 and partial.step_end - partial.step_start == 1
    finally:
        watch.close()
    assert [r.window for r in keep.reports] == [0, 1, 2]


def test_flush_before_anything_returns_none() -> None:
    model = ToyMoE()
    keep = _Keep()
    with moewatch.attach(model, sinks=[keep], **quiet()) as watch:
        assert watch.flush() is None
    assert keep.reports == []


def _exporter_overrides(port: int) -> dict:
    return quiet(prometheus={"enabled": True, "host": "127.0.0.1", "port": port})


def test_busy_port_is_a_config_error_naming_port_and_fix() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"port {port} on 127.0.0.1 is already in use; set prometheus.port"):
            moewatch.attach(ToyMoE(), **_exporter_overrides(port))


def test_attaching_twice_is_already_attached_not_the_port() -> None:
    model = ToyMoE()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    watch = moewatch.attach(model, **_exporter_overrides(port))
    try:
        with pytest.raises(AlreadyAttachedError, match="already attached"):
            moewatch.attach(model, **_exporter_overrides(port))
    finally:
        watch.close()


def test_second_monitor_in_one_process_gets_a_free_port(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = moewatch.attach(ToyMoE(), **_exporter_overrides(port), run_name="first")
    try:
        with caplog.at_level(logging.WARNING, logger="moewatch"):
            second = moewatch.attach(ToyMoE(), **_exporter_overrides(port), run_name="second")
        try:
            ex1, ex2 = first.find_sink(PrometheusExporter), second.find_sink(PrometheusExporter)
            assert ex1.port == port and ex2.port not in (None, port)
            assert f"port {port} is already served by another moewatch monitor in this process" in caplog.text
            assert ex2.url in caplog.text
            assert 'run="second"' in requests.get(ex2.url, timeout=5).text
            assert 'run="first"' in requests.get(ex1.url, timeout=5).text
        finally:
            second.close()
    finally:
        first.close()
