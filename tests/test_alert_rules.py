"""Alert rules: in sync with the generator, valid for promtool 2.42, unit-tested, documented, routable."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from moewatch.alerting.model import ALERT_NAMES
from moewatch.alerting.settings import AlertCondition, AlertsConfig
from moewatch.exporter import PrometheusConfig, PrometheusExporter
from moewatch.exporter.rules import RuleOptions, alert_specs, rules_test_yaml, rules_yaml
from tests.promhelpers import REPO, layer_report, require_binary, window_report

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
        "MoEWatchRouterNonFinite",
        "MoEWatchRouterInvalidIds",
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


def test_rules_share_names_and_severities_with_the_in_process_alerts() -> None:
    """An alert that exists both in process (``moewatch.alerting``) and as a Prometheus rule has one name and
    one default severity, so silences, routes and inhibitions written for one match the other."""
    rules = {s.name: s.severity for s in alert_specs()}
    cfg = AlertsConfig()
    for cond, name in ALERT_NAMES.items():
        if name in rules:
            assert rules[name] == cfg.severity_of(cond).value, name
    for cond in (AlertCondition.NONFINITE, AlertCondition.INVALID_IDS):
        assert ALERT_NAMES[cond] in rules, f"no Prometheus rule for the in-process {cond.value} alert"


def _promtool_test(tmp_path: Path, rules: str, tests: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    (tmp_path / "moewatch-rules.yaml").write_text(rules)
    (tmp_path / "moewatch-rules.test.yaml").write_text(tests)
    return subprocess.run(
        [promtool, "test", "rules", "moewatch-rules.test.yaml"], cwd=tmp_path, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "name,metric",
    [("MoEWatchRouterNonFinite", "moewatch_layer_nonfinite"), ("MoEWatchRouterInvalidIds", "moewatch_layer_invalid_ids")],
)
def test_unit_tests_catch_a_broken_fault_rule(tmp_path: Path, name: str, metric: str) -> None:
    """The promtool cases of the broken-output rules fail against a rule that never fires (a wrong metric) and
    against one that fires at 0 (always ringing)."""
    good = rules_yaml()
    assert f"expr: {metric} > 0" in good
    for broken in (f"expr: {metric}_typo > 0", f"expr: {metric} >= 0"):
        out = _promtool_test(tmp_path, good.replace(f"expr: {metric} > 0", broken), rules_test_yaml())
        assert out.returncode != 0 and name in out.stdout + out.stderr, broken


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
