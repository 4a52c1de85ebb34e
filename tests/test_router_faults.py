"""Broken router outputs are visible: expert ids outside ``[0, E)`` and non-finite router outputs make the
layer ``warning`` (never ``insufficient_data``), raise their in-process alerts, show on /metrics and in the
console table, and invalid ids are logged once per router naming it and the range; an extractor whose ids
per token do not match ``top_k`` is rejected like any unreadable router.

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

import moewatch
from moewatch.alerting.settings import AlertCondition, Severity
from moewatch.alerting.sink import AlertSink
from moewatch.exporter import PrometheusExporter
from moewatch.report import HealthState
from moewatch.sinks.console import ConsoleSink, render_table
from tests.fakes import ToyMoE, quiet, tokens_for

E, K = 8, 2
ROUTERS = ["blocks.*.router"]


def _even(t: int) -> list[list[int]]:
    return [[(2 * i) % E, (2 * i + 1) % E] for i in range(t)]


def _ids_99(module, inputs, out):
    """The issue's extractor: every expert id is 99 for an E=8 router."""
    logits_TE, _, ids_TK = out
    return moewatch.RouterOutput(indices_TK=torch.full_like(ids_TK, 99), logits_TE=logits_TE)


def _samples(url: str) -> dict[tuple[str, str], float]:
    text = requests.get(url, timeout=5).text
    return {
        (s.name, s.labels.get("layer", "")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_all_invalid_ids_warn_once_alert_and_are_not_insufficient_data(caplog: pytest.LogCaptureFixture) -> None:
    model = ToyMoE(num_experts=E, top_k=K, layers=1)
    alerts = []
    watch = moewatch.attach(
        model, routers=ROUTERS, extractor=_ids_99,
        **quiet(prometheus={"enabled": True, "host": "127.0.0.1", "port": 0}),
    )  # fmt: skip
    watch.on_alert(lambda alert, layer: alerts.append(alert))
    try:
        with caplog.at_level(logging.WARNING, logger="moewatch"):
            reports = []
            for _ in range(3):  # three windows: the warning is logged once, on the first
                model(tokens_for(_even(64)))
                reports.append(watch.flush())
        for report in reports:
            layer = report.layers[0]
            assert (layer.invalid_ids, layer.invalid_ids_below, layer.assignments) == (128, 0, 0)
            assert layer.state is HealthState.WARNING, "all-invalid ids read as insufficient data"
            assert layer.reasons[0].startswith("invalid_ids 128 of 128 expert ids outside [0, 8) (128 >= 8)")
        logged = [r.getMessage() for r in caplog.records if "outside its range" in r.getMessage()]
        assert len(logged) == 1, logged
        assert "router 'blocks.0.router'" in logged[0] and "[0, 8)" in logged[0] and "128 >= 8" in logged[0]
        assert "window 0" in logged[0]

        samples = _samples(watch.find_sink(PrometheusExporter).url)
        assert samples[("moewatch_layer_invalid_ids", "0")] == 128
        assert samples[("moewatch_layer_state", "0")] == 1  # warning, not -1 (insufficient data never alerts)

        sink = watch.find_sink(AlertSink)
        assert sink.callbacks.drain()
        firing = {(a.condition, a.status) for a in alerts}
        # the layer's warning alert is held back by the more precise invalid_ids alert
        assert firing == {(AlertCondition.INVALID_IDS, "firing")}
        alert = alerts[0]
        assert alert.severity is Severity.WARNING and alert.name == "MoEWatchRouterInvalidIds"
        assert alert.invalid_ids == 128 and "128 expert ids out of range" in alert.summary
        assert "outside [0, 8)" in alert.description
    finally:
        watch.close()


def test_some_negative_ids_name_both_sides_of_the_range(caplog: pytest.LogCaptureFixture) -> None:
    model = ToyMoE(num_experts=E, top_k=K, layers=2)
    assign = _even(62) + [[-1, 3], [9, -2]]  # layer 0 and 1 see the same ids (ToyMoE passes them on)
    with caplog.at_level(logging.WARNING, logger="moewatch"), moewatch.attach(model, **quiet()) as watch:
        model(tokens_for(assign))
        report = watch.flush()
    for layer in report.layers:
        assert (layer.invalid_ids, layer.invalid_ids_below) == (3, 2)
        assert layer.state is HealthState.WARNING and "(2 below 0, 1 >= 8)" in layer.reasons[0]
    logged = [r.getMessage() for r in caplog.records if "outside its range" in r.getMessage()]
    assert [m.split("'")[1] for m in logged] == ["blocks.0.router", "blocks.1.router"]  # once per router
    assert "2 below 0, 1 >= 8" in logged[0]


def _three_ids(module, inputs, out):
    logits_TE, _, ids_TK = out
    return moewatch.RouterOutput(indices_TK=torch.cat([ids_TK, ids_TK[:, :1]], dim=1), logits_TE=logits_TE)


def test_extractor_with_more_ids_per_token_than_top_k_is_rejected() -> None:
    """Counting it would inflate the token count by 3/2; the router is skipped like an unreadable one."""
    model = ToyMoE(num_experts=E, top_k=K, layers=1)
    with moewatch.attach(model, routers=ROUTERS, extractor=_three_ids, **quiet(strict=True)):
        with pytest.raises(ValueError, match=r"shape \(64, 3\) \(3 expert ids per token\) but the router's top_k is 2"):
            model(tokens_for(_even(64)))
    with moewatch.attach(model, routers=ROUTERS, extractor=_three_ids, **quiet(strict=False)) as watch:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                model(tokens_for(_even(64)))
        report = watch.flush()
    read = [w for w in caught if issubclass(w.category, moewatch.RouterReadWarning)]
    assert len(read) == 1 and "top_k=K" in str(read[0].message) and "'blocks.0.router'" in str(read[0].message)
    assert watch.hook_errors == 1 and report.hook_errors == 1
    assert report.layers[0].tokens == 0  # nothing counted, rather than 96 tokens for 64


def test_extractor_ids_of_the_right_width_or_flat_are_counted() -> None:
    model = ToyMoE(num_experts=E, top_k=K, layers=1)

    def flat(module, inputs, out):
        return moewatch.RouterOutput(indices_TK=out[2].reshape(-1), logits_TE=out[0])

    for extractor in (lambda m, i, o: moewatch.RouterOutput(indices_TK=o[2], logits_TE=o[0]), flat):
        with moewatch.attach(model, routers=ROUTERS, extractor=extractor, **quiet()) as watch:
            model(tokens_for(_even(64)))
            layer = watch.flush().layers[0]
        assert layer.tokens == 64 and layer.assignments == 128 and layer.loads == [16] * E


def test_nonfinite_router_outputs_are_a_warning_on_console_and_metrics() -> None:
    model = ToyMoE(num_experts=E, top_k=K, layers=1)
    x = tokens_for(_even(64))
    x[:5, 4] = float("nan")  # five tokens' logits become NaN; their ids (the first K features) stay valid
    console = Console(record=True, width=120)
    alerts = []
    watch = moewatch.attach(
        model, sinks=[ConsoleSink(console=console)],
        **quiet(prometheus={"enabled": True, "host": "127.0.0.1", "port": 0}),
    )  # fmt: skip
    watch.on_alert(lambda alert, layer: alerts.append(alert))
    try:
        model(x)
        layer = watch.flush().layers[0]
        assert layer.nonfinite == 5 and layer.loads == [16] * E
        assert layer.state is HealthState.WARNING  # even loads: without the fault this layer is healthy
        assert layer.reasons == ["nonfinite 5 of 64 sampled router output rows are NaN/inf (warning)"]
        samples = _samples(watch.find_sink(PrometheusExporter).url)
        assert samples[("moewatch_layer_nonfinite", "0")] == 5 and samples[("moewatch_layer_state", "0")] == 1
        assert watch.find_sink(AlertSink).callbacks.drain()
        assert [(a.condition, a.severity) for a in alerts] == [(AlertCondition.NONFINITE, Severity.CRITICAL)]
    finally:
        watch.close()
    assert "NaN/inf" in console.export_text()
    table = render_table(watch.latest)
    cells = {str(c.header): [str(v) for v in c.cells] for c in table.columns}
    assert cells["NaN/inf"] == ["5"] and cells["bad ids"] == ["0"]


def test_invalid_ids_on_a_pipeline_stage_with_a_layer_offset_warn_once_under_the_global_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = ToyMoE(num_experts=E, top_k=K, layers=1)
    with caplog.at_level(logging.WARNING, logger="moewatch"), moewatch.attach(
        model, routers=ROUTERS, extractor=_ids_99, layer_offset=6, **quiet(strict=False, window_steps=1)
    ) as watch:
        for _ in range(2):
            model(tokens_for(_even(16)))
            report = watch.step()
    assert report is not None and report.layers[0].index == 6 and report.layers[0].invalid_ids == 16 * K
    logged = [r.getMessage() for r in caplog.records if "outside its range" in r.getMessage()]
    assert len(logged) == 1 and "(layer 6," in logged[0]
