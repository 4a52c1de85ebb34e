"""Alert rules: in sync with the generator, valid for promtool 2.42, unit-tested, documented, routable."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import requests
import yaml
from promhelpers import REPO, layer_report, require_binary, window_report

from moewatch.exporter import PrometheusConfig, PrometheusExporter
from moewatch.exporter.rules import RuleOptions, alert_specs, rules_test_yaml, rules_yaml

ALERTS = REPO / "alerts"


def test_committed_rules_equal_generated() -> None:
    assert (ALERTS / "moewatch-rules.yaml").read_text() == rules_yaml(), (
        "run python -m moewatch.exporter.generate"
    )
    assert (ALERTS / "moewatch-rules.test.yaml").read_text() == rules_test_yaml()


def test_every_alert_is_complete_and_in_the_runbook() -> None:
    rules = yaml.safe_load((ALERTS / "moewatch-rules.yaml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {
        "MoEWatchLayerCollapsed",
        "MoEWatchLayerWarning",
        "MoEWatchDeadExperts",
        "MoEWatchExporterAbsent",
        "MoEWatchTrainingStalled",
        "MoEWatchProjectedCollapse",
        "MoEWatchHookErrors",
    }
    runbook = (ALERTS / "runbook.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^## (.+)$", runbook, re.M)}
    for r in rules:
        assert r["for"] and r["labels"]["severity"] in ("critical", "warning")
        assert {"summary", "description", "runbook_url"} <= set(r["annotations"])
        anchor = r["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor in headings, f"runbook.md has no section for {r['alert']}"
    severity = {r["alert"]: r["labels"]["severity"] for r in rules}
    assert severity["MoEWatchLayerCollapsed"] == "critical" and severity["MoEWatchLayerWarning"] == "warning"


def test_promtool_check_and_unit_tests() -> None:
    promtool = require_binary("promtool")
    out = subprocess.run(
        [promtool, "check", "rules", "moewatch-rules.yaml"], cwd=ALERTS, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(
        [promtool, "test", "rules", "moewatch-rules.test.yaml"], cwd=ALERTS, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_unit_tests_catch_a_wrong_for(tmp_path: Path) -> None:
    """The promtool tests pin each `for`: rules with a shorter one fail them."""
    promtool = require_binary("promtool")
    (tmp_path / "moewatch-rules.yaml").write_text(rules_yaml(RuleOptions(collapsed_for="3m")))
    (tmp_path / "moewatch-rules.test.yaml").write_text(rules_test_yaml())
    out = subprocess.run(
        [promtool, "test", "rules", "moewatch-rules.test.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode != 0 and "MoEWatchLayerCollapsed" in out.stdout + out.stderr


def test_short_rules_for_e2e_are_valid(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    path = tmp_path / "short.yaml"
    path.write_text(rules_yaml(RuleOptions(job="e2e").short("2s")))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alertmanager_example_config() -> None:
    amtool = require_binary("amtool")
    out = subprocess.run(
        [amtool, "check-config", "alertmanager.example.yaml"], cwd=ALERTS, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    cfg = yaml.safe_load((ALERTS / "alertmanager.example.yaml").read_text())
    routes = {tuple(r["matchers"]): r["receiver"] for r in cfg["route"]["routes"]}
    receivers = {r["name"]: r for r in cfg["receivers"]}
    crit = next(v for k, v in routes.items() if 'severity="critical"' in k)
    warn = next(v for k, v in routes.items() if 'severity="warning"' in k)
    assert "pagerduty_configs" in receivers[crit] and "slack_configs" in receivers[warn]


@pytest.mark.parametrize("spec", alert_specs(), ids=lambda s: s.name)
def test_rules_query_exported_metrics(spec) -> None:
    ex = PrometheusExporter("r1", PrometheusConfig(host="127.0.0.1", port=0))
    try:
        ex.emit(window_report([layer_report(0, [4, 3, 2, 1], projected_collapse_step=100)]))
        text = requests.get(ex.url, timeout=5).text
    finally:
        ex.close()
    for metric in re.findall(r"\bmoewatch_\w+", spec.expr):
        assert re.search(rf"^{metric}\{{", text, re.M), f"{spec.name} uses {metric}, not exported"
