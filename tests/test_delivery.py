"""Delivery under fault injection against a real loopback server: 500s, 429 + Retry-After, dropped
connections, hanging endpoints, 4xx, a full queue, close() with a time limit, and secrets in logs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pytest

from moewatch.alerting.delivery import DeliveryWorker, HttpRequest, RetryPolicy, retry_after_seconds
from moewatch.alerting.model import Notification
from moewatch.alerting.settings import AlertCondition, AlertsConfig
from moewatch.alerting.sink import AlertSink
from tests.webhook_server import WebhookServer, make_layer, make_report, status

SECRET_PATH = "/services/T0SECRET/B0SECRET/xoxbSECRETvalue"


def _policy(**kw) -> RetryPolicy:
    base = dict(connect_timeout=1.0, read_timeout=1.0, max_retries=4, backoff_initial=0.02, backoff_max=0.1)
    return RetryPolicy(**{**base, **kw})


@dataclass
class _Echo:
    """A minimal notifier: posts {"window": n} to a URL."""

    url: str
    name: str = "echo"
    min_interval: float = 0.0
    conditions: frozenset = frozenset(AlertCondition)

    def render(self, n: Notification) -> list[HttpRequest]:
        return [HttpRequest(self.url, {"window": n.window}, label=f"window {n.window}")]

    def secrets(self) -> list[str]:
        return [self.url]

    def target(self) -> str:
        return "echo"


def _n(window: int, run: str = "r") -> Notification:
    return Notification(run=run, window=window, step=window, time=0.0, alerts=())


def _deliver(srv: WebhookServer, count: int = 1, timeout: float = 10.0, **policy) -> DeliveryWorker:
    w = DeliveryWorker(_Echo(srv.url(SECRET_PATH)), _policy(**policy), queue_size=10)
    for i in range(count):
        w.submit(_n(i, run=f"r{i}"))
    assert w.close(time.monotonic() + timeout)
    return w


def test_retries_500_until_recovery_and_delivers_once() -> None:
    with WebhookServer([status(500, "boom"), status(502), status(503)]) as srv:
        w = _deliver(srv)
    assert [h.answer for h in srv.hits] == ["500", "502", "503", "200"]
    assert len(srv.answered(200)) == 1
    assert w.stats.as_dict() == {"sent": 1, "failed": 0, "retried": 3, "dropped": 0, "coalesced": 0}


def test_429_honours_retry_after() -> None:
    with WebhookServer([status(429, "rate_limited", {"Retry-After": "1"})]) as srv:
        w = _deliver(srv, backoff_initial=0.01)
    first, second = srv.hits
    assert first.answer == "429" and second.answer == "200"
    assert second.time - first.time >= 0.95  # waited Retry-After, not the 10 ms backoff
    assert w.stats.as_dict()["retried"] == 1 and w.stats.as_dict()["sent"] == 1


def test_retry_after_forms() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_seconds(future) <= 31


def test_retry_after_is_capped() -> None:
    with WebhookServer([status(429, "", {"Retry-After": "3600"})]) as srv:
        t0 = time.monotonic()
        _deliver(srv, retry_after_max=0.2)
    assert time.monotonic() - t0 < 5 and len(srv.answered(200)) == 1


def test_closed_connections_are_retried() -> None:
    with WebhookServer([("close",), ("close",)]) as srv:
        w = _deliver(srv)
    assert [h.answer for h in srv.hits] == ["close", "close", "200"]
    assert w.stats.as_dict() == {"sent": 1, "failed": 0, "retried": 2, "dropped": 0, "coalesced": 0}


def test_hanging_endpoint_times_out_then_recovers() -> None:
    with WebhookServer([("hang",)]) as srv:
        t0 = time.monotonic()
        w = _deliver(srv, read_timeout=0.3)
    assert [h.answer for h in srv.hits] == ["hang", "200"]
    assert 0.3 <= time.monotonic() - t0 < 5
    assert w.stats.as_dict() == {"sent": 1, "failed": 0, "retried": 1, "dropped": 0, "coalesced": 0}


def test_4xx_not_retried_and_body_logged_without_secret(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), WebhookServer([status(404, "no_service")]) as srv:
        w = _deliver(srv, count=2)
    assert [h.answer for h in srv.hits] == ["404", "200"]  # first given up at once, second delivered
    assert w.stats.as_dict() == {"sent": 1, "failed": 1, "retried": 0, "dropped": 0, "coalesced": 0}
    assert "rejected with HTTP 404, not retried: no_service" in caplog.text
    assert "SECRET" not in caplog.text  # urllib3's DEBUG lines name the path: redacted


def test_gives_up_after_max_retries(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), WebhookServer(default=status(500, "down")) as srv:
        w = _deliver(srv, max_retries=2)
    assert len(srv.hits) == 3
    assert w.stats.as_dict() == {"sent": 0, "failed": 1, "retried": 2, "dropped": 0, "coalesced": 0}
    assert "failed after 3 attempts: HTTP 500: down" in caplog.text
    assert "SECRET" not in caplog.text


def test_connection_refused_never_leaks_url(caplog: pytest.LogCaptureFixture) -> None:
    with WebhookServer() as srv:
        url = srv.url(SECRET_PATH)
    w = DeliveryWorker(_Echo(url), _policy(max_retries=1), queue_size=2)  # server is gone: refused
    with caplog.at_level(logging.DEBUG):
        w.submit(_n(0))
        assert w.close(time.monotonic() + 5)
    assert w.stats.as_dict() == {"sent": 0, "failed": 1, "retried": 1, "dropped": 0, "coalesced": 0}
    assert "ConnectionError" in caplog.text and "SECRET" not in caplog.text


def test_full_queue_drops_oldest_and_counts() -> None:
    with WebhookServer([("hang",)]) as srv:
        w = DeliveryWorker(_Echo(srv.url()), _policy(read_timeout=0.5, max_retries=0), queue_size=2)
        w.submit(_n(0))  # taken by the worker, which then hangs on it
        deadline = time.monotonic() + 5
        while not srv.hits and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(1, 6):
            w.submit(_n(i, run=f"r{i}"))  # five alert groups: nothing to coalesce
        assert w.pending() == 2
        assert w.close(time.monotonic() + 5)
    assert [h.body["window"] for h in srv.answered(200)] == [4, 5]  # the newest survived
    assert w.stats.as_dict() == {"sent": 2, "failed": 1, "retried": 0, "dropped": 3, "coalesced": 0}


def test_close_returns_within_limit_with_hanging_endpoint() -> None:
    with WebhookServer(default=("hang",)) as srv:
        w = DeliveryWorker(_Echo(srv.url()), _policy(read_timeout=30.0), queue_size=10)
        for i in range(3):
            w.submit(_n(i, run=f"r{i}"))
        t0 = time.monotonic()
        done = w.close(time.monotonic() + 0.5)
        took = time.monotonic() - t0
        assert not done and took < 1.0
        assert w.stats.as_dict()["dropped"] == 3  # one in flight, two never started: all undelivered
        w.submit(_n(9))  # after close: dropped, never blocks
        assert w.stats.as_dict()["dropped"] == 4


def test_slack_rate_limit_one_message_per_interval() -> None:
    with WebhookServer() as srv:
        cfg = AlertsConfig(slack_webhook_url=srv.url(), slack_min_interval=0.3, close_timeout=5)
        sink = AlertSink(cfg)
        for w in range(3):  # each window a new layer collapses: three notifications
            sink.emit(make_report(w, [make_layer(i, "collapsed" if i <= w else "healthy") for i in range(3)]))
            # the next one follows the moment this one is sent (one still waiting would be coalesced)
            srv.wait_for(w + 1, timeout=5)
        sink.close()
    times = [h.time for h in srv.answered(200)]
    assert len(times) == 3
    assert all(b - a >= 0.28 for a, b in zip(times, times[1:], strict=False))


def test_alerts_delivered_once_after_outage_none_twice() -> None:
    """Slack down (500s, dropped connections, 429) during collapse and recovery: each message arrives once."""
    script = [status(500), ("close",), status(429, "", {"Retry-After": "0.2"}), status(503), ("close",)]
    with WebhookServer(script) as srv:
        cfg = AlertsConfig(
            slack_webhook_url=srv.url(SECRET_PATH), slack_min_interval=0, backoff_initial=0.02, backoff_max=0.1,
            max_retries=10, close_timeout=10,
        )
        sink = AlertSink(cfg)
        bad = [make_layer(i, "collapsed", dead=(1,)) for i in range(4)]
        good = [make_layer(i, "healthy") for i in range(4)]
        for w, layers in enumerate([bad, bad]):
            sink.emit(make_report(w, layers))
        srv.wait_for(1, timeout=10)  # the firing message got through (after three failures)...
        for w, layers in enumerate([good, good, good], start=2):
            sink.emit(make_report(w, layers))  # ...then the resolve meets two more
        sink.close()
    delivered = [h.body["text"] for h in srv.answered(200)]
    assert len(delivered) == 2 and len(set(delivered)) == 2
    assert delivered[0].startswith("[FIRING:8]") and delivered[1].startswith("[RESOLVED]")
    assert sink.delivery_stats()["slack"] == {"sent": 2, "failed": 0, "retried": 5, "dropped": 0, "coalesced": 0}


def test_unclosed_sink_flushes_at_interpreter_exit() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; from tests.webhook_server import make_layer, make_report\n"
        "from moewatch.alerting.settings import AlertsConfig\n"
        "from moewatch.alerting.sink import AlertSink\n"
        "sink = AlertSink(AlertsConfig(webhook_url=sys.argv[1], close_timeout=10, read_timeout=0.3,"
        " backoff_initial=0.01))\n"
        "sink.emit(make_report(0, [make_layer(0, 'collapsed')]))\n"  # and exit without close()
    )
    # the endpoint is slow: the message is still queued when the interpreter starts to exit
    with WebhookServer([("hang",)]) as srv:
        env = {"PYTHONPATH": str(Path(__file__).parent), "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-c", code, srv.url()], env=env, check=True, timeout=60)
        delivered = srv.answered(200)
    assert len(delivered) == 1 and delivered[0].body["status"] == "firing"
