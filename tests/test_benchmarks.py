"""Smoke tests: the benchmark scripts run end to end with tiny settings (numbers are not checked)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_overhead_help() -> None:
    assert "--device" in _run("benchmarks/overhead.py", "--help")
    assert "--layers" in _run("benchmarks/scale.py", "--help")


def test_overhead_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    text = _run(
        "benchmarks/overhead.py", "--models", "demo,qwen3moe", "--blocks", "2", "--steps-per-block", "2",
        "--window-steps", "2", "--warmup", "1", "--scale", "0.1", "--hook-steps", "2", "--hook-rounds", "2",
        "--hook-processes", "2", "--compile", "--compile-backend", "aot_eager", "--graph-rounds", "6", "--json", str(out), timeout=300,
    )
    assert "| demo | 2 |" in text and "| qwen3moe | 2 |" in text
    assert "compiled+moewatch / compiled" in text
    data = json.loads(out.read_text())
    for r in data["results"]:
        x = r["extra"]
        assert set(r["ratio"]) == {"moewatch/plain", "naive/plain", "compiled+moewatch/compiled"}
        assert all(ratio["n"] == 2 for ratio in r["ratio"].values())
        assert set(r["step_ms"]) == {"plain", "moewatch", "naive", "compiled", "compiled+moewatch"}
        assert r["window_ends"] >= 4  # window ends were inside the timed blocks, eager and compiled
        assert r["probs_every"] == 32  # moewatch's default
        assert r["ops_count_call"] == 2 and 2 < r["ops_sampled_call"] <= 13
        assert r["ops_per_router_call"] == 2 + (r["ops_sampled_call"] - 2) / 32
        # The floor counter's hooks and moewatch's, count-only and sampled, ran and were timed.
        assert 0 < x["floor_hook_us_per_step"] and 0 < x["count_hook_us_per_step"] < x["sampled_hook_us_per_step"]
        assert x["calls_per_router_step"] == 1 and x["sampled_share"] == 4 / 100  # window 100, probs_every 32
        assert r["hook_us_per_step"] == pytest.approx(
            x["count_hook_us_per_step"] + 0.04 * (x["sampled_hook_us_per_step"] - x["count_hook_us_per_step"]))
        # Medians over this process and one fresh one (--hook-processes 2), each process's figure kept.
        assert x["hook_processes"] == 2 and len(x["hook_vs_floor_per_process"]) == 2
        assert x["hook_vs_floor"] == pytest.approx(statistics.median(x["hook_vs_floor_per_process"]))
        assert all(v > 0 for v in x["hook_vs_floor_per_process"])
        assert x["window_end_ms"] > 0
        c = x["compile"]
        assert c["compiled"]["graphs"] >= 1 and c["compiled+moewatch"]["graphs"] >= 1  # each its own graph
        assert c["graphs_compiled_in_timed_blocks"] == 0  # no recompile inside a timed block
        assert len(c["last_window_tokens"]) == 2 and all(t > 0 for t in c["last_window_tokens"])  # hooks traced
        # The in-graph rounds ran moewatch's graph in its halves only, and compiled nothing.
        g = c["in_graph"]
        assert c["graphs_compiled_in_graph_rounds"] == 0 and g["rounds"] == 6 and g["calls_per_round"] == 2
        assert g["counted_tokens"] == [g["expected_tokens"]] * 2
        assert g["ci"][0] <= g["us_per_forward"] <= g["ci"][1] and g["step_hook_us"] > 0
        assert g["modeled_ratio_ci"][0] <= g["modeled_ratio"] <= g["modeled_ratio_ci"][1]
        # The router-level rounds: every router's graph compiled once each way, then only run.
        rg = c["router_graphs"]
        assert rg["graphs_compiled_in_rounds"] == 0 and rg["rounds"] == 6 and rg["calls_per_round"] == 2
        assert rg["router_calls_per_forward"] == 2 and rg["counted_tokens"] == [rg["expected_tokens"]] * 2
        assert rg["ci"][0] <= rg["us_per_forward"] <= rg["ci"][1] and rg["plain_routers_us"] > 0
        assert rg["modeled_ratio_ci"][0] <= rg["modeled_ratio"] <= rg["modeled_ratio_ci"][1]


def test_scale_runs_tiny() -> None:
    text = _run("benchmarks/scale.py", "--layers", "3", "--experts", "16", "--top-k", "2", "--tokens", "32",
                "--repeats", "2")
    assert "window close" in text and "per-expert" in text and "monitor device buffers" in text


def test_early_warning_runs_tiny() -> None:
    text = _run("benchmarks/early_warning.py", "--seeds", "1", "--steps", "50", timeout=300)
    assert "lead time (steps) per seed: [2]" in text and "false alarms over 1 x 50 steps: 0" in text


def test_cli_startup_runs() -> None:
    assert "moewatch --help" in _run("benchmarks/cli_startup.py", "--repeat", "1")


def test_alert_outage_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    text = _run(
        "benchmarks/alert_outage.py", "--outage", "2", "--backoff-max", "0.3", "--window-s", "0.4",
        "--json", str(out), timeout=60,
    )
    assert "| slack | 1 | 0 | 0 |" in text
    data = json.loads(out.read_text())
    assert {n: r["delivered"] for n, r in data["notifiers"].items()} == {"slack": 1, "pagerduty": 1, "webhook": 1}
