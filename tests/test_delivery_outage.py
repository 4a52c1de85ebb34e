"""Endpoints down across a collapse, then back, against a real loopback server: every notifier gets the
group's current state exactly once after recovery, nothing twice, nothing dropped. The outage here is a few
seconds with a short backoff cap; ``benchmarks/alert_outage.py`` runs the same scenario for 60 s with the
default cap."""

from __future__ import annotations

import logging
import time

import pytest

from moewatch.alerting.settings import AlertsConfig
from moewatch.alerting.sink import AlertSink
from tests.webhook_server import WebhookServer, make_layer, make_report, ok, status

PD_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
PATHS = ("/slack", "/pd", "/am")
OUTAGE_S = 3.0


def _config(url, **kw) -> AlertsConfig:
    return AlertsConfig(
        slack_webhook_url=url("/slack"), slack_min_interval=0, pagerduty_routing_key=PD_KEY,
        pagerduty_url=url("/pd"), webhook_url=url("/am"), connect_timeout=0.5, read_timeout=1.0,
        backoff_initial=0.05, backoff_max=0.5, close_timeout=10, **kw,
    )


def _reports():
    """Window 0: layers 0-1 collapse; window 1: layer 2 too; windows 2-3: unchanged."""
    w0 = [make_layer(0, "collapsed"), make_layer(1, "collapsed"), make_layer(2, "healthy")]
    w1 = [make_layer(i, "collapsed") for i in range(3)]
    return [make_report(0, w0), make_report(1, w1), make_report(2, w1), make_report(3, w1)]


def _firing_layers(path: str, body) -> set[str]:
    if path == "/slack":
        return {f"layer {i}" for i in range(3) if f"layer {i}" in str(body)}
    if path == "/pd":
        assert body["event_action"] == "trigger"
        return {f"layer {i}" for i in range(3) if f"layer {i}" in str(body["payload"])}
    assert body["status"] == "firing"
    return {f"layer {a['labels']['layer']}" for a in body["alerts"] if a["status"] == "firing"}


def _check(srv: WebhookServer, sink: AlertSink, recovered_at: float) -> None:
    got = {p: [h for h in srv.answered(200) if h.path == p] for p in PATHS}
    for path, hits in got.items():
        assert len(hits) == 1, f"{path}: {len(hits)} notifications after recovery"
        assert hits[0].time >= recovered_at - 0.05
        assert _firing_layers(path, hits[0].body) == {"layer 0", "layer 1", "layer 2"}, path  # the present
    for name, stats in sink.delivery_stats().items():
        assert stats["sent"] == 1 and stats["dropped"] == 0 and stats["failed"] == 0, (name, stats)


@pytest.mark.parametrize("fault", ["http500", "refused"])
def test_outage_across_collapse_delivers_present_state_once(fault: str, caplog: pytest.LogCaptureFixture) -> None:
    first = WebhookServer(default=status(500, "down")).__enter__()
    port = first.httpd.server_address[1]
    url = first.url
    if fault == "refused":
        first.stop()  # nothing listens on the port: connections are refused
    sink = AlertSink(_config(url))
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="moewatch"):
        for report in _reports():  # a collapse during the outage, one window every 0.4 s
            sink.emit(report)
            time.sleep(0.4)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t0)))
        if fault == "refused":
            srv = WebhookServer(port=port).__enter__()  # the endpoint comes back where it was
        else:
            srv = first
            srv.default = ok()
        recovered_at = time.time()
        try:
            for path in PATHS:
                deadline = time.monotonic() + 5
                while not [h for h in srv.answered(200) if h.path == path] and time.monotonic() < deadline:
                    time.sleep(0.02)
            time.sleep(1.0)  # anything still to come (a duplicate) would arrive now
            sink.emit(make_report(4, [make_layer(i, "collapsed") for i in range(3)]))  # unchanged: nothing new
            sink.close()
            _check(srv, sink, recovered_at)
            if fault == "http500":
                assert len(srv.answered(500)) >= 3 * 3  # each notifier did retry during the outage
        finally:
            srv.stop()
    assert "PD_KEY" not in caplog.text and PD_KEY not in caplog.text


def test_close_logs_and_counts_what_is_undelivered(caplog: pytest.LogCaptureFixture) -> None:
    with WebhookServer(default=status(500, "down")) as srv:
        sink = AlertSink(_config(srv.url, ).model_copy(update={"close_timeout": 0.5}))
        sink.emit(_reports()[0])
        time.sleep(0.3)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="moewatch"):
            sink.close()
        took = time.monotonic() - t0
    assert took < 0.5 + 0.5
    assert {name: s["dropped"] for name, s in sink.delivery_stats().items()} == {
        "slack": 1, "pagerduty": 1, "webhook": 1,
    }
    assert "1 notification(s) still undelivered at close" in caplog.text
