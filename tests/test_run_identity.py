"""Each process gets its own run identity; a JSONL log another live process writes is not appended to."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from moewatch.config import ConfigError, MoEWatchConfig
from moewatch.sinks import JsonlSink

ROOT = Path(__file__).resolve().parents[1]


def test_default_run_names_unique_per_process() -> None:
    code = "from moewatch.config import MoEWatchConfig; print(MoEWatchConfig().run_name)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(4)]  # started together, as four jobs launched at once would be
    names = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(n.startswith("run-") for n in names) and len(set(names)) == 4, names
    assert MoEWatchConfig().run_name != MoEWatchConfig().run_name  # two monitors in one process, too


def test_jsonl_written_by_another_live_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "windows.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from moewatch.sinks import JsonlSink; "
         "s = JsonlSink(sys.argv[1]); print('ready', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(ConfigError, match="being written by another live moewatch monitor") as info:
            JsonlSink(path)
        assert "MOEWATCH_RUN_NAME" in str(info.value)
    finally:
        holder.kill()
        holder.wait(10)
    time.sleep(0.1)
    sink = JsonlSink(path)  # the other process is gone: appending is fine again
    sink.close()
