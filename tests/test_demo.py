"""The demo reproduces what the seed predicts, through the real CLI path."""

import json

import pytest

from moewatch.cli import main
from moewatch.demo.run import DemoOptions, run_demo
from moewatch.report import HealthState

QUIET_ENV = {"MOEWATCH_PROMETHEUS__ENABLED": "false", "MOEWATCH_ALERTS__ENABLED": "false"}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    for k, v in QUIET_ENV.items():
        monkeypatch.setenv(k, v)


def test_balance_none_collapses_within_300_steps(tmp_path):
    result = run_demo(DemoOptions(balance="none", console=False, jsonl=tmp_path / "none.jsonl"))
    collapsed = [
        (r.step_end, layer)
        for r in result.reports
        if r.step_end <= 300
        for layer in r.layers
        if layer.state is HealthState.COLLAPSED
        and layer.load_cov > 1.0
        and layer.top2_share > 0.5
        and layer.dead_experts >= 2
    ]
    assert collapsed, "no layer collapsed with load_cov > 1, top2_share > 0.5 and 2+ dead experts"
    assert result.reports[-1].state is HealthState.COLLAPSED  # dead experts never come back
    assert len(result.reports) == 30 and result.reports[-1].step_end == 300


@pytest.mark.parametrize("seed", [0, 1])
def test_balance_bias_stays_healthy_after_warmup(tmp_path, seed):
    result = run_demo(DemoOptions(balance="bias", seed=seed, console=False, jsonl=tmp_path / "bias.jsonl"))
    after_warmup = result.reports[1:]  # the first window is the bias's warm-up
    assert len(after_warmup) == 29
    for r in after_warmup:
        assert r.state is HealthState.HEALTHY, (r.step_end, [(la.state, la.reasons) for la in r.layers])
        assert all(layer.load_cov < 0.2 for layer in r.layers)


def test_cli_demo_writes_jsonl_and_prints_summary(tmp_path, capsys):
    path = tmp_path / "demo.jsonl"
    code = main(["demo", "--steps", "40", "--window", "10", "--no-console", "--jsonl", str(path), "--layers", "3"])
    assert code == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert first["run"] == "demo-none-seed0" and len(first["layers"]) == 3
    out = capsys.readouterr().out
    assert "moewatch demo summary" in out and "JSONL log" in out


def test_cli_rejects_bad_arguments_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--experts", "0"])
    assert exc.value.code == 2
    assert "must be > 0" in capsys.readouterr().err
    assert main(["demo", "--experts", "4", "--top-k", "5", "--no-console"]) == 2
    assert "--top-k 5 must not exceed --experts 4" in capsys.readouterr().err


def test_cli_bad_env_config_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("MOEWATCH_MIN_FAIR_SHARE", "-3")
    assert main(["demo", "--steps", "5", "--no-console"]) == 2
    assert "MOEWATCH_MIN_FAIR_SHARE" in capsys.readouterr().err
