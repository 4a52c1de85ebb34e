"""The peer's suite as a regression net: transformers' OWN common model tests, with and without moewatch.

What it covers: every test of ``ModelTesterMixin`` (transformers' ``tests/test_modeling_common.py``, from
the sdist of the installed transformers version, downloaded at run time into ``.cache/transformers-sdist/``
and never committed) over tiny Mixtral and Qwen3-MoE models of our own (``tests/peer/tiny_moe.py``: 2
layers, 4 experts, top-2, hidden 32, vocab 99, batch 3, seq 7; all five model classes of each family).
Nothing is deselected; what skips, skips by transformers' own markers and checks (``@slow``, GPU,
flash-attn, deepspeed, ...). ``GenerationTesterMixin`` and ``ExportTesterMixin`` are not in the sdist and
are empty stand-ins, so no generate() or torch.export test runs.

The slice runs twice, in two concurrent subprocesses with their own pytest config
(``-c tests/peer/pytest.ini``: the repo's conftest and settings stay out): once plain, once with
``tests/peer/moewatch_plugin.py`` attaching ``moewatch.attach`` (sinks off) to every top-level model any
test builds. It fails when (a) a test fails or errors only with moewatch, (b) fewer tests pass with
moewatch than a floor a bit under what is observed, (c) moewatch attached to too few models, counted no
tokens, or had attach, close or hook errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.ci import missing, require_module

REPO = Path(__file__).resolve().parents[1]
PEER = REPO / "tests" / "peer"
sys.path.insert(0, str(PEER))
import hfsource  # noqa: E402

FAMILIES = {"peer_mixtral": "Mixtral", "peer_qwen3_moe": "Qwen3-MoE"}
RUN_TIMEOUT_S = 240
# Observed on a 2-core CPU, transformers 5.24.0: 161 tests per family, 116 (Mixtral) and 117 (Qwen3-MoE)
# passed, the rest skipped, none failed, identically with and without moewatch; 1488 models attached,
# 25762 tokens counted in 552 windows (count_eval=True: the eval forwards too). Floors sit below to absorb
# upstream drift.
MIN_PASSED_PER_FAMILY = 100
MIN_MODELS_ATTACHED = 500


def _child_env(tests_dir: Path, attach: bool, summary: Path) -> dict[str, str]:
    # No MOEWATCH_* of the caller's shell may configure (or break: unknown names are refused) attach().
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEWATCH_", "PEER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(PEER)])
    env[hfsource.ENV_TESTS_DIR] = str(tests_dir)
    env["HF_HUB_OFFLINE"] = "1"  # anything that would reach the Hub fails fast, in both runs alike
    env["PEER_MOEWATCH_SUMMARY"] = str(summary)
    if attach:
        env["PEER_MOEWATCH_ATTACH"] = "1"
    return env


def _start(tests_dir: Path, out: Path, attach: bool) -> tuple[subprocess.Popen[str], Path, Path, Path]:
    tag = "with" if attach else "without"
    junit, summary, log = out / f"{tag}.xml", out / f"{tag}.json", out / f"{tag}.log"
    cmd = [
        sys.executable, "-m", "pytest",
        "-c", str(PEER / "pytest.ini"), "--rootdir", str(PEER), "--noconftest",
        "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={junit}",
        *(str(PEER / f"{name}.py") for name in FAMILIES),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=PEER, env=_child_env(tests_dir, attach, summary),
        stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return proc, junit, summary, log


def _outcomes(junit: Path) -> dict[str, str]:
    """``module.Class::test`` -> passed / failed / error / skipped (a test failed if any subtest failed)."""
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    out: dict[str, str] = {}
    for case in ET.parse(junit).iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        outcome = (
            "error"
            if "error" in tags
            else "failed"
            if "failure" in tags
            else "skipped"
            if "skipped" in tags
            else "passed"
        )
        if rank[outcome] > rank.get(out.get(key, "passed"), 0) or key not in out:
            out[key] = outcome
    return out


def _counts(outcomes: dict[str, str]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for key, outcome in outcomes.items():
        family = FAMILIES.get(key.split(".", 1)[0], key.split("::", 1)[0])
        row = table.setdefault(family, {"collected": 0, "passed": 0, "skipped": 0, "failed": 0, "error": 0})
        row["collected"] += 1
        row[outcome] += 1
    return table


def test_transformers_common_tests_pass_with_moewatch(tmp_path: Path) -> None:
    require_module("parameterized", "pip install -e '.[test]' (test_modeling_common.py imports it)")
    try:
        tests_dir = hfsource.hf_tests_dir()
    except hfsource.SdistUnavailable as exc:
        missing(f"transformers' common tests are not available: {exc}")
    t0 = time.monotonic()
    runs = {attach: _start(tests_dir, tmp_path, attach) for attach in (False, True)}
    results: dict[bool, dict[str, str]] = {}
    for attach, (proc, junit, _summary, log) in runs.items():
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S - (time.monotonic() - t0))
        except subprocess.TimeoutExpired:
            for other, *_ in runs.values():
                other.kill()
            pytest.fail(
                f"the inner run {'with' if attach else 'without'} moewatch took over {RUN_TIMEOUT_S}s"
            )
        text = log.read_text()
        # 0: all passed, 1: some failed (compared below); anything else (interrupted, usage, internal error,
        # no tests) means the run itself is broken.
        assert rc in (0, 1) and junit.is_file(), (
            f"inner run with attach={attach} ended rc {rc}:\n{text[-6000:]}"
        )
        results[attach] = _outcomes(junit)
    wall = time.monotonic() - t0
    plain, watched = results[False], results[True]
    summary = json.loads(runs[True][2].read_text())

    bad = {"failed", "error"}
    print(f"\npeer suite: both runs took {wall:.1f}s (concurrent)")
    for label, outcomes in (("without moewatch", plain), ("with moewatch", watched)):
        for family, row in sorted(_counts(outcomes).items()):
            print(f"  {label:17} {family:10} {row}")
    print(
        f"  moewatch: {summary['models_attached']} models attached, {summary['tokens']} tokens counted in "
        f"{summary['windows']} windows, {summary['hook_errors']} hook errors"
    )
    baseline_failures = sorted(k for k, v in plain.items() if v in bad)
    if baseline_failures:
        print(
            "  failing WITHOUT moewatch too (not moewatch's doing):\n    " + "\n    ".join(baseline_failures)
        )

    # (a) nothing fails only with moewatch; a test that vanished with moewatch (collection broke) counts too.
    only_with = sorted(k for k, v in watched.items() if v in bad and plain.get(k) not in bad)
    vanished = sorted(set(plain) - set(watched))
    assert not only_with and not vanished, (
        "transformers tests that fail ONLY with moewatch attached:\n  "
        + "\n  ".join(f"{k} ({watched[k]})" for k in only_with)
        + ("\nmissing from the moewatch run: " + ", ".join(vanished) if vanished else "")
        + f"\n(see the log: {runs[True][3]})\nattach errors: {summary['attach_errors']}"
    )
    # (b) the slice really ran, in both runs.
    for label, outcomes in (("without", plain), ("with", watched)):
        for family in FAMILIES.values():
            passed = _counts(outcomes).get(family, {}).get("passed", 0)
            assert passed >= MIN_PASSED_PER_FAMILY, f"{family} {label} moewatch: only {passed} tests passed"
    # (c) moewatch was really there, and said nothing went wrong.
    assert summary["attach"] and summary["models_attached"] >= MIN_MODELS_ATTACHED, summary["models_attached"]
    assert summary["tokens"] >= 10_000, f"moewatch counted only {summary['tokens']} tokens"
    assert not summary["attach_errors"], summary["attach_errors"]
    assert not summary["close_errors"], summary["close_errors"]
    assert summary["hook_errors"] == 0 and summary["max_hook_errors_in_a_report"] == 0, summary
