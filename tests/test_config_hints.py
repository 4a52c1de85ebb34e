"""Config mistakes get the closest real field and its real environment variable."""

from __future__ import annotations

import pytest

from moewatch.config import ConfigError, build_config


def test_unknown_key_suggests_the_real_field_and_its_env_var() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(None, {"alerts": {"slack_webhook": "https://hooks.slack.com/services/T/B/x"}})
    msg = str(info.value)
    assert "did you mean `alerts.slack_webhook_url` ($MOEWATCH_ALERTS__SLACK_WEBHOOK_URL)?" in msg
    assert "$MOEWATCH_ALERTS__SLACK_WEBHOOK;" not in msg and "MOEWATCH_ALERTS__SLACK_WEBHOOK " not in msg


@pytest.mark.parametrize(
    ("var", "hint"),
    [
        ("MOEWATCH_WINDOWSTEPS", "did you mean `window_steps` ($MOEWATCH_WINDOW_STEPS)?"),
        ("MOEWATCH_WINDOW_STEP", "did you mean `window_steps` ($MOEWATCH_WINDOW_STEPS)?"),
        ("MOEWATCH_ALERTS__SLACK_WEBHOOK", "did you mean `alerts.slack_webhook_url` ($MOEWATCH_ALERTS__SLACK_WEBHOOK_URL)?"),
    ],
)
def test_unknown_env_vars_are_reported_with_the_closest_field(
    monkeypatch: pytest.MonkeyPatch, var: str, hint: str
) -> None:
    monkeypatch.setenv(var, "5")
    with pytest.raises(ConfigError) as info:
        build_config(None, {})
    assert f"${var}: not a moewatch setting; {hint}" in str(info.value)


def test_known_env_vars_and_mapping_fields_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEWATCH_WINDOW_STEPS", "7")
    monkeypatch.setenv("MOEWATCH_ALERTS__SEVERITIES", '{"collapsed": "critical"}')
    assert build_config(None, {}).window_steps == 7
