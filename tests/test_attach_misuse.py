"""Misuse that must not be silent or misleading: an empty flush, a busy port, attaching twice."""

from __future__ import annotations

import socket

import pytest
import torch

import moewatch
from moewatch.config import ConfigError
from tests.fakes import ToyMoE, quiet, tokens_for
from tests.test_monitor import Keep, train_step

A = [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_flush_after_a_whole_number_of_windows_returns_the_last_report_and_emits_nothing():
    model = ToyMoE(num_experts=8, top_k=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rec = Keep()
    with moewatch.attach(model, optimizer=opt, sinks=[rec], **quiet(window_steps=2)) as watch:
        for _ in range(4):
            train_step(model, opt, tokens_for(A))
        assert [r.window for r in rec.reports] == [0, 1]
        assert watch.flush() is rec.reports[-1]  # before: a third, empty insufficient_data window
        assert [r.window for r in rec.reports] == [0, 1]
        train_step(model, opt, tokens_for(A))  # a partial window is still flushed
        assert watch.flush().window == 2 and len(rec.reports) == 3
    assert len(rec.reports) == 3  # close() adds nothing either


def test_flush_before_anything_was_counted_returns_none():
    model = ToyMoE(num_experts=8, top_k=2)
    with moewatch.attach(model, **quiet()) as watch:
        assert watch.flush() is None


def _listening_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_busy_port_is_a_config_error_naming_the_port():
    busy = _listening_port()
    port = busy.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"port {port} .*already in use.*MOEWATCH_PROMETHEUS__PORT"):
            moewatch.attach(ToyMoE(), **quiet(prometheus={"enabled": True, "host": "127.0.0.1", "port": port}))
    finally:
        busy.close()


def test_attaching_twice_says_so_before_binding_the_port():
    model = ToyMoE()
    probe = _listening_port()
    port = probe.getsockname()[1]
    probe.close()
    cfg = quiet(prometheus={"enabled": True, "host": "127.0.0.1", "port": port})
    with moewatch.attach(model, **cfg):
        # before: "port ... is already in use" (the first monitor holds it), hiding the real mistake
        with pytest.raises(moewatch.AlreadyAttachedError, match="already attached"):
            moewatch.attach(model, **cfg)
        # a second model in the same process is served on a free port instead (tests/test_exporter_guard.py)
