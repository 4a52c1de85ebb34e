"""Alert configuration: environment, config file, secrets, URL policy, and ``moewatch alert-test``."""

from __future__ import annotations

import json

import pytest

from moewatch.alerting.settings import AlertCondition, AlertsConfig
from moewatch.alerting.sink import AlertSink, build_notifiers
from moewatch.config import ConfigError, MoEWatchConfig
from tests.webhook_server import WebhookServer, status

SLACK = "https://hooks.slack.com/services/T0SECRET/B0SECRET/abcSECRETxyz"
PD_KEY = "R0UT1NGSECRET0123456789abcdefABC"


def test_every_field_has_a_description() -> None:
    missing = [name for name, f in AlertsConfig.model_fields.items() if not f.description]
    assert missing == []


def test_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEWATCH_ALERTS__SLACK_WEBHOOK_URL", SLACK)
    monkeypatch.setenv("MOEWATCH_ALERTS__PAGERDUTY_ROUTING_KEY", PD_KEY)
    monkeypatch.setenv("MOEWATCH_ALERTS__WEBHOOK_URL", "http://127.0.0.1:9/hook")
    monkeypatch.setenv("MOEWATCH_ALERTS__REPEAT_INTERVAL", "1h30m")
    monkeypatch.setenv("MOEWATCH_ALERTS__FOR_WINDOWS", "3")
    monkeypatch.setenv("MOEWATCH_ALERTS__PAGERDUTY_CONDITIONS", '["collapsed"]')
    cfg = MoEWatchConfig()
    a = cfg.alerts
    assert a.slack_webhook_url.get_secret_value() == SLACK
    assert a.pagerduty_routing_key.get_secret_value() == PD_KEY
    assert a.repeat_interval == 5400 and a.for_windows == 3
    assert a.pagerduty_conditions == [AlertCondition.COLLAPSED]
    sink = AlertSink(a)
    assert [w.name for w in sink.workers] == ["slack", "pagerduty", "webhook"]
    # secrets appear in no repr, str or dump
    for text in (repr(cfg), str(cfg), cfg.model_dump_json(), repr(sink), repr(sink.workers[0].notifier),
                 repr(sink.workers[1].notifier), json.dumps(sink.state_dict())):
        assert "SECRET" not in text
    sink.close()


def test_from_config_file(tmp_path) -> None:
    path = tmp_path / "moewatch.toml"
    path.write_text(
        f'[alerts]\nslack_webhook_url = "{SLACK}"\nresolve_windows = 4\nconditions = ["collapsed", "dead_experts"]\n'
        'grafana_url = "https://grafana.example.com"\n'
    )
    a = MoEWatchConfig.from_file(path).alerts
    assert a.resolve_windows == 4 and a.conditions == [AlertCondition.COLLAPSED, AlertCondition.DEAD_EXPERTS]
    assert a.slack_webhook_url.get_secret_value() == SLACK


@pytest.mark.parametrize("field", ["slack_webhook_url", "webhook_url"])
def test_plain_http_only_to_loopback(field: str) -> None:
    secret = "http://alerts.example.com/hooks/SECRETTOKEN"
    with pytest.raises(ConfigError) as err:
        build_notifiers(AlertsConfig(**{field: secret}))
    msg = str(err.value)
    assert f"alerts.{field}" in msg and "alerts.allow_insecure_http" in msg and "SECRET" not in msg
    assert build_notifiers(AlertsConfig(**{field: secret, "allow_insecure_http": True}))
    assert build_notifiers(AlertsConfig(**{field: "http://localhost:8080/x"}))
    assert build_notifiers(AlertsConfig(**{field: "http://[::1]:8080/x"}))
    with pytest.raises(ConfigError, match=f"alerts.{field} is not an http"):
        build_notifiers(AlertsConfig(**{field: "ftp://x/SECRET"}))


def test_pagerduty_url_checked_and_attach_fails_fast() -> None:
    with pytest.raises(ConfigError, match="alerts.pagerduty_url"):
        build_notifiers(AlertsConfig(pagerduty_routing_key=PD_KEY, pagerduty_url="http://10.0.0.1/v2/enqueue"))
    assert AlertsConfig().pagerduty_url == "https://events.pagerduty.com/v2/enqueue"


def test_bad_duration_names_the_field() -> None:
    from moewatch.config import build_config

    with pytest.raises(ConfigError, match="alerts.repeat_interval: .*not a duration"):
        build_config(None, {"alerts": {"repeat_interval": "soonish"}})


def test_alert_test_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from moewatch.cli import main

    with WebhookServer() as slack, WebhookServer(default=status(202, '{"status":"success"}')) as pd, \
            WebhookServer(default=status(400, '{"error":"bad receiver"}')) as hook:
        monkeypatch.setenv("MOEWATCH_ALERTS__SLACK_WEBHOOK_URL", slack.url("/services/SECRET"))
        monkeypatch.setenv("MOEWATCH_ALERTS__PAGERDUTY_ROUTING_KEY", PD_KEY)
        monkeypatch.setenv("MOEWATCH_ALERTS__PAGERDUTY_URL", pd.url("/v2/enqueue"))
        monkeypatch.setenv("MOEWATCH_ALERTS__WEBHOOK_URL", hook.url("/am"))
        code = main(["alert-test", "--run-name", "smoke"])
        out = capsys.readouterr().out
        assert code == 1  # the webhook answered 400
        assert len(slack.answered(200)) == 1 and slack.hits[0].body["text"].startswith("[TEST]")
        assert [h.body["event_action"] for h in pd.hits] == ["trigger", "resolve"]
        assert pd.hits[0].body["dedup_key"] == pd.hits[1].body["dedup_key"]
        assert pd.hits[0].body["payload"]["severity"] == "info"
        assert hook.hits[0].body["alerts"][0]["labels"]["alertname"] == "MoEWatchTest"
        assert len(hook.hits) == 1  # 4xx: not retried
    lines = out.splitlines()
    assert any(line.startswith("slack") and "ok HTTP 200" in line for line in lines)
    assert sum(line.startswith("pagerduty") and "ok HTTP 202" in line for line in lines) == 2
    assert any(line.startswith("webhook") and "FAILED HTTP 400" in line and "bad receiver" in line for line in lines)
    assert "SECRET" not in out and PD_KEY not in out


def test_alert_test_without_notifiers(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from moewatch.cli import main

    for var in ("SLACK_WEBHOOK_URL", "PAGERDUTY_ROUTING_KEY", "WEBHOOK_URL"):
        monkeypatch.delenv(f"MOEWATCH_ALERTS__{var}", raising=False)
    assert main(["alert-test"]) == 1
    assert "MOEWATCH_ALERTS__SLACK_WEBHOOK_URL" in capsys.readouterr().out
    monkeypatch.setenv("MOEWATCH_ALERTS__WEBHOOK_URL", "http://hooks.example.com/SECRET")
    assert main(["alert-test"]) == 2
    err = capsys.readouterr().err
    assert "alerts.allow_insecure_http" in err and "SECRET" not in err
