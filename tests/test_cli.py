"""The command line as a new user meets it: --version, python -m, bare `moewatch`, a fast --help,
alert-test failures, and the demo's environment, log, --linger and per-window output."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moewatch import __version__
from moewatch.cli import build_parser, main
from tests.webhook_server import WebhookServer, status

REPO = Path(__file__).resolve().parents[1]
QUIET = {"MOEWATCH_PROMETHEUS__ENABLED": "false", "MOEWATCH_ALERTS__ENABLED": "false"}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def test_version_flag_and_python_dash_m():
    out = _run("-m", "moewatch", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"moewatch {__version__}"
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0


def test_bare_moewatch_prints_help_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moewatch") and "demo" in out and "alert-test" in out
    bare = _run("-m", "moewatch")
    assert bare.returncode == 0 and "usage: moewatch" in bare.stdout


def test_help_imports_nothing_heavy():
    """--help builds the parser only: no torch, numpy, rich or pydantic-settings (4.5 s before; see
    benchmarks/cli_startup.py for the timing)."""
    code = (
        "import sys, moewatch.cli; moewatch.cli.build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'numpy', 'rich', 'pydantic_settings', 'requests') if m in sys.modules))"
    )
    out = _run("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_alert_test_failures_say_what_went_wrong(monkeypatch, capsys):
    monkeypatch.setenv("MOEWATCH_ALERTS__WEBHOOK_URL", f"http://127.0.0.1:{_closed_port()}/hook")
    monkeypatch.setenv("MOEWATCH_ALERTS__ALLOW_INSECURE_HTTP", "true")
    monkeypatch.setenv("MOEWATCH_ALERTS__BACKOFF_INITIAL", "0.01")
    for var in ("SLACK_WEBHOOK_URL", "PAGERDUTY_ROUTING_KEY"):
        monkeypatch.delenv(f"MOEWATCH_ALERTS__{var}", raising=False)
    assert main(["alert-test"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if "FAILED" in x)
    after = line.split("): ", 1)[1]
    assert after.strip() and "could not connect" in after, line


def test_pagerduty_resolve_is_not_sent_after_a_failed_trigger(monkeypatch, capsys):
    with WebhookServer(default=status(400, "")) as pd:
        monkeypatch.setenv("MOEWATCH_ALERTS__PAGERDUTY_ROUTING_KEY", "k" * 32)
        monkeypatch.setenv("MOEWATCH_ALERTS__PAGERDUTY_URL", pd.url("/v2/enqueue"))
        monkeypatch.setenv("MOEWATCH_ALERTS__ALLOW_INSECURE_HTTP", "true")
        for var in ("SLACK_WEBHOOK_URL", "WEBHOOK_URL"):
            monkeypatch.delenv(f"MOEWATCH_ALERTS__{var}", raising=False)
        assert main(["alert-test"]) == 1
        assert [h.body["event_action"] for h in pd.hits] == ["trigger"]
    out = capsys.readouterr().out
    assert "skipped: the trigger failed" in out
    assert "HTTP 400 with an empty body" in out  # never nothing after the colon


def _demo(tmp_path: Path, *extra: str) -> list[dict]:
    path = tmp_path / "demo.jsonl"
    assert main(["demo", "--steps", "20", "--no-console", "--jsonl", str(path), *extra]) == 0
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_honours_moewatch_window_steps(monkeypatch, tmp_path):
    for k, v in QUIET.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MOEWATCH_WINDOW_STEPS", "5")
    assert len(_demo(tmp_path)) == 4
    assert len(_demo(tmp_path, "--window", "10")) == 2  # the flag still wins


def test_demo_rerun_replaces_its_log_instead_of_appending(monkeypatch, tmp_path, capsys):
    for k, v in QUIET.items():
        monkeypatch.setenv(k, v)
    first = _demo(tmp_path)
    second = _demo(tmp_path)
    assert len(first) == len(second) == 2
    assert "replacing the previous log" in capsys.readouterr().err


def test_demo_mentions_linger_when_serving_metrics(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MOEWATCH_ALERTS__ENABLED", "false")
    monkeypatch.setenv("MOEWATCH_PROMETHEUS__PORT", "0")
    monkeypatch.setenv("MOEWATCH_PROMETHEUS__HOST", "127.0.0.1")
    _demo(tmp_path)
    err = capsys.readouterr().err
    assert "metrics served at http://127.0.0.1:" in err and "--linger" in err
    _demo(tmp_path, "--linger", "0.2")
    assert "for 0.2 more s (--linger)" in capsys.readouterr().err


def test_demo_prints_a_line_per_window_when_stdout_is_not_a_terminal(monkeypatch, tmp_path):
    env = {**QUIET, "MOEWATCH_JSONL__PATH": str(tmp_path / "x.jsonl")}
    out = _run("-m", "moewatch", "demo", "--steps", "30", "--window", "10", env=env)
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if x.startswith("window ")]
    assert [x.split()[1] for x in lines] == ["0", "1", "2"]
    assert "L0 " in lines[0] and "cov " in lines[0]


def test_no_internal_jargon_in_user_facing_text():
    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no public walk
        texts += [p.format_help() for p in action.choices.values()]
    texts.append((REPO / "README.md").read_text())
    for text in texts:
        assert not re.search(r"\bthe seed\b|\bseed's\b", text, re.I), text[:200]


def test_jsonl_lines_carry_schema_version_and_thresholds(monkeypatch, tmp_path):
    for k, v in QUIET.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MOEWATCH_THRESHOLDS__LOAD_COV_COLLAPSED", "1.2")
    line = _demo(tmp_path)[0]
    assert line["schema_version"] == 2 and line["moewatch_version"] == __version__
    assert line["thresholds"]["load_cov_collapsed"] == 1.2 and line["thresholds"]["false_alarm_rate"] == 1e-4
    assert set(line["layers"][0]["noise_floor"]) == {"load_cov", "top2_excess", "norm_entropy", "dead_ratio"}
