"""Early warning, measured: the projected_collapse alert's lead time on the demo's runaway router
(``--balance none``) and its false alarms on a balanced one (``--balance bias``, 2000 steps), per seed.

    python benchmarks/early_warning.py [--seeds 5] [--steps 2000] [--window 1]

One-step windows (64 tokens each, the demo's own model at its default size) are the hardest case for
false alarms (the noisiest windows) and the only one where the default demo collapses slowly enough to
be seen coming (at 10-step windows it is collapsed in its first window).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("MOEWATCH_PROMETHEUS__ENABLED", "false")
os.environ.setdefault("MOEWATCH_ALERTS__ENABLED", "false")
os.environ.setdefault("MOEWATCH_JSONL__ENABLED", "false")

from moewatch.alerting.engine import AlertEngine  # noqa: E402
from moewatch.alerting.settings import AlertCondition, AlertsConfig  # noqa: E402
from moewatch.demo.run import DemoOptions, run_demo  # noqa: E402
from moewatch.report import HealthState, WindowReport  # noqa: E402


def alert_steps(reports: list[WindowReport]) -> list[int]:
    engine = AlertEngine(AlertsConfig(conditions=[AlertCondition.PROJECTED_COLLAPSE], log_notifications=False))
    fired = []
    for r in reports:
        n = engine.evaluate(r)
        if n is not None and any(a.status == "firing" for a in n.alerts):
            fired.append(r.step_end)
    return fired


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--window", type=int, default=1)
    args = ap.parse_args()
    print(f"{'seed':>4}  {'none: alert':>11}  {'none: collapsed':>15}  {'lead steps':>10}  "
          f"{'bias: alerts':>12}  {'bias: windows':>13}  {'bias: s':>7}")
    false_alarms = 0
    leads = []
    for seed in range(args.seeds):
        none = run_demo(DemoOptions(balance="none", window=args.window, steps=60, console=False, seed=seed))
        fired = alert_steps(none.reports)
        collapsed = next((r.step_end for r in none.reports if r.state is HealthState.COLLAPSED), None)
        lead = None if not fired or collapsed is None else collapsed - fired[0]
        leads.append(lead)
        t0 = time.perf_counter()
        bias = run_demo(DemoOptions(balance="bias", window=args.window, steps=args.steps, console=False, seed=seed))
        bias_alerts = alert_steps(bias.reports)
        false_alarms += len(bias_alerts)
        print(f"{seed:>4}  {fired[0] if fired else '-':>11}  {collapsed if collapsed else '-':>15}  "
              f"{lead if lead is not None else '-':>10}  {len(bias_alerts):>12}  {len(bias.reports):>13}  "
              f"{time.perf_counter() - t0:>7.1f}")
    print(f"lead time (steps) per seed: {leads}; false alarms over {args.seeds} x {args.steps} steps: {false_alarms}")
    return 0 if false_alarms == 0 and all(x is not None and x > 0 for x in leads) else 1


if __name__ == "__main__":
    sys.exit(main())
