"""Secrets in any encoding never reach logs, errors, CLI output or dumps (real loopback servers)."""

from __future__ import annotations

import argparse
import logging
import time
from urllib.parse import quote

import pytest

from moewatch.alerting.cli import run_alert_test
from moewatch.alerting.settings import AlertsConfig
from moewatch.alerting.sink import AlertSink
from moewatch.config import ConfigError, MoEWatchConfig, build_config
from moewatch.exporter import PrometheusExporter, PushgatewayConfig
from tests.webhook_server import WebhookServer, make_layer, make_report, status

SLACK_PATH = "/services/T0SECRET/B0SECRET/xoxbSECRETvalue"
TOKEN = "tokSECRET12345"


def _echoes(url: str) -> str:
    """A service error that quotes the request back in every form a proxy or a service might use."""
    path = SLACK_PATH.lstrip("/")
    return (
        f"no such hook: {path}; full {url}; encoded {quote(url, safe='')} / {quote(SLACK_PATH, safe='').lower()}; "
        f"query hook?token={TOKEN} and token%3D{TOKEN}"
    )


def test_service_errors_redacted_in_warnings_and_alert_test_output(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with WebhookServer() as srv:
        slack, hook = srv.url(SLACK_PATH), srv.url(f"/hook?token={TOKEN}")
        srv.default = status(400, _echoes(slack) + " " + _echoes(hook))
        monkeypatch.setenv("MOEWATCH_ALERTS__SLACK_WEBHOOK_URL", slack)
        monkeypatch.setenv("MOEWATCH_ALERTS__WEBHOOK_URL", hook)
        with caplog.at_level(logging.DEBUG):
            assert run_alert_test(argparse.Namespace(config=None, run_name="r", no_resolve=True)) == 1
            sink = AlertSink(AlertsConfig(slack_webhook_url=slack, webhook_url=hook, close_timeout=5))
            sink.emit(make_report(0, [make_layer(0, "collapsed")]))
            sink.close()
        assert len(srv.hits) >= 4  # two alert-test requests, two notifications: all answered with the echo
    out = capsys.readouterr().out
    assert "HTTP 400" in out and "no such hook" in out
    assert "rejected with HTTP 400" in caplog.text
    for text in (out, caplog.text):
        assert "SECRET" not in text.upper().replace("%", "")


def test_config_errors_never_echo_unknown_keys_or_secret_fields() -> None:
    for kw in (
        {"alerts": {"slack_webhook": "https://hooks.slack.com/services/TXSECRET/BX/abc"}},  # misspelled key
        {"alerts": {"webhook_url": ["https://example.com/hook?token=LISTSECRET"]}},  # wrong type
        {"alerts": {"pagerduty_routing_key": 12345678901234567890}},
        {"pushgateway": {"url": ["http://bob:PWSECRET@127.0.0.1:9091"]}},
    ):
        with pytest.raises(ConfigError) as info:
            build_config(None, kw)
        assert "SECRET" not in str(info.value) and "1234567890" not in str(info.value)
        assert "(value hidden)" in str(info.value)
        with pytest.raises(ValueError) as raw:  # pydantic's own error text, too
            MoEWatchConfig(**kw)
        assert "SECRET" not in str(raw.value) and "1234567890" not in str(raw.value)
    with pytest.raises(ConfigError, match=r"\(got 'abc'\)"):  # other values are still shown
        build_config(None, {"window_steps": "abc"})


def test_pushgateway_password_never_in_reprs_dumps_or_warnings(caplog: pytest.LogCaptureFixture) -> None:
    with WebhookServer() as srv:  # answers PUT with 501: the push fails
        port = srv.httpd.server_address[1]
        url = f"http://bob:PWSECRET@127.0.0.1:{port}"
        cfg = MoEWatchConfig(pushgateway={"url": url}, prometheus={"enabled": False})
        assert cfg.pushgateway.url == url  # the real value is still used
        for text in (repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump()), repr(cfg.pushgateway)):
            assert "PWSECRET" not in text and "bob:<redacted>@" in text
        with caplog.at_level(logging.DEBUG):
            ex = PrometheusExporter("pw", cfg.prometheus, PushgatewayConfig(url=url))
            assert "PWSECRET" not in repr(ex) and "PWSECRET" not in str(ex.pushgateway_url)
            ex.emit(make_report(0, [make_layer(0, "healthy")]))
            time.sleep(0.5)
            ex.close()
    assert "push to Pushgateway" in caplog.text
    assert "PWSECRET" not in caplog.text
