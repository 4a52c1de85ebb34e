"""How long ``moewatch --help`` and ``moewatch --version`` take, side by side with a bare interpreter and
with ``import moewatch.monitor`` (what every command paid before imports were made lazy).

    python benchmarks/cli_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def _time(args: list[str], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True, check=True, timeout=120)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    n = ap.parse_args().repeat
    base = _time(["-c", "pass"], n)
    rows = [
        ("python -c pass", base),
        ("moewatch --help", _time(["-m", "moewatch", "--help"], n)),
        ("moewatch --version", _time(["-m", "moewatch", "--version"], n)),
        ("import moewatch.monitor (torch)", _time(["-c", "import moewatch.monitor"], n)),
    ]
    for name, s in rows:
        print(f"{name:<34} {s:7.3f} s  {s / base:6.1f}x python")
    return 0


if __name__ == "__main__":
    sys.exit(main())
