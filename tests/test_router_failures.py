"""A router moewatch cannot read is visible: a ``RouterReadWarning`` naming it on its first failing call,
one log record, ``hook_errors`` in the report and on the real exporter (``moewatch_hook_errors_total``,
which the ``MoEWatchHookErrors`` rule watches; its promtool tests are in ``alerts/``), and training goes on.

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k, ``H`` hidden size.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import moewatch
from moewatch.exporter import PrometheusExporter
from moewatch.exporter.rules import alert_specs
from tests.fakes import quiet

H, E, K, T = 16, 4, 2, 24


class NewFangledRouter(nn.Module):
    """A transformers-style router (E, k, an [E, H] weight) with an output layout moewatch does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, K
        self.weight = nn.Parameter(torch.randn(E, H))

    def forward(self, x_TH: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_TE = x_TH @ self.weight.t()
        return {"logits": logits_TE, "ids": logits_TE.topk(K, dim=-1).indices}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([NewFangledRouter() for _ in range(2)])

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return sum(r(x_TH)["logits"].sum() for r in self.layers)


def test_router_failing_on_every_call_warns_once_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = moewatch.attach(
        model, optimizer=opt,
        **quiet(strict=False, window_steps=2, prometheus={"enabled": True, "host": "127.0.0.1", "port": 0}),
    )  # fmt: skip
    assert [r.module for r in watch.routers] == ["layers.0", "layers.1"]
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="moewatch"):
            warnings.simplefilter("always")
            for _ in range(4):
                opt.zero_grad()
                model(torch.randn(T, H)).backward()  # training never sees the error
                opt.step()
        read_warnings = [w for w in caught if issubclass(w.category, moewatch.RouterReadWarning)]
        assert len(read_warnings) == 2, "one warning per router, on its first call only"
        for w, name in zip(read_warnings, ["layers.0", "layers.1"], strict=True):
            assert f"router {name!r}" in str(w.message) and "NewFangledRouter" in str(w.message)
            assert "extractor=" in str(w.message)
        assert len([r for r in caplog.records if "NewFangledRouter" in r.getMessage()]) == 2
        report = watch.flush()
        assert watch.hook_errors == 2 and report.hook_errors == 2
        ex = watch.find_sink(PrometheusExporter)
        assert ex is not None
        text = requests.get(ex.url, timeout=5).text
        samples = {
            s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
        }
        assert samples["moewatch_hook_errors_total"] == 2
    finally:
        watch.close()
    rule = {s.name: s for s in alert_specs()}["MoEWatchHookErrors"]
    assert rule.expr == "moewatch_hook_errors_total > 0"


def test_first_call_failure_raises_in_strict_mode() -> None:
    model = Model()
    with moewatch.attach(model, **quiet(strict=True)):
        with pytest.raises(TypeError, match="NewFangledRouter"):
            model(torch.randn(T, H))


def test_warnings_as_errors_do_not_stop_training() -> None:
    model = Model()
    with moewatch.attach(model, **quiet(strict=False)) as watch, warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(T, H)).backward()  # the RouterReadWarning raised as an error is swallowed
        assert watch.hook_errors == 2
