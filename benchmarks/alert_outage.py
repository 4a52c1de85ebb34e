"""An alert endpoint down for ``--outage`` seconds across a collapse, then back: what arrives, and when.

A real loopback HTTP server stands in for Slack, PagerDuty and a generic webhook. It answers 500 (or is
stopped, so connections are refused) from before the collapse until ``--outage`` seconds later; the alert
sink meanwhile gets one window report every ``--window-s`` seconds (the collapse spreads over the first
windows). After recovery the script waits for the deliveries, closes the sink and reports per notifier:
notifications delivered after recovery, duplicates, dropped, the delay from recovery to delivery, and the
cost of ``emit()`` on the training thread during the outage next to a sink without HTTP notifiers.

    python benchmarks/alert_outage.py                     # 60 s of HTTP 500, default backoff cap
    python benchmarks/alert_outage.py --fault refused --outage 60
    python benchmarks/alert_outage.py --outage 5 --backoff-max 0.5   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from webhook_server import WebhookServer, make_layer, make_report, ok, status  # noqa: E402

from moewatch.alerting.settings import AlertsConfig  # noqa: E402
from moewatch.alerting.sink import AlertSink  # noqa: E402

PD_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
PATHS = {"slack": "/slack", "pagerduty": "/pd", "webhook": "/am"}


def _reports(n: int) -> list:
    out = []
    for w in range(n):  # layer i collapses in window i (up to 4 layers), then the state holds
        out.append(make_report(w, [make_layer(i, "collapsed" if i <= w else "healthy") for i in range(4)]))
    return out


def _timed_emits(sink: AlertSink, reports: list, window_s: float, until: float) -> list[float]:
    times = []
    for r in reports:
        if time.monotonic() >= until:
            break
        t0 = time.perf_counter()
        sink.emit(r)
        times.append(time.perf_counter() - t0)
        time.sleep(max(0.0, min(window_s, until - time.monotonic())))
    return times


def run(args: argparse.Namespace) -> dict:
    first = WebhookServer(default=status(500, "down")).__enter__()
    port, url = first.httpd.server_address[1], first.url
    if args.fault == "refused":
        first.stop()
    defaults = AlertsConfig()
    cfg = AlertsConfig(
        slack_webhook_url=url("/slack"), pagerduty_routing_key=PD_KEY, pagerduty_url=url("/pd"),
        webhook_url=url("/am"), backoff_max=args.backoff_max if args.backoff_max is not None else defaults.backoff_max,
        close_timeout=args.close_timeout,
    )
    sink = AlertSink(cfg)
    baseline = AlertSink(AlertsConfig(log_notifications=False))  # no HTTP notifiers: the engine alone
    reports = _reports(int(args.outage / args.window_s) + 1)
    t0 = time.monotonic()
    base_times = _timed_emits(baseline, reports, 0.0, float("inf"))
    emit_times = _timed_emits(sink, reports, args.window_s, t0 + args.outage)
    time.sleep(max(0.0, t0 + args.outage - time.monotonic()))
    srv = WebhookServer(port=port).__enter__() if args.fault == "refused" else first
    srv.default = ok()
    recovered = time.time()
    failed_during = len(first.hits)
    deadline = time.monotonic() + cfg.backoff_max + 15
    while time.monotonic() < deadline:
        if all(any(h.path == p for h in srv.answered(200)) for p in PATHS.values()):
            break
        time.sleep(0.05)
    time.sleep(2.0)  # a duplicate would come now
    sink.close()
    srv.stop()
    stats = sink.delivery_stats()
    out: dict = {
        "fault": args.fault, "outage_s": args.outage, "backoff_max_s": cfg.backoff_max,
        "windows_during_outage": len(emit_times), "requests_during_outage": failed_during, "notifiers": {},
        "emit_us_median": statistics.median(emit_times) * 1e6, "emit_us_max": max(emit_times) * 1e6,
        "emit_us_median_no_notifiers": statistics.median(base_times) * 1e6,
    }
    for name, path in PATHS.items():
        hits = [h for h in srv.answered(200) if h.path == path]
        bodies = [json.dumps(h.body, sort_keys=True) for h in hits]
        out["notifiers"][name] = {
            "delivered": len(hits), "duplicates": len(bodies) - len(set(bodies)),
            "dropped": stats[name]["dropped"], "coalesced": stats[name]["coalesced"],
            "delay_after_recovery_s": round(hits[0].time - recovered, 2) if hits else None,
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outage", type=float, default=60.0, help="seconds the endpoint is down")
    p.add_argument("--fault", choices=["http500", "refused"], default="http500")
    p.add_argument("--window-s", type=float, default=2.0, help="seconds between window reports")
    p.add_argument("--backoff-max", type=float, default=None, help="alerts.backoff_max (default: the config's)")
    p.add_argument("--close-timeout", type=float, default=5.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    res = run(args)
    print(f"{res['fault']} outage {res['outage_s']:g}s, backoff cap {res['backoff_max_s']:g}s, "
          f"{res['windows_during_outage']} windows and {res['requests_during_outage']} failed requests during it")
    print("| notifier | delivered after recovery | duplicates | dropped | coalesced | delay after recovery (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in res["notifiers"].items():
        print(f"| {name} | {r['delivered']} | {r['duplicates']} | {r['dropped']} | {r['coalesced']} | "
              f"{r['delay_after_recovery_s']} |")
    print(f"emit() during the outage: median {res['emit_us_median']:.0f} us, max {res['emit_us_max']:.0f} us; "
          f"without notifiers median {res['emit_us_median_no_notifiers']:.0f} us "
          f"(ratio {res['emit_us_median'] / res['emit_us_median_no_notifiers']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
